"""`python vision/train.py`: one DomainBed run (ERM / CORAL / Mixup ...) of a timm classifier, or its LP stage.

    python vision/train.py dataset.name=PACS dataset.data_dir=/data/domainbed test_envs=[0] hparams_seed=3
    python vision/train.py experiment=smoke                      # RotatedDigits, tiny CNN, seconds on CPU

Set-up: the dataset's domains are split in/out (80/20, seeded by the trial); the source domains' in splits
train, their out splits validate (training-domain validation), the test domains are only evaluated. The
hyper-parameters come from Table 2.1 (`hparams_space` mild/extreme/default), drawn per (hparams_seed, name).
The classifier head can start from a linear probe (`init.classifier`, LP then FT) and the featurizer from
another run (`init.featurizer`, ratatouille); `freeze_featurizer=true` IS the LP stage (only the head trains).

Loop: Adam for `steps` steps, one minibatch of `batch_size` per source domain per step; every `eval_every`
steps a `results.jsonl` row in DomainBed's schema (step, epoch, loss, step_time, env{i}_in_acc,
env{i}_out_acc, hparams, args) and tensorboard scalars; the moving average (MA) of the weights from step
`ma_start` on is kept with the engine's running mean (`soups.selection.RunningMean`).

Save (atomically, into `output`): `best.safetensors` (best mean source out accuracy), `last.safetensors`,
`ma.safetensors`, the resolved `config.yaml`, and `summary.json` (best step, accuracies of best / last / MA).
"""

from __future__ import annotations

from soups.cli import bar_disabled, entry, precheck

precheck(__name__, __file__, "../configs/vision_train")  # a bad command line fails here, before the heavy imports

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from soups.utils import SoupsError, atomic_dir, save_resolved_config, seed_everything, write_json
from vision.data import make_splits, seed_hash
from vision.evaluate import (
    build_classifier,
    build_dataset,
    evaluate_splits,
    infinite_batches,
    resolve_device,
    source_val_acc,
    test_acc,
)
from vision.hparams import draw_hparams
from vision.models import save_classifier
from vision.objectives import get_objective

# ----------------------------------------------------------------------------------------------------------
# Run settings (builders and evaluation: vision/evaluate.py)
# ----------------------------------------------------------------------------------------------------------


def run_hparams(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Table 2.1 draws + the objective's, then `hparams_overrides`; lr multiplied by `lr_scale`."""
    spec = get_objective(cfg["objective"])
    hp = draw_hparams(cfg["hparams_space"], int(cfg["hparams_seed"]), spec.hparams, cfg.get("hparams_overrides"))
    hp["lr"] = float(hp["lr"]) * float(cfg.get("lr_scale", 1.0))
    return hp


def run_seed(cfg: DictConfig | Mapping[str, Any]) -> int:
    """The run's seed: `seed` if set, else DomainBed's hash of (dataset, objective, test_envs, hparams_seed,
    trial_seed), so each run of a sweep has its own head init and data order."""
    if cfg.get("seed") is not None:
        return int(cfg["seed"])
    envs = list(cfg["test_envs"])
    return seed_hash(cfg["dataset"]["name"], cfg["objective"], envs, int(cfg["hparams_seed"]), int(cfg["trial_seed"]))


# ----------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------


def train(cfg: DictConfig | Mapping[str, Any]) -> Path:
    """Runs one training as described by `cfg` (configs/vision_train/config.yaml) and returns its output dir.

    Raises:
        SoupsError: bad dataset / backbone / init paths, a non-finite loss, an existing output.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    # ---- set-up -------------------------------------------------------------------------------------------
    hparams = run_hparams(cfg)
    seed = run_seed(cfg)
    seed_everything(seed)
    device = resolve_device(str(cfg.get("device", "auto")))
    dataset = build_dataset(cfg)
    splits = make_splits(dataset, list(cfg.test_envs), float(cfg.dataset.holdout_fraction), int(cfg.trial_seed))
    model = build_classifier(cfg, dataset, dropout=0.0 if cfg.freeze_featurizer else float(hparams["dropout"]))
    model.to(device)
    if cfg.freeze_featurizer:
        model.featurizer.requires_grad_(False)
        params = list(model.classifier.parameters())
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(hparams["lr"]), weight_decay=float(hparams["weight_decay"]))
    objective = get_objective(cfg.objective).build(
        {**hparams, "seed": seed}, num_classes=dataset.num_classes, num_domains=len(splits.source_domains)
    )
    batch_size = int(hparams["batch_size"])
    loaders = [
        infinite_batches(splits.in_splits[i], batch_size, seed + i, int(cfg.get("num_workers", 0)))
        for i in splits.source_domains
    ]
    min_in = min(len(splits.in_splits[i]) for i in splits.source_domains)
    steps, eval_every, ma_start = int(cfg.steps), int(cfg.eval_every), int(cfg.ma_start)
    args = OmegaConf.to_container(cfg, resolve=True)
    from soups.selection import RunningMean

    moving_average = RunningMean()
    best: dict[str, Any] = {"val": -math.inf, "step": -1, "state": None, "accs": None}
    eval_splits = (splits.in_splits, splits.out_splits, device, int(cfg.eval_batch_size))

    with atomic_dir(cfg.output, overwrite=bool(cfg.get("overwrite", False))) as out:
        tracker = _tracker(cfg, out)
        results = (out / "results.jsonl").open("w")
        # ---- loop -----------------------------------------------------------------------------------------
        model.train()
        if cfg.freeze_featurizer:
            model.featurizer.eval()
        step_start, loss_sum, loss_count = time.time(), 0.0, 0
        for step in tqdm(range(1, steps + 1), desc=f"train {cfg.objective} env{list(cfg.test_envs)}",
                         disable=bar_disabled(bool(cfg.get("progress", True)))):
            minibatches = [(x.to(device), torch.as_tensor(y).to(device)) for x, y in (next(it) for it in loaders)]
            loss, logs = objective(model, minibatches)
            if not torch.isfinite(loss):
                raise SoupsError(f"non-finite loss {float(loss)} at step {step} (lr={hparams['lr']:.2e})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, loss_count = loss_sum + logs["loss"], loss_count + 1
            if step >= ma_start:
                moving_average.add({k: v.detach() for k, v in model.state_dict().items()})
            if step % eval_every == 0 or step == steps:
                accs = evaluate_splits(model, *eval_splits)
                row = {"step": step, "epoch": step * batch_size / min_in, "loss": loss_sum / loss_count,
                       "step_time": (time.time() - step_start) / loss_count, **accs}
                results.write(json.dumps({**row, "hparams": hparams, "args": args}) + "\n")
                results.flush()
                tracker.log({k: v for k, v in row.items() if k != "step"}, step=step)
                val = source_val_acc(accs, splits.source_domains)
                if val > best["val"]:
                    best = {"val": val, "step": step, "accs": accs,
                            "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
                step_start, loss_sum, loss_count = time.time(), 0.0, 0
        results.close()
        # ---- save -----------------------------------------------------------------------------------------
        last_accs = evaluate_splits(model, *eval_splits)
        save_classifier(model, out / "last.safetensors")
        model.load_state_dict(best["state"])
        save_classifier(model, out / "best.safetensors")
        summary: dict[str, Any] = {
            "best_step": best["step"],
            "best": _summ(best["accs"], splits.source_domains, splits.test_domains),
            "last": _summ(last_accs, splits.source_domains, splits.test_domains),
            "hparams": hparams,
            "seed": seed,
            "source_domains": splits.source_domains,
            "test_domains": splits.test_domains,
            "domains": dataset.domains,
        }
        if moving_average.count:
            model.load_state_dict(moving_average.state_dict())
            save_classifier(model, out / "ma.safetensors")
            summary["ma"] = _summ(evaluate_splits(model, *eval_splits), splits.source_domains, splits.test_domains)
            summary["ma_members"] = moving_average.count
        save_resolved_config(cfg, out)
        write_json(out / "summary.json", summary)
        tracker.finish()
    return Path(str(cfg.output)).absolute()


def _summ(accs: Mapping[str, float], sources: Sequence[int], tests: Sequence[int]) -> dict[str, Any]:
    return {"val_acc": source_val_acc(accs, sources), "test_acc": test_acc(accs, tests), "accs": dict(accs)}


class _NoTracker:
    def log(self, values: dict, step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def _tracker(cfg: DictConfig, out: Path) -> Any:
    """accelerate's tensorboard tracker under `<out>/tb` (or nothing with log_with=none)."""
    if cfg.get("log_with", "tensorboard") != "tensorboard":
        return _NoTracker()
    from accelerate.tracking import TensorBoardTracker

    return TensorBoardTracker("tb", out)


def train_from_file(path: str) -> Path:
    """Runs the job config saved at `path` (used by the sweep's process launchers)."""
    return train(OmegaConf.load(path))


@entry("../configs/vision_train")
def main(cfg: DictConfig) -> None:
    out = train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    print(f"best step {summary['best_step']}: val {summary['best']['val_acc']:.4f} "
          f"test {summary['best']['test_acc']:.4f} -> {out}")


if __name__ == "__main__":
    main()
