"""`python vision/train_ensemble.py method=<name>`: train one diverse ensemble and evaluate it.

    python vision/train_ensemble.py method=sed num_members=4
    python vision/train_ensemble.py method=packed experiment=smoke      # < 1 minute on CPU
    python benchmarks/bench_ensemble_table.py                          # every method, the README table

Methods (`configs/train_ensemble/method/*.yaml`, registry `vision.ensembles.methods.METHODS`): deep, shallow,
packed, mixmo, dice, sed, sdde, gncl, ncl, balanced, attribution, fishr.

Set-up: the dataset's domains are split in/out (DomainBed, 80/20); the source domains' in splits train (one
minibatch per domain per step), their out splits are the in-distribution test set, `test_envs` domains give
the shifted accuracy, and the `ood` dataset gives the OOD detection set. Shallow ensembles (and SED's
partial-diversification mode, `frozen_backbone: true`) first train one ERM classifier for `backbone_steps`
(or load `pretrained`) and freeze its featurizer.

Loop: Adam on the method's `training_loss` for `steps` steps; JSONL rows and tensorboard scalars every
`log_every` steps.

Save (atomically, into `output`): `model.safetensors`, the resolved `config.yaml`, `train_log.jsonl`, and
`metrics.json`: `evals.ensemble.evaluate_ensemble` on the ID test set with the OOD set (averaged
probabilities), the same with averaged logits, majority-vote accuracy, the uniform weight soup (or why there
is none), shifted-domain accuracy, inference parameters and forward time.
"""

from __future__ import annotations

from soups.cli import bar_disabled, entry, precheck

precheck(__name__, __file__, "../configs/train_ensemble")  # a bad command line fails here, before the heavy imports

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from evals.ensemble import evaluate_ensemble
from soups.utils import SoupsError, atomic_dir, save_resolved_config, seed_everything, write_json
from vision.data import MultiDomainDataset, get_dataset, make_splits
from vision.ensembles.combine import majority_vote
from vision.ensembles.methods import build_method, count_parameters
from vision.evaluate import infinite_batches, resolve_device
from vision.models import build_model

# ----------------------------------------------------------------------------------------------------------------
# Builders (config → components)
# ----------------------------------------------------------------------------------------------------------------


def build_dataset(d: Mapping[str, Any]) -> MultiDomainDataset:
    """A dataset from a `{name, image_size, options}` config block (digits built-ins need no files)."""
    return get_dataset(str(d["name"]), data_dir=d.get("data_dir"), augment=False, image_size=d.get("image_size"),
                       **dict(d.get("options") or {}))


def build_ood_set(cfg: Mapping[str, Any], input_shape: Sequence[int], num_classes: int, seed: int) -> Dataset | None:
    """The OOD detection set: the chosen domains of `cfg.ood.dataset`, at most `max_samples` (seeded subset).

    Raises:
        SoupsError: the OOD images do not have the training images' shape.
    """
    o = cfg.get("ood")
    if not o or not o.get("dataset"):
        return None
    ds = build_dataset(o["dataset"])
    if tuple(ds.input_shape) != tuple(input_shape):
        raise SoupsError(f"OOD dataset {ds.name} has images {ds.input_shape}, the training data {tuple(input_shape)}")
    picked = [ds.datasets[ds.domain_index(d)] for d in (o.get("domains") or ds.domains)]
    full = ConcatDataset(picked)
    n = min(len(full), int(o.get("max_samples", 1000)))
    return Subset(full, torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:n].tolist())


def pretrain_backbone(cfg: Mapping[str, Any], loaders: Sequence[Any], num_classes: int, in_chans: int,
                      device: torch.device, lr: float, progress: bool, train: bool = True) -> nn.Module:
    """The shared frozen featurizer of shallow ensembles: loaded from `pretrained`, or ERM for `backbone_steps`.

    With `train=False` it is only the (frozen, untrained) architecture, for loading saved weights into: nothing
    is read from `pretrained` and `loaders` is not used.
    """
    m = cfg["method"]
    model = build_model(str(m["backbone"]), num_classes, pretrained=m.get("pretrained") if train else None,
                        in_chans=in_chans, **dict(m.get("backbone_kwargs") or {})).to(device)
    steps = 0 if m.get("pretrained") or not train else int(m.get("backbone_steps", 0))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc="pretrain shared backbone (ERM)", disable=bar_disabled(progress)):
        x, y = (torch.cat(t).to(device) for t in zip(*(next(it) for it in loaders)))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    featurizer = model.featurizer.eval()
    featurizer.requires_grad_(False)
    return featurizer


def build_ensemble(cfg: DictConfig, num_classes: int, in_chans: int, device: torch.device,
                   loaders: Sequence[Any] | None = None) -> nn.Module:
    """The method's model on `device` (`vision.ensembles.methods.build_method`).

    Shallow ensembles and SED's partial mode (`frozen_backbone: true`) get their frozen featurizer: pretrained
    over `loaders` (or loaded from `pretrained`) for training, or, with `loaders=None`, its untrained
    architecture, which `load_run` fills from `model.safetensors`.
    """
    frozen = None
    if cfg.method.name == "shallow" or cfg.method.get("frozen_backbone", False):
        frozen = pretrain_backbone(cfg, loaders or [], num_classes, in_chans, device, float(cfg.lr),
                                   bool(cfg.progress), train=loaders is not None)
    return build_method(cfg.method, num_classes, in_chans, int(cfg.num_members), frozen, int(cfg.seed)).to(device)


def load_run(run_dir: str | Path, device: torch.device | None = None) -> tuple[DictConfig, nn.Module, Any]:
    """A finished run rebuilt from its saved `config.yaml` and `model.safetensors` (strict load, eval mode).

    Returns:
        The run's config, the model, and its data splits (`vision.data.make_splits`, as in `run`).

    Raises:
        SoupsError: `run_dir` lacks `config.yaml` or `model.safetensors`, or the weights do not fit the model.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise SoupsError(f"{run_dir / name} not found: not a finished train_ensemble run")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    device = device or torch.device("cpu")
    dataset = build_dataset(cfg.dataset)
    splits = make_splits(dataset, list(cfg.test_envs), float(cfg.dataset.holdout_fraction), int(cfg.trial_seed))
    model = build_ensemble(cfg, dataset.num_classes, int(dataset.input_shape[0]), device)
    try:
        model.load_state_dict(load_file(str(run_dir / "model.safetensors"), device=str(device)))
    except RuntimeError as err:
        raise SoupsError(f"{run_dir / 'model.safetensors'} does not fit {cfg.method.name}: {err}") from err
    return cfg, model.eval(), splits


# ----------------------------------------------------------------------------------------------------------------
# Evaluation helpers
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def member_logits(model: nn.Module, data: Dataset, device: torch.device, batch_size: int) -> tuple[Tensor, Tensor]:
    """`[M, N, C]` member logits and `[N]` labels of `model` (eval mode) on `data`."""
    model.eval()
    outs, labels = [], []
    for x, y in DataLoader(data, batch_size=batch_size):
        outs.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(outs, dim=1), torch.cat(labels)


def id_test_set(splits: Any) -> Dataset:
    """The in-distribution test set: the source domains' out splits, in domain order."""
    return ConcatDataset([splits.out_splits[i] for i in splits.source_domains])


def forward_batch(id_test: Dataset, batch_size: int) -> Tensor:
    """`[min(batch_size, N), C, H, W]`: the first images of `id_test`, the batch whose forward is timed."""
    return torch.stack([id_test[i][0] for i in range(min(batch_size, len(id_test)))])


@torch.no_grad()
def forward_ms(model: nn.Module, x: Tensor, repeats: int = 5) -> float:
    """Median wall time of one eval forward on `x`, in milliseconds (one warm-up call first)."""
    model.eval()
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def inference_parameters(model: nn.Module) -> int:
    """Parameters used at test time (DICE's discriminator only serves training)."""
    disc = getattr(model, "discriminator", None)
    return count_parameters(model) - (count_parameters(disc) if disc is not None else 0)


def save_weights(model: nn.Module, path: Path) -> None:
    """safetensors state dict; refuses non-finite weights (never save NaN weights)."""
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise SoupsError(f"refusing to save {path}: tensor {k} holds non-finite values")
        state[k] = v.detach().cpu().contiguous()
    save_file(state, str(path))


# ----------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------


def run(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Trains and evaluates the ensemble described by `cfg` (configs/train_ensemble); returns `metrics.json`.

    Raises:
        SoupsError: bad dataset / method options, a non-finite loss, an existing output.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    # ---- set-up -----------------------------------------------------------------------------------------------
    seed = int(cfg.seed)
    seed_everything(seed)
    device = resolve_device(str(cfg.device))
    dataset = build_dataset(cfg.dataset)
    splits = make_splits(dataset, list(cfg.test_envs), float(cfg.dataset.holdout_fraction), int(cfg.trial_seed))
    in_chans = int(dataset.input_shape[0])
    loaders = [infinite_batches(splits.in_splits[i], int(cfg.batch_size), seed + i) for i in splits.source_domains]
    progress = bool(cfg.progress)
    model = build_ensemble(cfg, dataset.num_classes, in_chans, device, loaders)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    id_test = id_test_set(splits)
    ood_set = build_ood_set(cfg, dataset.input_shape, dataset.num_classes, seed)
    steps, log_every = int(cfg.steps), int(cfg.log_every)

    with atomic_dir(cfg.output, overwrite=bool(cfg.overwrite)) as out:
        tracker = _tracker(str(cfg.log_with), out)
        log = (out / "train_log.jsonl").open("w")
        # ---- loop ---------------------------------------------------------------------------------------------
        model.train()
        start = time.time()
        desc = f"train {cfg.method.name} M={cfg.num_members}"
        bar = tqdm(range(1, steps + 1), desc=desc, disable=bar_disabled(progress))
        for step in bar:
            minibatches = [(x.to(device), torch.as_tensor(y).to(device)) for x, y in (next(it) for it in loaders)]
            loss, logs = model.training_loss(minibatches, step, steps)
            if not torch.isfinite(loss):
                raise SoupsError(f"non-finite loss {float(loss)} at step {step} of method {cfg.method.name}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % log_every == 0 or step == steps:
                row = {"step": step, **logs, "time_s": time.time() - start}
                log.write(json.dumps(row) + "\n")
                log.flush()
                tracker.log({k: v for k, v in row.items() if k != "step"}, step=step)
        log.close()
        train_time = time.time() - start
        # ---- evaluate and save --------------------------------------------------------------------------------
        metrics = evaluate(cfg, model, id_test, ood_set, splits, device)
        metrics.update({"train_time_s": train_time, "seed": seed, "domains": dataset.domains,
                        "source_domains": splits.source_domains, "test_domains": splits.test_domains})
        save_weights(model, out / "model.safetensors")
        save_resolved_config(cfg, out)
        write_json(out / "metrics.json", metrics)
        tracker.finish()
    return metrics


def evaluate(cfg: DictConfig, model: nn.Module, id_test: Dataset, ood_set: Dataset | None, splits: Any,
             device: torch.device) -> dict[str, Any]:
    """Every figure of `metrics.json` (see the module docstring)."""
    bs = int(cfg.eval_batch_size)
    logits, labels = member_logits(model, id_test, device, bs)
    ood_logits = member_logits(model, ood_set, device, bs)[0] if ood_set is not None else None
    x = forward_batch(id_test, bs).to(device)
    result: dict[str, Any] = {
        "method": str(cfg.method.name),
        "lam": float(cfg.method.get("lam", 0.0)),
        "num_members": int(cfg.num_members),
        "parameters": inference_parameters(model),
        "forward_ms": forward_ms(model, x),
        "forward_batch": int(x.shape[0]),
        "ensemble": evaluate_ensemble(logits, labels, ood_logits, combine="probs"),
        "ensemble_logit_average": evaluate_ensemble(logits, labels, ood_logits, combine="logits"),
        "vote_accuracy": float((majority_vote(logits) == labels).float().mean()),
    }
    if splits.test_domains:
        shifted = ConcatDataset([splits.in_splits[i] for i in splits.test_domains])
        s_logits, s_labels = member_logits(model, shifted, device, bs)
        result["shifted_accuracy"] = float((s_logits.softmax(-1).mean(0).argmax(-1) == s_labels).float().mean())
    soup = model.soup()
    if soup is None:
        result["soup"] = {"skipped": model.soup_note}
    else:
        soup = soup.to(device)
        s_logits, _ = member_logits(soup, id_test, device, bs)
        s_ood = member_logits(soup, ood_set, device, bs)[0] if ood_set is not None else None
        result["soup"] = evaluate_ensemble(s_logits, labels, s_ood)
        result["soup"]["parameters"] = count_parameters(soup)
        result["soup"]["forward_ms"] = forward_ms(soup, x)
    return result


class _NoTracker:
    def log(self, values: Mapping[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _tracker(kind: str, out: Path) -> Any:
    """accelerate's tensorboard tracker under `<out>/tb`, or nothing with `log_with=none`."""
    if kind == "none":
        return _NoTracker()
    if kind != "tensorboard":
        raise SoupsError(f"log_with must be tensorboard or none, got {kind!r}")
    from accelerate.tracking import TensorBoardTracker

    return TensorBoardTracker("tb", out)


@entry("../configs/train_ensemble")
def main(cfg: DictConfig) -> None:
    metrics = run(cfg)
    e = metrics["ensemble"]
    print(f"{metrics['method']} M={metrics['num_members']}: acc {e['accuracy']:.4f} nll {e['nll']:.4f} "
          f"ece {e['ece']:.4f} disagreement {e.get('prediction_disagreement', float('nan')):.4f} -> {cfg.output}")


if __name__ == "__main__":
    main()
