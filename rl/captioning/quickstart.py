"""The `captioning` recipe of `python -m soups.quickstart`: rewarded soups of SCST captioning experts.

    python -m soups.quickstart task=captioning
    python -m soups.quickstart task=captioning experiment=smoke

The shared init is the tiny ViT + GPT-2 captioner cross-entropy-trained on the embedded scenes
(`rl.captioning.xe.ensure_xe_init`, in `<output_dir>/init/`, with `rl/train_captioning.py`'s settings plus the
task's `init` overrides); each expert and each MORL run is an SCST run from it (`rl/train_captioning.py
reward=<metric>`, `reward=morl reward.objectives=[experts] reward.weights=[μ]`) whose full captioner (`<run>/model/`)
the front (`evaluator=captioning`) and the soup mix. The task's settings are `configs/quickstart/task/captioning.yaml`.

Registered in `soups.quickstart_registry.RECIPES`; `TASK_MODULES` names this module. It imports no torch: the XE
build is imported when the init stage runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soups.quickstart_registry import RECIPES, EntryPoint, Recipe, hydra_list

TRAIN_CAPTIONING = EntryPoint(config="train_captioning", module="rl.train_captioning",
                              argv=("rl/train_captioning.py",), accelerate=True)  # fmt: skip
INIT_DIR = "init"
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train_captioning"


def build_init(cfg: Any, directory: Path) -> Path:
    """Builds the shared XE init in `directory` (idempotent): `rl/train_captioning.py`'s config composed with the
    task's `init` overrides, seeded by `cfg.seed`."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from rl.captioning.xe import ensure_xe_init

    overrides = [str(o) for o in cfg.init] + [f"model.init_dir={Path(directory).absolute()}",
                                             f"model.init_seed={cfg.seed}"]  # fmt: skip
    backup = get_gh_backup()  # composed from inside the quickstart's own Hydra app
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            train_cfg = compose("config", overrides=overrides)
    finally:
        restore_gh_from_backup(backup)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ensure_xe_init(train_cfg, device=device, progress=bool(train_cfg.logging.progress_bar))


def train_overrides(cfg: Any, reward: str, output: Path, weights: Sequence[float] | None = None) -> list[str]:
    """`rl/train_captioning.py` overrides of one expert (`reward=<metric>`) or one MORL run on the experts' metrics.

    Args:
        cfg: The quickstart config (`output_dir`, `seed`, `experts`, `train`: extra overrides of every run).
        reward: The expert's metric (ignored for MORL).
        output: The run's output directory.
        weights: μ of a MORL run over `cfg.experts`; None for an expert.
    """
    overrides = [f"reward={'morl' if weights is not None else reward}", f"output_dir={output}",
                 f"model.name_or_path={Path(cfg.output_dir).absolute() / INIT_DIR}", f"seed={cfg.seed}",
                 "overwrite=true"]  # fmt: skip
    if weights is not None:  # objectives of weight 0 are left out: nothing to compute (METEOR is slow)
        kept = [(str(e), float(w)) for e, w in zip(cfg.experts, weights) if float(w) > 0]
        overrides += [f"reward.objectives={hydra_list([e for e, _ in kept])}",
                      f"reward.weights={hydra_list([w for _, w in kept])}"]  # fmt: skip
    return overrides + [str(o) for o in cfg.train]


def after_front(cfg: Any, out: Path) -> Any:
    """The uniform-soup table, HV RS vs MORL on the BLEU1–ROUGE-L pair, Fig. 6.4(a)/(b) (`rl.captioning.figures`)."""
    from rl.captioning.figures import after_front as run

    return run(cfg, out)


RECIPES.add(
    "captioning",
    Recipe(name="captioning", trainer=TRAIN_CAPTIONING, build_init=build_init, train_overrides=train_overrides,
           init_dir=INIT_DIR, init_label="shared XE init (tiny ViT + GPT-2 captioner)", expert_subdir="model",
           done_file="train_summary.json", mix_overrides=(), after_front=after_front,
           soup_class="VisionEncoderDecoderModel"),
)  # fmt: skip
