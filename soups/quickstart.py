"""`python -m soups.quickstart`: rewarded soups end to end, offline on CPU, dispatched over task recipes.

    python -m soups.quickstart                       # task=summarisation; ≈ 1 minute on 2 CPU cores, runs/quickstart/
    python -m soups.quickstart experiment=smoke      # seconds, for tests (learns nothing meaningful)
    python -m soups.quickstart task=<name>           # another expert family's recipe (an unknown name lists them)

`task=<name>` picks a recipe from `soups.quickstart_registry` (registered by the family's own subpackage, e.g.
`rl.text.quickstart` for `summarisation`, imported by name) and its settings from `configs/quickstart/task/`.
Stages (each skipped when its output exists, so an interrupted quickstart resumes where it stopped):

1. `<init>/`: the shared init (summarisation: `sft/`, a tiny LLaMA SFT-trained on imperfect summaries).
2. `experts/<reward>/`: one expert per reward from that init (summarisation: `rl/train_ppo.py reward=<reward>`).
3. `morl/mu<μ>/`: the MORL baseline on Σ μ_i R_i (summarisation: `rl/train_ppo.py reward=morl reward.weights=[μ]`).
4. `front/`: the rewarded-soups front against MORL and the init (`python -m soups.pareto ...`):
   front.jsonl, summary.json (hypervolumes, LMC gaps, EUM) and front.png.
5. `soup/`: one interpolated soup written as an ordinary HF checkpoint (`python -m soups.mix ...`).

Every stage runs the real entry point with the overrides printed beside it, so each line can be re-run by
hand. `launcher=inprocess` (default) calls the entry points' Hydra configs in this process (one import of
torch/transformers instead of four); `launcher=python` or `launcher=accelerate` runs each as a subprocess
(`accelerate launch` for training), writing its output to `logs/<stage>.log`. `launcher=submitit` sends every
stage after the init to `soups.launch.submit_runs` (SLURM with `submitit.cluster=slurm`, else local
subprocesses): the experts and MORL runs together, `submitit.array_parallelism` at once, logs beside each run
(`experts/<reward>.submitit/`); a pre-empted training job is requeued with `resume=true`.
"""

from __future__ import annotations

from soups.cli import entry, precheck

precheck(__name__, __file__, "../configs/quickstart")  # a bad command line fails here, before the heavy imports

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from soups.quickstart_registry import SOUPS_ENTRY_POINTS, EntryPoint, Recipe, get_recipe, hydra_list, hydra_value
from soups.utils import SoupsError, save_resolved_config, seed_everything

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIGS = REPO / "configs"
LAUNCHERS = ("inprocess", "python", "accelerate", "submitit")

# ---------------------------------------------------------------------------------------------------------------
# Stage commands (pure: overrides only)
# ---------------------------------------------------------------------------------------------------------------


def mu_name(weights: Sequence[float]) -> str:
    """The directory name of a MORL run: mu0.50 for μ = (0.5, 0.5), mu0.30-0.70 when the weights differ...

    Two objectives are named by μ_1 alone (μ_2 = 1 − μ_1): (0.3, 0.7) -> mu0.30.
    """
    if len(weights) == 2:
        return f"mu{float(weights[0]):.2f}"
    return "mu" + "-".join(f"{float(w):.2f}" for w in weights)


def recipe_of(cfg: DictConfig) -> Recipe:
    """The recipe of the config's task (`task=<name>`, configs/quickstart/task/<name>.yaml)."""
    return get_recipe(str(cfg.task))


def train_overrides(cfg: DictConfig, reward: str, output: Path, weights: Sequence[float] | None = None) -> list[str]:
    """The task trainer's overrides of one expert (objective `reward`) or one MORL run (`weights` μ)."""
    return list(recipe_of(cfg).train_overrides(cfg, reward, output, weights))


def pareto_overrides(
    cfg: DictConfig, experts: Sequence[Path], morl: Sequence[tuple[Path, Sequence[float]]]
) -> list[str]:
    """`python -m soups.pareto` overrides of the front: experts, MORL runs with their μ, init, trajectories."""
    recipe = recipe_of(cfg)
    out = Path(cfg.output_dir).absolute()
    sub = recipe.expert_subdir
    morl_entries = [{"path": str(p / sub), "name": f"MORL μ={float(w[0]):.2f}", "mu": [float(x) for x in w]}
                    for p, w in morl]  # fmt: skip
    runs = [str(p) for p in experts] + [str(p) for p, _ in morl]
    return [
        f"experts={hydra_list([str(p / sub) for p in experts])}",
        f"expert_names={hydra_list(list(cfg.experts))}",
        f"morl={hydra_value(morl_entries)}",
        f"init={out / recipe.init_dir}",
        f"trajectories={hydra_list(runs)}",
        f"output={out / 'front'}",
        "overwrite=true",
        f"seed={cfg.seed}",
    ] + [str(o) for o in cfg.pareto]


def mix_overrides(cfg: DictConfig, experts: Sequence[Path]) -> list[str]:
    """`python -m soups.mix` overrides writing one soup of the experts as a merged HF checkpoint."""
    out = Path(cfg.output_dir).absolute()
    recipe = recipe_of(cfg)
    sub = recipe.expert_subdir
    return [f"experts={hydra_list([str(p / sub) for p in experts])}",
            f"weights={hydra_list([float(w) for w in cfg.mix.weights])}", f"output={out / 'soup'}", "overwrite=true",
            *recipe.mix_overrides, "progress=false"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Running an entry point
# ---------------------------------------------------------------------------------------------------------------


def compose_entry(entry: str, overrides: Sequence[str]) -> DictConfig:
    """Composes `configs/<entry>/config.yaml` with `overrides`, from inside another Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO_CONFIGS / entry), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


def entry_point(entry: str | EntryPoint, recipe: Recipe | None = None) -> EntryPoint:
    """The entry point named `entry`: the front or the soup (shared), else the recipe's trainer."""
    if isinstance(entry, EntryPoint):
        return entry
    if entry in SOUPS_ENTRY_POINTS:
        return SOUPS_ENTRY_POINTS[entry]
    if recipe is not None and entry == recipe.trainer.config:
        return recipe.trainer
    known = sorted(SOUPS_ENTRY_POINTS) + ([recipe.trainer.config] if recipe is not None else [])
    raise SoupsError(f"quickstart: no entry point {entry!r}; known: {', '.join(known)}")


def _in_process(entry: str | EntryPoint, recipe: Recipe | None = None) -> Callable[[DictConfig], Any]:
    """The body of an entry point's Hydra main (below `@entry`), to call with a config."""
    import importlib
    import inspect

    return inspect.unwrap(importlib.import_module(entry_point(entry, recipe).module).main)


def run_entry(task: str, entry: str, overrides: Sequence[str]) -> None:
    """Runs entry point `entry` of task `task`'s recipe in this process (a `launcher=submitit` job's body)."""
    point = entry_point(entry, get_recipe(task))
    _in_process(point)(compose_entry(point.config, list(overrides)))


def stage_run(name: str, entry: str | EntryPoint, overrides: Sequence[str], cfg: DictConfig, output: Path,
              done_file: Path) -> Any:
    """The `soups.launch.Run` of one stage; a training entry point with a `resume` field requeues with
    `resume=true` (it continues from its newest valid checkpoint, or starts over when there is none)."""
    from soups.launch import Run

    point = entry_point(entry, recipe_of(cfg))
    args = (str(cfg.task), point.config, list(overrides))
    resume = None
    if point.accelerate and "resume" in compose_entry(point.config, overrides):
        resume = (str(cfg.task), point.config, [*overrides, "resume=true"])
    return Run(name=name, fn=run_entry, args=args, output=output, done_file=done_file, resume_args=resume)


def command(entry: EntryPoint, overrides: Sequence[str], launcher: str) -> list[str]:
    """The shell command of an entry point for `launcher` (python or accelerate)."""
    script = list(entry.argv) if entry.argv[0] == "-m" else [str(REPO / entry.argv[0]), *entry.argv[1:]]
    if launcher == "accelerate" and entry.accelerate:
        # The values accelerate otherwise defaults with a five-line warning (no `accelerate config` was run).
        flags = ["--num_processes=1", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
        return [sys.executable, "-m", "accelerate.commands.launch", *flags, *script, *overrides]
    return [sys.executable, *script, *overrides]


def run_stage(name: str, entry: str | EntryPoint, overrides: Sequence[str], cfg: DictConfig,
              output: Path | None = None, done_file: Path | None = None) -> float:
    """Runs one stage with the configured launcher; returns its wall time in seconds.

    Args:
        name: The stage's name (its log file's).
        entry: The entry point.
        overrides: Its overrides.
        cfg: The quickstart config.
        output: The stage's output directory (`launcher=submitit` puts its logs beside it).
        done_file: The file that marks the stage done (`launcher=submitit`).

    Raises:
        SoupsError: the stage failed (a subprocess's log tail is in the message's log file).
    """
    point = entry_point(entry, recipe_of(cfg))
    print(f"  $ {point.shown} {' '.join(shlex.quote(o) for o in overrides)}", flush=True)
    t0 = time.perf_counter()
    if cfg.launcher == "inprocess":
        _in_process(point)(compose_entry(point.config, overrides))
        return time.perf_counter() - t0
    if cfg.launcher not in LAUNCHERS:
        raise SoupsError(f"launcher={cfg.launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if cfg.launcher == "submitit":
        from soups.launch import submit_runs

        if output is None or done_file is None:
            raise SoupsError(f"quickstart stage {name}: launcher=submitit needs the stage's output and done file")
        submit_runs([stage_run(name, point, overrides, cfg, output, done_file)], cfg.submitit, desc=name)
        return time.perf_counter() - t0
    log = Path(cfg.output_dir).absolute() / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        proc = subprocess.run(command(point, overrides, cfg.launcher), stdout=handle, stderr=subprocess.STDOUT,
                              cwd=Path.cwd(), check=False)  # fmt: skip
    if proc.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise SoupsError(f"quickstart stage {name} failed (exit {proc.returncode}): {' '.join(tail)} — see {log}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def expert_checks(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str], names: Sequence[str]) -> list[dict]:
    """For each expert i (trained on objective i): does it beat every other expert on objective i by more than
    the combined standard error sqrt(se_i² + se_j²)?

    Args:
        rows: `front.jsonl` rows; expert rows are named after their reward.
        objectives: The objective names; expert `names[i]` is trained on the objective of the same name.
        names: The expert names.

    Returns:
        One {"expert", "objective", "margin", "stderr", "ok"} per (expert, rival) pair.
    """
    experts = {row["name"]: row for row in rows if row["kind"] == "expert"}
    checks = []
    for name in names:
        if name not in objectives or name not in experts:
            continue
        own = experts[name]["objectives"][name]
        for rival in names:
            if rival == name or rival not in experts:
                continue
            other = experts[rival]["objectives"][name]
            margin = own["mean"] - other["mean"]
            stderr = (own["stderr"] ** 2 + other["stderr"] ** 2) ** 0.5
            checks.append({"expert": name, "rival": rival, "objective": name, "margin": margin, "stderr": stderr,
                           "ok": margin > stderr})  # fmt: skip
    return checks


def report(front_dir: Path, names: Sequence[str], seconds: float) -> str:
    """The quickstart's closing table: where things are, expert rewards, hypervolumes, LMC gaps, checks."""
    rows = [json.loads(line) for line in (front_dir / "front.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((front_dir / "summary.json").read_text())
    objectives = summary["objectives"]
    width = max(len(r["name"]) for r in rows if r["kind"] in ("expert", "morl", "init")) + 2
    lines = [f"\nrewards on {rows[0]['n']} held-out prompts (mean ± stderr):",
             f"  {'point':<{width}}" + "".join(f"{o:>20}" for o in objectives)]  # fmt: skip
    for row in rows:
        if row["kind"] in ("expert", "morl", "init"):
            cells = "".join(f"{row['objectives'][o]['mean']:>11.3f} ± {row['objectives'][o]['stderr']:<6.3f}"
                            for o in objectives)  # fmt: skip
            lines.append(f"  {row['name']:<{width}}{cells}")
    hv = summary["hypervolume"]
    norm = summary["normalisation"]["mode"]
    lines.append(f"\nhypervolume ({norm}, reference {summary['reference_point']}): rewarded soups {hv['rs']:.4f}"
                 + (f"  vs  MORL {hv['morl']:.4f}" if "morl" in hv else ""))  # fmt: skip
    lmc = summary["lmc"]
    if lmc["rows"]:
        gaps = ", ".join(f"{o} {lmc['min_gap'][o]:+.3f}/{lmc['mean_gap'][o]:+.3f}" for o in objectives)
        lines.append(f"LMC gaps R(θ_λ) − Σλ_i R(θ_i) (min/mean): {gaps}; "
                     f"{100 * lmc['fraction_nonnegative']:.0f}% ≥ 0")  # fmt: skip
    for check in expert_checks(rows, objectives, names):
        mark = "ok" if check["ok"] else "NOT MET"
        lines.append(f"expert {check['expert']} beats {check['rival']} on {check['objective']} by "
                     f"{check['margin']:+.3f} (stderr {check['stderr']:.3f}): {mark}")  # fmt: skip
    lines += [f"\nplot:    {front_dir / 'front.png'}", f"summary: {front_dir / 'summary.json'}",
              f"front:   {front_dir / 'front.jsonl'}", f"total {seconds / 60:.1f} min"]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def run_quickstart(cfg: DictConfig) -> Path:
    """Runs the stages of `cfg` (configs/quickstart/config.yaml), skipping finished ones; returns the front dir."""
    # ---- set-up ------------------------------------------------------------------------------------------------
    recipe = recipe_of(cfg)  # an unknown task fails here, before anything is written
    if cfg.launcher not in LAUNCHERS:  # and so does an unknown launcher
        raise SoupsError(f"launcher={cfg.launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if cfg.launcher == "submitit":
        from omegaconf import OmegaConf

        from soups.launch import settings

        settings(OmegaConf.to_container(cfg.submitit, resolve=True))  # type: ignore[arg-type]
    out = Path(cfg.output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out, name="quickstart.yaml")
    seed_everything(cfg.seed)
    if len(cfg.experts) < 2:
        raise SoupsError(f"quickstart needs at least 2 expert rewards, got {list(cfg.experts)}")
    experts = [out / "experts" / str(reward) for reward in cfg.experts]
    morl = [(out / "morl" / mu_name(w), [float(x) for x in w]) for w in cfg.morl]
    t0 = time.perf_counter()
    n_stages = 3 + len(experts) + len(morl)

    # ---- 1. shared init ----------------------------------------------------------------------------------------
    print(f"[1/{n_stages}] {recipe.init_label} -> {out / recipe.init_dir}", flush=True)
    recipe.build_init(cfg, out / recipe.init_dir)

    # ---- 2-3. experts and MORL runs (the task's trainer, from the shared init) ---------------------------------
    stage = 1
    jobs = [(f"expert_{r}", d, str(r), None) for r, d in zip(cfg.experts, experts)]
    jobs += [(f"morl_{d.name}", d, "morl", w) for d, w in morl]
    runs = []  # launcher=submitit: every unfinished training run, submitted together
    for name, directory, reward, weights in jobs:
        stage += 1
        done = directory / recipe.expert_subdir / recipe.done_file
        if done.is_file():
            print(f"[{stage}/{n_stages}] {name}: done, reusing {directory / recipe.expert_subdir}", flush=True)
            continue
        print(f"[{stage}/{n_stages}] {name} -> {directory}", flush=True)
        overrides = train_overrides(cfg, reward, directory, weights)
        if cfg.launcher == "submitit":
            print(f"  $ {recipe.trainer.shown} {' '.join(shlex.quote(o) for o in overrides)}", flush=True)
            runs.append(stage_run(name, recipe.trainer, overrides, cfg, directory, done))
        else:
            run_stage(name, recipe.trainer, overrides, cfg)
    if runs:
        from soups.launch import submit_runs

        counts = submit_runs(runs, cfg.submitit, desc="training runs")
        print(f"  submitit: {counts['ran']} training run(s) finished", flush=True)

    # ---- 4. the front ------------------------------------------------------------------------------------------
    stage += 1
    front = out / "front"
    if (front / "summary.json").is_file():
        print(f"[{stage}/{n_stages}] front: done, reusing {front} (delete it to re-evaluate)", flush=True)
    else:
        print(f"[{stage}/{n_stages}] rewarded-soups front vs MORL -> {front}", flush=True)
        run_stage("front", "pareto", pareto_overrides(cfg, experts, morl), cfg, front, front / "summary.json")

    # ---- 5. one soup as an HF checkpoint -----------------------------------------------------------------------
    stage += 1
    soup = out / "soup"
    if not cfg.mix.enabled:
        print(f"[{stage}/{n_stages}] soup checkpoint: skipped (mix.enabled=false)", flush=True)
    elif (soup / recipe.soup_done_file).is_file():
        print(f"[{stage}/{n_stages}] soup checkpoint: done, reusing {soup}", flush=True)
    else:
        print(f"[{stage}/{n_stages}] soup λ={list(cfg.mix.weights)} as a {recipe.soup_class} checkpoint -> {soup}",
              flush=True)  # fmt: skip
        run_stage("soup", "mix", mix_overrides(cfg, experts), cfg, soup, soup / recipe.soup_done_file)

    # ---- the family's own outputs (figures, tables), from the experts, the front and the soup -------------------
    if recipe.after_front is not None:
        print(f"[+] {recipe.name}: the family's own tables and figures", flush=True)
        recipe.after_front(cfg, out)

    # ---- report ------------------------------------------------------------------------------------------------
    print(report(front, [str(r) for r in cfg.experts], time.perf_counter() - t0))
    if cfg.mix.enabled:
        loader = recipe.soup_loader or f"{recipe.soup_class}.from_pretrained('{{path}}')"
        print(f"soup:    {soup}  ({loader.format(path=soup)})")
    return front


@entry("../configs/quickstart")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m soups.quickstart`."""
    run_quickstart(cfg)


if __name__ == "__main__":
    main()
