"""`python vision/average.py sweep_dir=...`: DiWA, ratatouille and their baselines from a finished sweep.

    python vision/average.py sweep_dir=runs/vision_sweep/rotated_digits
    python vision/average.py experiment=smoke

For every group of fine-tunes (`diwa`, `ratatouille`, `inter_training`, `fusing`), test domain and trial,
with the M runs' best (in-domain validation) checkpoints θ_1..θ_M:
- `erm`: the single run with the best source validation accuracy (DomainBed's training-domain validation);
- `member_mean`: the mean test accuracy of the M members (what a weight average should beat);
- `ma`: the moving average of the best run's weights from step `ma_start` (saved by train.py), MA picked by
  its own validation accuracy;
- `ens`: ENS*, the functional ensemble (1/M) Σ f(x; θ_i), logits averaged;
- `uniform`: DiWA / ratatouille uniform, (1/M) Σ θ_i (`soups.selection.uniform_soup`);
- `greedy`: ranked by validation accuracy, a candidate kept if the soup's validation accuracy does not drop
  (`soups.selection.greedy_soup`, one evaluation per candidate);
- `dagger`: DiWA† / ratatouille†, the uniform soup of all trials' runs (M × trials weights) pooled.
Diversity (ratio-error, Q-diversity from `evals.diversity`) of the members' test predictions is reported
beside, and `n_pairs` random pairs give (diversity, WA gain over the pair's mean) points for Fig. 4.6; the LMC
curve accuracy((1-λ)θ_a + λθ_b) is traced between the two best members of each group with a resident
`soups.soup.Soup` (weights switched in place per λ).

All averaging goes through the engine: `soups.selection` (running means, integer buffers from the first member)
and `soups.soup.Soup` (λ-weighted resident mix).

BatchNorm buffers (`bn`): the engine averages float buffers (running mean / var) like weights and takes
`num_batches_tracked` from the first member. With `model.freeze_bn=true` (DomainBed's ResNet) every run keeps
the pre-trained statistics, so the buffers are identical and this average is exact. With BatchNorm trained,
the averaged statistics do not match the averaged weights' features; `bn=recompute` then re-estimates them
with one pass over the source domains' training splits (`torch.optim.swa_utils.update_bn`), as SWA does.
"""

from __future__ import annotations

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/vision_average")  # a bad command line fails here, before the heavy imports

import json
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

from soups.selection import greedy_soup, uniform_soup
from soups.utils import SoupsError, atomic_dir, save_resolved_config, seed_everything
from vision.data import make_splits
from vision.evaluate import accuracy, build_classifier, build_dataset, eval_batches, resolve_device
from vision.models import Classifier

StateDict = dict[str, torch.Tensor]
BN_MODES = ("average", "recompute")

# ----------------------------------------------------------------------------------------------------------
# Runs of a sweep
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One finished fine-tune of a sweep."""

    path: Path
    cfg: dict[str, Any]
    summary: dict[str, Any]

    @property
    def group(self) -> str:
        return str((self.cfg.get("tags") or {}).get("group", "diwa"))

    @property
    def key(self) -> tuple[str, tuple[int, ...], int]:
        """(group, test domains, trial)."""
        return self.group, tuple(self.cfg["test_envs"]), int(self.cfg["trial_seed"])

    @property
    def val_acc(self) -> float:
        return float(self.summary["best"]["val_acc"])

    @property
    def test_acc(self) -> float:
        return float(self.summary["best"]["test_acc"])

    def loader(self, name: str = "best") -> Callable[[], StateDict]:
        """A lazy loader of one of the run's checkpoints (best / last / ma)."""
        path = self.path / f"{name}.safetensors"
        return lambda: load_file(str(path))


def load_runs(sweep_dir: str | Path, stage: str = "ft") -> list[Run]:
    """Every finished run of `stage` under `<sweep_dir>/runs`, in a stable order that depends on their configs only.

    Raises:
        SoupsError: no such directory, or no finished run of that stage.
    """
    runs_dir = Path(sweep_dir) / "runs"
    if not runs_dir.is_dir():
        raise SoupsError(f"sweep directory {sweep_dir} has no runs/ folder (run vision/sweep.py first)")
    runs = []
    for path in sorted(runs_dir.iterdir()):
        if path.name.startswith(".") or not (path / "summary.json").is_file():
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        if (cfg.get("tags") or {}).get("stage", "ft") != stage:  # type: ignore[union-attr]
            continue
        runs.append(Run(path, cfg, json.loads((path / "summary.json").read_text())))  # type: ignore[arg-type]
    if not runs:
        raise SoupsError(f"no finished {stage!r} run under {runs_dir}")
    # Order by content, not by the hashed directory name: the hash covers paths inside the sweep dir, so the same
    # sweep written elsewhere would list its runs in another order, and ties in validation accuracy (ERM pick,
    # greedy ranking) would then break differently.
    runs.sort(key=lambda r: (r.group, tuple(r.cfg["test_envs"]), int(r.cfg["trial_seed"]),
                             int(r.cfg.get("hparams_seed", 0)), json.dumps(r.cfg.get("tags") or {}, sort_keys=True),
                             r.path.name))  # fmt: skip
    return runs


# ----------------------------------------------------------------------------------------------------------
# Evaluation context: one dataset split and one resident model per (test domains, trial)
# ----------------------------------------------------------------------------------------------------------


class Context:
    """The splits and a resident model for one (test domains, trial); evaluates state dicts.

    Args:
        cfg: A run's config (dataset, model, test_envs, trial_seed).
        device: Where the model lives.
        bn: "average" or "recompute" (see module docstring).
        batch_size: Evaluation batch size.
    """

    def __init__(self, cfg: Mapping[str, Any], device: torch.device, bn: str = "average",
                 batch_size: int = 256) -> None:
        if bn not in BN_MODES:
            raise SoupsError(f"unknown bn mode {bn!r}; valid: {', '.join(BN_MODES)}")
        dataset = build_dataset(cfg, augment=False)
        splits = make_splits(dataset, list(cfg["test_envs"]), float(cfg["dataset"]["holdout_fraction"]),
                             int(cfg["trial_seed"]))
        self.sources, self.tests = splits.source_domains, splits.test_domains
        self.val_sets = [splits.out_splits[i] for i in self.sources]
        self.test_set: Dataset = ConcatDataset([splits.in_splits[i] for i in self.tests])
        self.train_set: Dataset = ConcatDataset([splits.in_splits[i] for i in self.sources])
        self.device, self.bn, self.batch_size = device, bn, batch_size
        self._skeleton = ({**cfg, "init": {"classifier": None, "featurizer": None}}, dataset)
        self.model: Classifier = self.fresh_model()
        self.labels = torch.cat([torch.as_tensor(y) for _, y in eval_batches(self.test_set, 1024)])
        self.evaluations = 0

    def fresh_model(self) -> Classifier:
        """A new instance of the runs' architecture (eval mode, on the device); weights to be loaded."""
        cfg, dataset = self._skeleton
        return build_classifier(cfg, dataset, dropout=0.0).to(self.device).eval()

    def load(self, state: Mapping[str, torch.Tensor]) -> Classifier:
        """Puts `state` into the resident model (strict), re-estimating BN statistics if `bn=recompute`."""
        self.model.load_state_dict(state, strict=True)
        if self.bn == "recompute":
            recompute_bn(self.model, self.train_set, self.device, self.batch_size)
        return self.model.eval()

    def val_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        """Mean source-domain validation accuracy of `state` (counted in `self.evaluations`)."""
        self.evaluations += 1
        model = self.load(state)
        return sum(accuracy(model, d, self.device, self.batch_size) for d in self.val_sets) / len(self.val_sets)

    def test_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        """Test-domain accuracy of `state` (the test domains' in splits, pooled)."""
        return accuracy(self.load(state), self.test_set, self.device, self.batch_size)

    @torch.no_grad()
    def test_logits(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits [N, K] on the test set."""
        model = self.load(state)
        return torch.cat([model(x.to(self.device)).float().cpu()
                          for x, _ in eval_batches(self.test_set, self.batch_size)])


@torch.no_grad()
def recompute_bn(model: Classifier, data: Dataset, device: torch.device, batch_size: int) -> None:
    """Re-estimates every BatchNorm's running statistics on `data` (cumulative average over one pass)."""
    from torch.optim.swa_utils import update_bn

    frozen = model.freeze_bn
    model.freeze_bn = False
    try:
        update_bn(DataLoader(data, batch_size=batch_size), model, device=device)
    finally:
        model.freeze_bn = frozen
        model.eval()


# ----------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------


def ensemble_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """ENS*: accuracy of the mean of the members' logits.

    Args:
        logits: [M, N, K] member logits.
        labels: [N].

    Returns:
        mean over n of [argmax_k (1/M) Σ_m logits[m, n, k] == labels[n]].
    """
    return float((logits.mean(0).argmax(-1) == labels).float().mean())


def diversity(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Ratio-error and Q-diversity (evals.diversity) of member predictions [M, N] against labels [N]."""
    from evals.diversity import q_diversity, ratio_error

    return {"ratio_error": ratio_error(preds, labels), "q_diversity": q_diversity(preds, labels)}


def lmc_curve(ctx: Context, a: Run, b: Run, points: int = 11) -> list[dict[str, float]]:
    """Test accuracy of (1 - λ) θ_a + λ θ_b for λ = 0, 1/(points-1), ..., 1 (Fig. 5.4).

    The two experts are held by one resident `soups.soup.Soup` (on a fresh copy of the architecture) whose
    weights are switched in place for every λ: both checkpoints are read once.
    """
    from soups.soup import Soup

    soup = Soup.from_checkpoints([a.path / "best.safetensors", b.path / "best.safetensors"], model=ctx.fresh_model(),
                                 device=ctx.device, progress=False)
    curve = []
    for k in range(points):
        lam = k / (points - 1)
        model = soup.set_weights([1.0 - lam, lam])
        if ctx.bn == "recompute":
            recompute_bn(model, ctx.train_set, ctx.device, ctx.batch_size)  # type: ignore[arg-type]
        curve.append({"lambda": lam, "test_acc": accuracy(model, ctx.test_set, ctx.device, ctx.batch_size)})
    return curve


def average_group(ctx: Context, runs: Sequence[Run], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """All methods for the M runs of one (group, test domains, trial). Returns {method: test_acc, ...}."""
    accept = str(cfg.get("accept", ">="))
    result: dict[str, Any] = {"n_members": len(runs)}
    erm = max(runs, key=lambda r: r.val_acc)
    result["erm"] = erm.test_acc
    result["member_mean"] = sum(r.test_acc for r in runs) / len(runs)
    with_ma = [r for r in runs if "ma" in r.summary]
    if with_ma:
        best_ma = max(with_ma, key=lambda r: r.summary["ma"]["val_acc"])
        result["ma"] = float(best_ma.summary["ma"]["test_acc"])
    logits = torch.stack([ctx.test_logits(r.loader()()) for r in runs])  # [M, N, K]
    result["ens"] = ensemble_accuracy(logits, ctx.labels)
    if len(runs) > 1:
        result.update(diversity(logits.argmax(-1), ctx.labels))
    result["uniform"] = ctx.test_acc(uniform_soup([r.loader() for r in runs], progress=False))
    before = ctx.evaluations
    greedy = greedy_soup([r.loader() for r in runs], [r.val_acc for r in runs], ctx.val_acc, accept=accept,
                         progress=False)
    result["greedy"] = ctx.test_acc(greedy.state_dict)
    result["greedy_members"] = len(greedy.selected)
    result["greedy_evaluations"] = ctx.evaluations - before
    result["wa_gain"] = result["uniform"] - result["member_mean"]
    return result


def pair_points(ctx: Context, runs: Sequence[Run], n_pairs: int, seed: int) -> list[dict[str, float]]:
    """Random member pairs: (ratio-error, Q-diversity, WA gain over the pair's mean accuracy) for Fig. 4.6."""
    pairs = [(i, j) for i in range(len(runs)) for j in range(i + 1, len(runs))]
    random.Random(seed).shuffle(pairs)
    points = []
    for i, j in pairs[:n_pairs]:
        states = [runs[i].loader()(), runs[j].loader()()]
        preds = torch.stack([ctx.test_logits(s).argmax(-1) for s in states])
        wa = ctx.test_acc(uniform_soup(states, progress=False))
        gain = wa - (runs[i].test_acc + runs[j].test_acc) / 2
        points.append({**diversity(preds, ctx.labels), "wa_gain": gain, "pair": [runs[i].path.name, runs[j].path.name]})
    return points


# ----------------------------------------------------------------------------------------------------------
# The whole sweep
# ----------------------------------------------------------------------------------------------------------


def average_sweep(sweep_dir: str | Path, cfg: Mapping[str, Any]) -> Path:
    """Writes `<sweep_dir>/average/{results,pairs,lmc}.jsonl` (atomically) and returns that directory."""
    # ---- set-up -------------------------------------------------------------------------------------------
    seed_everything(int(cfg.get("seed", 0)))
    sweep_dir = Path(sweep_dir)
    device = resolve_device(str(cfg.get("device", "auto")))
    runs = load_runs(sweep_dir)
    groups: dict[tuple[str, tuple[int, ...], int], list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.key].append(run)
    contexts: dict[tuple[tuple[int, ...], int], Context] = {}
    rows, pairs, curves = [], [], []

    # ---- loop over (group, test domains, trial) -----------------------------------------------------------
    for (group, envs, trial), members in tqdm(sorted(groups.items()), desc="averaging"):
        if (envs, trial) not in contexts:
            contexts[(envs, trial)] = Context(members[0].cfg, device, str(cfg.get("bn", "average")),
                                              int(cfg.get("batch_size", 256)))
        ctx = contexts[(envs, trial)]
        result = average_group(ctx, members, cfg)
        pooled = [r for (g, e, _), rs in groups.items() if g == group and e == envs for r in rs]
        if len({r.cfg["trial_seed"] for r in pooled}) > 1:
            result["dagger"] = ctx.test_acc(uniform_soup([r.loader() for r in pooled], progress=False))
            result["dagger_members"] = len(pooled)
        rows.append({"group": group, "test_envs": list(envs), "trial": trial,
                     "dataset": members[0].cfg["dataset"]["name"], "domains": members[0].summary.get("domains"),
                     **result})
        if int(cfg.get("n_pairs", 0)) > 0 and len(members) > 1:
            for p in pair_points(ctx, members, int(cfg["n_pairs"]), seed=trial):
                pairs.append({"group": group, "test_envs": list(envs), "trial": trial, **p})
        if cfg.get("lmc", True) and len(members) > 1:
            a, b = sorted(members, key=lambda r: -r.val_acc)[:2]
            curves.append({"group": group, "test_envs": list(envs), "trial": trial, "a": a.path.name,
                           "b": b.path.name, "curve": lmc_curve(ctx, a, b, int(cfg.get("lmc_points", 11)))})

    # ---- save ---------------------------------------------------------------------------------------------
    with atomic_dir(sweep_dir / "average", overwrite=True) as tmp:
        for name, items in (("results", rows), ("pairs", pairs), ("lmc", curves)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        save_resolved_config(dict(cfg), tmp)
    for row in rows:
        print(f"{row['group']:>14} env{row['test_envs']} trial {row['trial']}: erm {row['erm']:.4f} "
              f"mean {row['member_mean']:.4f} uniform {row['uniform']:.4f} greedy {row['greedy']:.4f} "
              f"ens {row['ens']:.4f}")
    return sweep_dir / "average"


def prepare_sweep(sweep_dir: str | Path, preset: str) -> None:
    """Runs the sweep recipe with experiment `preset` into `sweep_dir` (averaging off) unless it has runs.

    The sweep is launched as its own command (`python vision/sweep.py experiment=<preset> ...`), as a user would
    run it: the sweep calls this module's averaging, so calling the sweep back in process would make a circle.

    Raises:
        SoupsError: no such preset, or the sweep failed.
    """
    if list(Path(sweep_dir).glob("runs/*/summary.json")):
        return
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    preset_file = here.parent / "configs" / "vision_sweep" / "experiment" / f"{preset}.yaml"
    if not preset_file.is_file():
        raise SoupsError(f"no sweep preset {preset_file}")
    sweep_dir = Path(sweep_dir).absolute()
    # Hydra's own log goes into the sweep directory (no .hydra/ copy); nothing is written under the cwd.
    command = [sys.executable, str(here / "sweep.py"), f"experiment={preset}", f"output_dir={sweep_dir}",
               "average.enabled=false", f"hydra.run.dir={sweep_dir}", "hydra.output_subdir=null"]  # fmt: skip
    proc = subprocess.run(command, check=False)
    if proc.returncode != 0:
        raise SoupsError(f"preparing sweep {preset!r}: `{' '.join(command)}` failed (exit {proc.returncode})")


@entry("../configs/vision_average")
def main(cfg: DictConfig) -> None:
    if not cfg.sweep_dir:
        raise SoupsError("set sweep_dir=<a vision/sweep.py output_dir>")
    if cfg.get("prepare_sweep"):
        prepare_sweep(cfg.sweep_dir, str(cfg.prepare_sweep))
    out = average_sweep(cfg.sweep_dir, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    from vision.collect import collect

    collect(cfg.sweep_dir)
    print(f"averages -> {out}")


if __name__ == "__main__":
    main()
