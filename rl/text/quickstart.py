"""The `summarisation` recipe of `python -m soups.quickstart` (the default task): rewarded soups of text experts.

    python -m soups.quickstart task=summarisation

The shared init is a tiny LLaMA SFT-trained on imperfect summaries of the embedded task
(`rl.text.sft.ensure_sft_init`, in `<output_dir>/sft/`); each expert and each MORL run is a LoRA PPO run from it
(`rl/train_ppo.py reward=<reward>`, `reward=morl reward.weights=[μ]`) whose adapter (`<run>/adapter/`) the front
and the soup mix. The task's settings are `configs/quickstart/task/summarisation.yaml`.

Registered in `soups.quickstart_registry.RECIPES`; `soups.quickstart_registry.TASK_MODULES` names this module, so
importing it is all it takes. It imports no torch: the SFT build is imported when the init stage runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soups.quickstart_registry import RECIPES, EntryPoint, Recipe, hydra_list

TRAIN_PPO = EntryPoint(config="train_ppo", module="rl.train_ppo", argv=("rl/train_ppo.py",), accelerate=True)
SFT_DIR = "sft"


def build_init(cfg: Any, directory: Path) -> Path:
    """Builds the shared SFT init in `directory` from `cfg.sft` (`smoke`, `overrides`) and `cfg.seed`."""
    from omegaconf import OmegaConf

    from rl.text.sft import ensure_sft_init

    overrides = OmegaConf.to_container(cfg.sft.overrides, resolve=True) if cfg.sft.overrides else None
    return ensure_sft_init(directory, seed=cfg.seed, smoke=cfg.sft.smoke, overrides=overrides)


def train_overrides(cfg: Any, reward: str, output: Path, weights: Sequence[float] | None = None) -> list[str]:
    """`rl/train_ppo.py` overrides of one expert (`reward=<name>`) or one MORL run (`reward=morl`).

    Args:
        cfg: The quickstart config (`output_dir`, `seed`, `train`: extra overrides of every run).
        reward: The expert's reward name (ignored for MORL).
        output: The run's output directory.
        weights: μ of a MORL run; None for an expert.
    """
    overrides = [f"reward={'morl' if weights is not None else reward}", f"output_dir={output}",
                 f"model.name_or_path={Path(cfg.output_dir).absolute() / SFT_DIR}", f"seed={cfg.seed}",
                 "overwrite=true"]  # fmt: skip
    if weights is not None:
        overrides.append(f"reward.weights={hydra_list([float(w) for w in weights])}")
    return overrides + [str(o) for o in cfg.train]


RECIPES.add(
    "summarisation",
    Recipe(name="summarisation", trainer=TRAIN_PPO, build_init=build_init, train_overrides=train_overrides,
           init_dir=SFT_DIR, init_label="shared SFT init"),
)  # fmt: skip
