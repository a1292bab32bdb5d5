"""`python vision/sweep.py`: the DomainBed / DiWA / ratatouille sweep, idempotent and resumable.

    python vision/sweep.py experiment=domainbed dataset.data_dir=/data/domainbed   # 20 hparams x 3 trials x 4 envs
    python vision/sweep.py experiment=rotated_digits                              # offline CPU demo, minutes
    python vision/sweep.py experiment=smoke

Stages (each a list of `vision/train.py` jobs; a job's directory is `runs/<md5 of its config>`):
1. `pretrain` (optional, digits demos only): one run whose featurizer replaces `model.pretrained` (the role
   ImageNet plays for DomainBed);
2. `ratatouille.aux`: auxiliary fine-tunes of the pre-trained model on other datasets / domains;
   `fusing`: the uniform average of their featurizers (through `soups.selection.uniform_soup`);
3. `lp`: per (test domain, trial), a linear probe of the pre-trained featurizer on the source domains: the
   shared head (`classifier_init=lp`); with `classifier_init=random` every run draws its own head;
4. fine-tunes: for every group (`diwa`, `ratatouille`, `inter_training`, `fusing`), test domain, trial and
   hyper-parameter seed 0..n_hparams-1. Objectives cycle over `objectives` by hparams seed (Table 4.4);
   ratatouille run s starts from auxiliary featurizer s % (n_aux + 1) (0 = the pre-trained one).
Then `vision.average` builds the soups and baselines and `vision.collect` the tables (`average.enabled`).

Idempotence: a run directory appears only when its run finished (atomic rename), so finished runs are skipped,
leftovers of killed runs (`.<hash>.tmp-*`) are removed, and re-running an interrupted sweep redoes only the
runs that had not finished. Launchers: `local` (in this process, sequential: one import of torch, the cheapest
for the CPU demos and the tests) and `submitit` (`soups.launch.submit_runs`: SLURM job arrays on a cluster, or
local subprocesses, `submitit.array_parallelism` at once or one per GPU; failed runs are listed and re-running
the command resubmits only them; logs in `runs/<hash>.submitit/`). The former `parallel` and `gpus` launchers
are `launcher=submitit` with `submitit.cluster=local` (and `submitit.local_gpus`).
"""

from __future__ import annotations

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/vision_sweep")  # a bad command line fails here, before the heavy imports

import hashlib
import importlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from soups.utils import SoupsError, write_json
from vision.evaluate import build_dataset

# The recipes this driver launches, by module name: recipes do not import recipes. `train` runs a job in this
# process (`launcher=local`; `launcher=submitit` runs the same function in a job's interpreter) and
# `average_sweep` the averaging at the end. vision/average.py never calls the sweep back in process.
RECIPES = {"train": "vision.train", "average": "vision.average"}
TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vision_train" / "config.yaml"
# Fields that do not change a run's result, left out of its hash.
_NOT_HASHED = ("output", "overwrite", "progress", "num_workers", "device", "log_with")
GROUPS = ("diwa", "ratatouille", "inter_training", "fusing")
LAUNCHERS = ("local", "submitit")

# ----------------------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------------------


def base_train_config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """configs/vision_train/config.yaml (without Hydra's defaults list) merged with `overrides`."""
    base = OmegaConf.load(TRAIN_CONFIG)
    base.pop("defaults", None)
    base.output = None
    merged = OmegaConf.merge(base, OmegaConf.create(dict(overrides or {})))
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def merge(base: Mapping[str, Any], *updates: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of plain dicts (later wins)."""
    cfg = OmegaConf.merge(OmegaConf.create(dict(base)), *[OmegaConf.create(dict(u)) for u in updates])
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def stage_job(base: Mapping[str, Any], overrides: Mapping[str, Any], *more: Mapping[str, Any]) -> dict[str, Any]:
    """A pretrain / auxiliary job: `base` with `overrides`, where a `dataset` override REPLACES the target's
    dataset node (on top of the train config's defaults), so target options (angles, ...) do not leak into it."""
    overrides = dict(overrides)
    job = dict(base)
    if "dataset" in overrides:
        job["dataset"] = merge(base_train_config(None)["dataset"], overrides.pop("dataset"))
    return merge(job, overrides, *more)


def train(job: Mapping[str, Any]) -> Path:
    """Runs one job of the train recipe in this process (its plain `train(cfg)`, without Hydra)."""
    return importlib.import_module(RECIPES["train"]).train(job)


def job_hash(job: Mapping[str, Any]) -> str:
    """md5 of the job's config without the fields that do not change its result (DomainBed's run naming)."""
    kept = {k: v for k, v in job.items() if k not in _NOT_HASHED}
    return hashlib.md5(json.dumps(kept, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def with_output(job: dict[str, Any], runs_dir: Path) -> dict[str, Any]:
    """Sets `output` to `<runs_dir>/<hash>`."""
    job = dict(job)
    job["output"] = str(runs_dir / job_hash(job))
    return job


def is_done(job: Mapping[str, Any]) -> bool:
    """A run is finished iff its directory holds `summary.json` (directories appear atomically when done)."""
    return (Path(job["output"]) / "summary.json").is_file()


def clean_stale(runs_dir: Path) -> list[Path]:
    """Removes temporary directories of runs that were killed mid-way (`.<hash>.tmp-*`); returns them."""
    stale = sorted(runs_dir.glob(".*.tmp-*")) if runs_dir.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_test_envs(cfg: DictConfig, train_base: Mapping[str, Any]) -> list[list[int]]:
    """`test_envs` as a list of lists; null = leave-one-domain-out over every domain of the dataset."""
    if cfg.test_envs is not None:
        return [list(t) if isinstance(t, Sequence) else [int(t)] for t in cfg.test_envs]
    n = len(build_dataset({**train_base, "test_envs": []}, augment=False).domains)
    return [[i] for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def run_jobs(jobs: Sequence[dict[str, Any]], launcher: str, submitit: Mapping[str, Any] | None = None,
             desc: str = "runs") -> dict[str, int]:
    """Runs every unfinished job; finished ones are skipped.

    Args:
        jobs: Train configs with `output` set (see `with_output`).
        launcher: "local" (sequential, in process) or "submitit" (`soups.launch.submit_runs`).
        submitit: The `submitit:` config node for "submitit" (cluster, array_parallelism, SLURM fields...).
        desc: Progress bar label.

    Returns:
        {"done": already finished, "ran": newly run}.

    Raises:
        SoupsError: unknown launcher, or (submitit) some runs failed, listed with their logs; all others still ran.
    """
    if launcher not in LAUNCHERS:
        raise SoupsError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if launcher == "submitit":
        from soups.launch import Run, submit_runs

        fn = importlib.import_module(RECIPES["train"]).train  # by reference: the job imports vision.train itself
        runs = [Run(name=f"{desc} {Path(j['output']).name[:8]}", fn=fn, args=({**j, "progress": False},),
                    output=Path(j["output"]), done_file=Path(j["output"]) / "summary.json") for j in jobs]
        return submit_runs(runs, submitit, desc=desc)
    todo = [j for j in jobs if not is_done(j)]
    counts = {"done": len(jobs) - len(todo), "ran": 0}
    for job in tqdm(todo, desc=desc, disable=not todo):
        train({**job, "progress": False})
        counts["ran"] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------


def plan_finetunes(cfg: DictConfig, base: Mapping[str, Any], test_envs: list[list[int]], lp_dirs: Mapping,
                   aux_dirs: Sequence[str], fused: str | None, runs_dir: Path) -> list[dict[str, Any]]:
    """The fine-tuning jobs of every group x test domain x trial x hparams seed."""
    objectives = list(cfg.objectives)
    jobs = []
    for group in cfg.groups:
        if group not in GROUPS:
            raise SoupsError(f"unknown sweep group {group!r}; valid: {', '.join(GROUPS)}")
        if group != "diwa" and not aux_dirs:
            raise SoupsError(f"group {group!r} needs ratatouille.aux (auxiliary tasks); none configured")
        for envs in test_envs:
            for trial in range(int(cfg.n_trials)):
                for hseed in range(int(cfg.n_hparams)):
                    featurizer = None
                    aux_index = 0
                    if group == "ratatouille":
                        aux_index = hseed % (len(aux_dirs) + 1)
                        featurizer = aux_dirs[aux_index - 1] if aux_index else None
                    elif group == "inter_training":
                        aux_index = int(cfg.ratatouille.inter_training_aux)
                        featurizer = aux_dirs[aux_index - 1]
                    elif group == "fusing":
                        featurizer = fused
                    job = merge(base, {
                        "test_envs": envs, "trial_seed": trial, "hparams_seed": hseed,
                        "hparams_space": cfg.hparams_space, "objective": objectives[hseed % len(objectives)],
                        "init": {"classifier": lp_dirs.get((tuple(envs), trial)), "featurizer": featurizer},
                        "tags": {"stage": "ft", "group": group, "aux": aux_index},
                    })
                    jobs.append(with_output(job, runs_dir))
    return jobs


def run_sweep(cfg: DictConfig) -> Path:
    """Runs (or resumes) the sweep described by `cfg` (configs/vision_sweep/config.yaml); returns its dir."""
    # ---- set-up -------------------------------------------------------------------------------------------
    if cfg.launcher not in LAUNCHERS:  # before anything is written
        raise SoupsError(f"unknown launcher {cfg.launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if cfg.launcher == "submitit":
        from soups.launch import settings

        settings(OmegaConf.to_container(cfg.submitit, resolve=True))  # type: ignore[arg-type]
    out = Path(cfg.output_dir).absolute()
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    stale = clean_stale(runs_dir)
    if stale:
        print(f"removed {len(stale)} unfinished run(s) left by an interrupted sweep")
    base = base_train_config(OmegaConf.to_container(cfg.train, resolve=True))  # type: ignore[arg-type]
    base["tags"] = {}
    launch = {"launcher": cfg.launcher, "submitit": OmegaConf.to_container(cfg.submitit, resolve=True)}
    counts: dict[str, dict[str, int]] = {}

    # ---- stage 1: pre-training (digits demos) -----------------------------------------------------------------
    if cfg.pretrain.enabled:
        job = with_output(stage_job(base, OmegaConf.to_container(cfg.pretrain.train, resolve=True),
                                    {"tags": {"stage": "pretrain"}}), runs_dir)
        counts["pretrain"] = run_jobs([job], **launch, desc="pretrain")
        base["model"]["pretrained"] = str(Path(job["output"]) / "last.safetensors")

    # ---- stage 2: auxiliary fine-tunes and their fused featurizer (ratatouille) ---------------------------
    aux_dirs: list[str] = []
    aux_jobs = []
    for i, aux in enumerate(cfg.ratatouille.aux or []):
        defaults = {"hparams_space": "default", "hparams_seed": 0, "objective": "ERM",
                    "init": {"classifier": None, "featurizer": None}}
        job = stage_job(merge(base, defaults), OmegaConf.to_container(aux.train, resolve=True),
                        {"tags": {"stage": "aux", "aux": i + 1}})
        aux_jobs.append(with_output(job, runs_dir))
        aux_dirs.append(str(Path(aux_jobs[-1]["output"]) / "last.safetensors"))
    if aux_jobs:
        counts["aux"] = run_jobs(aux_jobs, **launch, desc="auxiliary fine-tunes")
    fused = fuse_featurizers(aux_dirs, out / "fused" / "featurizer.safetensors") if "fusing" in cfg.groups else None

    # ---- stage 3: linear probes (the shared head) ---------------------------------------------------------
    test_envs = resolve_test_envs(cfg, base)
    lp_dirs: dict[tuple[tuple[int, ...], int], str | None] = {}
    lp_jobs = []
    for envs in test_envs:
        for trial in range(int(cfg.n_trials)):
            if cfg.classifier_init == "lp":
                job = merge(base, {"test_envs": envs, "trial_seed": trial, "hparams_space": "default",
                                   "hparams_seed": 0, "objective": "ERM", "freeze_featurizer": True,
                                   "init": {"classifier": None, "featurizer": None}, "tags": {"stage": "lp"}},
                            OmegaConf.to_container(cfg.lp.train, resolve=True))
                lp_jobs.append(with_output(job, runs_dir))
                lp_dirs[(tuple(envs), trial)] = str(Path(lp_jobs[-1]["output"]) / "last.safetensors")
            elif cfg.classifier_init == "random":
                lp_dirs[(tuple(envs), trial)] = None
            else:
                raise SoupsError(f"classifier_init={cfg.classifier_init!r}; valid: lp, random")
    if lp_jobs:
        counts["lp"] = run_jobs(lp_jobs, **launch, desc="linear probes")

    # ---- stage 4: fine-tunes ------------------------------------------------------------------------------
    ft_jobs = plan_finetunes(cfg, base, test_envs, lp_dirs, aux_dirs, fused, runs_dir)
    counts["ft"] = run_jobs(ft_jobs, **launch, desc="fine-tunes")
    write_json(out / "sweep.json", {"counts": counts, "runs": [j["output"] for j in ft_jobs],
                                    "aux": aux_dirs, "fused": fused, "lp": sorted(set(filter(None, lp_dirs.values())))})
    print(f"sweep {out}: " + ", ".join(f"{k} {v['ran']} ran / {v['done']} already done" for k, v in counts.items()))

    # ---- averaging and tables -----------------------------------------------------------------------------
    if cfg.average.enabled:
        from vision.collect import collect

        average_sweep = importlib.import_module(RECIPES["average"]).average_sweep
        average_sweep(out, OmegaConf.to_container(cfg.average, resolve=True))  # type: ignore[arg-type]
        collect(out)
    return out


def fuse_featurizers(paths: Sequence[str], target: Path) -> str:
    """Fusing's init: the uniform average of the auxiliary featurizers (`featurizer.*` keys), written once."""
    if target.is_file():
        return str(target)
    from safetensors.torch import load_file, save_file

    from soups.selection import uniform_soup
    from soups.utils import atomic_dir

    def loader(path: str) -> Any:
        return lambda: {k: v for k, v in load_file(path).items() if k.startswith("featurizer.")}

    state = uniform_soup([loader(p) for p in paths], progress=False)
    with atomic_dir(target.parent, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / target.name))
        write_json(tmp / "fused.json", {"ingredients": list(paths), "weights": [1 / len(paths)] * len(paths)})
    return str(target)


@entry("../configs/vision_sweep")
def main(cfg: DictConfig) -> None:
    run_sweep(cfg)


if __name__ == "__main__":
    main()
