"""The `vision_domains` evaluator of `python -m soups.pareto`: objectives = accuracies on chosen domains.

    python -m soups.pareto experts=[RUN_A/best.safetensors,RUN_B/best.safetensors] evaluator=vision_domains \
        evaluator.domains=[0,3]

Each objective `acc_<domain>` is the top-1 accuracy of the resident model on that domain's split (`split`:
in / out / all, DomainBed's seeded 80/20 split of `trial_seed`), reported as mean and standard error over the
samples. The dataset and the model architecture are read from the `config.yaml` that `vision/train.py` saves
beside each checkpoint, unless given in the evaluator config. `evaluate_ensemble(λ)` scores the λ-weighted
average of the experts' logits (the functional-ensemble baseline).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from soups.pareto_registry import EVALUATORS, ObjectiveStat, mean_stderr
from soups.utils import SoupsError
from vision.data import MultiDomainDataset, make_splits
from vision.evaluate import build_classifier, build_dataset, eval_batches
from vision.models import Classifier, load_classifier_weights

SPLITS = ("in", "out", "all")


def expert_config(path: str | Path) -> dict[str, Any]:
    """The train config saved beside a checkpoint (`<run>/config.yaml` for `<run>/best.safetensors` or `<run>`).

    Raises:
        SoupsError: no config.yaml there.
    """
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "config.yaml"
    if not config.is_file():
        raise SoupsError(f"expert {path} has no config.yaml beside it (expected a vision/train.py run)")
    return OmegaConf.to_container(OmegaConf.load(config), resolve=True)  # type: ignore[return-value]


def load_expert(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """A vision/train.py checkpoint as a ready `Classifier` (architecture from its config.yaml), eval mode."""
    path = Path(path)
    weights = path / "best.safetensors" if path.is_dir() else path
    cfg = expert_config(path)
    dataset = build_dataset({**cfg, "test_envs": []}, augment=False)
    model = build_classifier({**cfg, "init": {}, "model": {**cfg["model"], "pretrained": None}}, dataset, 0.0)
    load_classifier_weights(model, weights)
    return model.to(device).eval()


class DomainAccuracy:
    """Per-domain accuracy objectives.

    Args:
        dataset: The multi-domain dataset.
        domains: Domain indices or names to score.
        split: "in", "out" or "all" of each domain.
        trial_seed: Seed of DomainBed's in/out split.
        holdout_fraction: Out fraction.
        device: Where inputs go.
        batch_size: Evaluation batch size.
        experts: Expert paths (for `evaluate_ensemble`).
    """

    def __init__(self, dataset: MultiDomainDataset, domains: Sequence[int | str], split: str, trial_seed: int,
                 holdout_fraction: float, device: torch.device, batch_size: int, experts: Sequence[str]) -> None:
        if split not in SPLITS:
            raise SoupsError(f"vision_domains split={split!r}; valid: {', '.join(SPLITS)}")
        if not domains:
            raise SoupsError(f"vision_domains needs domains=[...]; {dataset.name} has {', '.join(dataset.domains)}")
        indices = [dataset.domain_index(d) for d in domains]
        splits = make_splits(dataset, [], holdout_fraction, trial_seed) if split != "all" else None
        self.sets: list[Dataset] = []
        for i in indices:
            if splits is None:
                self.sets.append(dataset.datasets[i])
            else:
                self.sets.append((splits.in_splits if split == "in" else splits.out_splits)[i])
        self.objectives = [f"acc_{dataset.domains[i]}" for i in indices]
        self.device, self.batch_size, self.experts = device, batch_size, list(experts)
        self._members: list[Classifier] | None = None

    @torch.no_grad()
    def _correct(self, forward: Any, data: Dataset) -> torch.Tensor:
        """[N] 1.0 where argmax forward(x) == y."""
        out = []
        for x, y in eval_batches(data, self.batch_size):
            out.append((forward(x.to(self.device)).argmax(-1).cpu() == torch.as_tensor(y)).double())
        return torch.cat(out)

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        """Accuracy on every chosen domain (model put in eval mode, weights untouched)."""
        was_training = model.training
        model.eval()
        stats = {name: mean_stderr(self._correct(model, data)) for name, data in zip(self.objectives, self.sets)}
        model.train(was_training)
        return stats

    def evaluate_ensemble(self, lambdas: Sequence[float]) -> dict[str, ObjectiveStat]:
        """Accuracy of Σ_i λ_i f_i(x) (logits), experts loaded once."""
        if len(lambdas) != len(self.experts):
            raise SoupsError(f"got {len(lambdas)} ensemble weights for {len(self.experts)} experts")
        if self._members is None:
            self._members = [load_expert(p, self.device) for p in self.experts]
        members = self._members

        def forward(x: torch.Tensor) -> torch.Tensor:
            return sum(float(w) * m(x) for w, m in zip(lambdas, members))  # type: ignore[return-value]

        return {name: mean_stderr(self._correct(forward, data)) for name, data in zip(self.objectives, self.sets)}


@EVALUATORS.register("vision_domains")
def build_vision_domains(cfg: Mapping[str, Any], *, experts: Sequence[str], device: torch.device) -> DomainAccuracy:
    """Builds `DomainAccuracy` from the evaluator config; dataset defaults to the first expert's."""
    if not experts:
        raise SoupsError("vision_domains needs at least one expert")
    run_cfg = expert_config(experts[0])
    if cfg.get("dataset"):
        run_cfg["dataset"] = {**run_cfg["dataset"], **dict(cfg["dataset"])}
    dataset = build_dataset({**run_cfg, "test_envs": []}, augment=False)
    return DomainAccuracy(
        dataset,
        list(cfg.get("domains") or []),
        str(cfg.get("split", "in")),
        int(cfg.get("trial_seed", run_cfg.get("trial_seed", 0))),
        float(run_cfg["dataset"].get("holdout_fraction", 0.2)),
        device,
        int(cfg.get("batch_size", 256)),
        experts,
    )
