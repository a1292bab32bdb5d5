"""The `locomotion` recipe of `python -m soups.quickstart`: rewarded soups of Brax PPO experts (thesis §6.3.4).

    python -m soups.quickstart task=locomotion
    python -m soups.quickstart task=locomotion experiment=smoke

The shared init is a short `rl/train_brax.py` run on the MORL reward α = 0.5 (`<output_dir>/init/`, its policy in
`init/policy/`); each expert (`reward=risky`, α = 0; `reward=cautious`, α = 1) and each MORL run continues from it
with `restore_params` and the init's frozen normaliser, and the front (`evaluator=brax`) and the soup mix their
`<run>/policy/`; `rollouts/*.html` shows the experts and the soup. The task's settings are
`configs/quickstart/task/locomotion.yaml`.

Registered in `soups.quickstart_registry.RECIPES`; `TASK_MODULES` names this module. It imports no jax: the
trainer is imported when the init stage runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soups.quickstart_registry import RECIPES, EntryPoint, Recipe, hydra_list

TRAIN_BRAX = EntryPoint(config="train_brax", module="rl.train_brax", argv=("rl/train_brax.py",))
INIT_DIR = "init/policy"  # the front's init point: the init run's policy directory
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train_brax"


def build_init(cfg: Any, directory: Path) -> Path:
    """Trains the shared init (`rl/train_brax.py reward=morl` at the task's `init_weights`, plus the task's `init`
    overrides) so that its policy lands in `directory`; an existing policy there is kept."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from rl.locomotion.models import META_FILE

    directory = Path(directory).absolute()
    if (directory / META_FILE).is_file():
        return directory
    overrides = ["reward=morl", f"reward.weights={hydra_list([float(w) for w in cfg.init_weights])}",
                 f"output_dir={directory.parent}", f"seed={cfg.seed}", "overwrite=true",
                 *[str(o) for o in cfg.train], *[str(o) for o in cfg.init]]  # fmt: skip
    backup = get_gh_backup()  # composed from inside the quickstart's own Hydra app
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            train_cfg = compose("config", overrides=overrides)
    finally:
        restore_gh_from_backup(backup)
    from rl.locomotion.trainer import train

    return train(train_cfg)


def train_overrides(cfg: Any, reward: str, output: Path, weights: Sequence[float] | None = None) -> list[str]:
    """`rl/train_brax.py` overrides of one expert (`reward=risky|cautious`) or one MORL run (`reward=morl`, μ over
    the experts' rewards), continuing from the shared init.

    Args:
        cfg: The quickstart config (`output_dir`, `seed`, `experts`, `train`: extra overrides of every run).
        reward: The expert's reward name (ignored for MORL).
        output: The run's output directory.
        weights: μ of a MORL run over `cfg.experts`; None for an expert.
    """
    init = Path(cfg.output_dir).absolute() / INIT_DIR
    overrides = [f"reward={'morl' if weights is not None else reward}", f"output_dir={output}", f"init={init}",
                 f"seed={cfg.seed}", "overwrite=true"]  # fmt: skip
    if weights is not None:
        from rl.locomotion.rewards import ALPHAS

        overrides += [f"reward.alphas={hydra_list([ALPHAS[str(e)] for e in cfg.experts])}",
                      f"reward.weights={hydra_list([float(w) for w in weights])}"]  # fmt: skip
    return overrides + [str(o) for o in cfg.train]


def after_front(cfg: Any, out: Path) -> Any:
    """HTML and GIF rollouts of the experts and the λ soup (`rl.locomotion.rollouts`), in `<output_dir>/rollouts/`."""
    from rl.locomotion.rollouts import quickstart_rollouts

    return quickstart_rollouts(cfg, out)


RECIPES.add(
    "locomotion",
    Recipe(name="locomotion", trainer=TRAIN_BRAX, build_init=build_init, train_overrides=train_overrides,
           init_dir=INIT_DIR, init_label="shared init (brax PPO on α = 0.5, short)", expert_subdir="policy",
           done_file="brax_policy.json", mix_overrides=(), after_front=after_front, soup_class="Brax policy",
           soup_done_file="brax_policy.json", soup_loader="rl.locomotion.models.load_policy('{path}')"),
)  # fmt: skip
