"""The `diffusion` recipe of `python -m soups.quickstart`: rewarded soups of reward-weighted diffusion experts.

    python -m soups.quickstart task=diffusion
    python -m soups.quickstart task=diffusion experiment=smoke

The shared init is the tiny Stable-Diffusion-layout pipeline pre-trained on the embedded scenes
(`rl.diffusion.models.ensure_init`, in `<output_dir>/init/`, with `rl/train_diffusion.py`'s `init` settings plus
the task's `init` overrides); each expert (one per embedded reward: colourfulness, fidelity) and the MORL run
(`reward=morl`, μ = 0.5) is an RWR run from it (`rl/train_diffusion.py`), all sharing one cache of the first
generation round, so the init's images are generated and scored once. The front (`evaluator=diffusion`) mixes the
experts' UNets (`<run>/expert/`) on one resident UNet and writes `lambda_grid.png` beside `front.png`; the soup
stage writes a diffusers pipeline directory (`DiffusionPipeline.from_pretrained`). After the front, the conflict is
re-read from the per-image scores with a paired stderr (`<output_dir>/diffusion/conflict.json`). The task's
settings are `configs/quickstart/task/diffusion.yaml`.

Registered in `soups.quickstart_registry.RECIPES`; `TASK_MODULES` names this module. It imports no torch: the init
build is imported when the init stage runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soups.quickstart_registry import RECIPES, EntryPoint, Recipe, hydra_list

TRAIN_DIFFUSION = EntryPoint(config="train_diffusion", module="rl.train_diffusion", argv=("rl/train_diffusion.py",),
                             accelerate=True)  # fmt: skip
INIT_DIR = "init"
CACHE_DIR = "rwr_cache"  # round 0 of the init, shared by every expert and MORL run
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train_diffusion"


def _compose_train(overrides: Sequence[str]) -> Any:
    """`rl/train_diffusion.py`'s config composed with `overrides`, from inside the quickstart's own Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


def build_init(cfg: Any, directory: Path) -> Path:
    """Builds the shared init in `directory` (idempotent; an init built with other settings is refused or rebuilt by
    `ensure_init`): `rl/train_diffusion.py`'s `init` node with the task's `train` and `init` overrides."""
    from omegaconf import OmegaConf

    from rl.diffusion.models import ensure_init

    directory = Path(directory).absolute()
    train_cfg = _compose_train([*[str(o) for o in cfg.train], *[str(o) for o in cfg.init],
                                f"model.init_dir={directory}", f"init.seed={cfg.seed}"])  # fmt: skip
    return ensure_init(directory, OmegaConf.to_container(train_cfg.init, resolve=True))


def train_overrides(cfg: Any, reward: str, output: Path, weights: Sequence[float] | None = None) -> list[str]:
    """`rl/train_diffusion.py` overrides of one expert (`reward=<name>`) or the MORL run on the experts' rewards.

    Every run scores the same objectives (every expert's reward, so its `metrics.jsonl` traces its path in the
    front's plane) and shares one round-0 cache (`<output_dir>/rwr_cache`): the init's images are generated and scored
    once.

    Args:
        cfg: The quickstart config (`output_dir`, `seed`, `experts`, `objectives`: every run's reward.objectives,
            null for the reward configs' own, `init`, `train`: extra overrides of every run).
        reward: The expert's reward name (ignored for MORL).
        output: The run's output directory.
        weights: μ of a MORL run over `cfg.experts`; None for an expert.
    """
    from omegaconf import OmegaConf

    out = Path(cfg.output_dir).absolute()
    overrides = [f"reward={'morl' if weights is not None else reward}", f"output_dir={output}",
                 f"model.init_dir={out / INIT_DIR}", f"init.seed={cfg.seed}", f"rwr.cache_dir={out / CACHE_DIR}",
                 f"seed={cfg.seed}", "overwrite=true"]  # fmt: skip
    if cfg.get("objectives"):
        objectives = OmegaConf.to_container(cfg.objectives, resolve=True)
        overrides.append(f"reward.objectives={hydra_list(objectives)}")  # type: ignore[arg-type]
    if weights is not None:
        overrides.append(f"reward.weights={hydra_list([float(w) for w in weights])}")
    return [*overrides, *[str(o) for o in cfg.train], *[str(o) for o in cfg.init]]


def paired_conflict(scores_file: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """Each expert's margin over each other expert on its own reward, with the paired stderr.

    The front scores every point on the same prompts from the same initial latents, so image j of expert A and
    image j of expert B are a pair: the margin's paired stderr is std(s_A − s_B) / sqrt(n) (usually smaller than
    the unpaired sqrt(se_A² + se_B²) that the quickstart's closing lines use).

    Args:
        scores_file: The front's `sample_scores.jsonl` (written by the diffusion evaluator).
        names: The expert names (= their rewards).

    Returns:
        One {"expert", "rival", "objective", "margin", "paired_stderr", "unpaired_stderr", "ok_paired", "n"} per
        (expert, rival) pair.
    """
    rows = [json.loads(line) for line in scores_file.read_text().splitlines() if line.strip()]
    experts = {row["name"]: row["scores"] for row in rows if row["kind"] == "expert"}
    out = []
    for name in names:
        if name not in experts or name not in experts[name]:
            continue
        for rival in names:
            if rival == name or rival not in experts:
                continue
            own, other = experts[name][name], experts[rival][name]
            diff = [a - b for a, b in zip(own, other)]
            n = len(diff)
            margin = sum(diff) / n
            paired = _std(diff) / math.sqrt(n) if n > 1 else 0.0
            unpaired = math.sqrt(_std(own) ** 2 / len(own) + _std(other) ** 2 / len(other)) if n > 1 else 0.0
            out.append({"expert": name, "rival": rival, "objective": name, "margin": margin, "paired_stderr": paired,
                        "unpaired_stderr": unpaired, "ok_paired": margin > paired, "n": n})  # fmt: skip
    return out


def _std(values: Sequence[float]) -> float:
    """The unbiased sample standard deviation."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def after_front(cfg: Any, out: Path) -> dict[str, Any]:
    """The conflict with paired stderrs (`<out>/diffusion/conflict.json`), and where the contact sheet is."""
    from soups.utils import write_json

    front = Path(out) / "front"
    scores = front / "sample_scores.jsonl"
    if not scores.is_file():
        print(f"  no {scores}: the front was not scored by the diffusion evaluator", flush=True)
        return {}
    checks = paired_conflict(scores, [str(e) for e in cfg.experts])
    directory = Path(out) / "diffusion"
    directory.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"conflict": checks, "lambda_grid": str(front / "lambda_grid.png")}
    write_json(directory / "conflict.json", result)
    for check in checks:
        mark = "ok" if check["ok_paired"] else "NOT MET"
        print(f"  paired: expert {check['expert']} beats {check['rival']} on {check['objective']} by "
              f"{check['margin']:+.3f} (paired stderr {check['paired_stderr']:.3f}, unpaired "
              f"{check['unpaired_stderr']:.3f}, n={check['n']}): {mark}", flush=True)  # fmt: skip
    print(f"  contact sheet: {front / 'lambda_grid.png'}", flush=True)
    return result


def _mix(cfg: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """`python -m soups.mix` overrides of the soup stage: a diffusers pipeline directory on the shared init."""
    del cfg
    return ()


RECIPES.add(
    "diffusion",
    Recipe(name="diffusion", trainer=TRAIN_DIFFUSION, build_init=build_init, train_overrides=train_overrides,
           init_dir=INIT_DIR, init_label="shared init (tiny text-to-image pipeline pre-trained on the scenes)",
           expert_subdir="expert", done_file="soups_expert.json", mix_overrides=_mix(), after_front=after_front,
           soup_class="DiffusionPipeline", soup_done_file="model_index.json"),
)  # fmt: skip
