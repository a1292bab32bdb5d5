"""The task recipes of `python -m soups.quickstart`, and the registry they join.

The quickstart runs the same stages for every expert family: init -> experts -> MORL -> front -> soup. A recipe
says what is family-specific: which trainer entry point trains an expert or a MORL run (and how it is launched),
that run's overrides, and how the shared init is built. The front (`python -m soups.pareto`) and the soup
(`python -m soups.mix`) are the same for every family. A family registers its recipe from its own subpackage:

    from soups.quickstart_registry import RECIPES, EntryPoint, Recipe

    RECIPES.add("my_task", Recipe(name="my_task", trainer=EntryPoint("train_x", "rl.train_x", ("rl/train_x.py",)),
                                  build_init=..., train_overrides=...))

and names that module in `TASK_MODULES` below, so `get_recipe` imports it on first use (as
`soups.pareto_registry.EVALUATOR_MODULES` does): `soups` names the families' modules only as data. The task's
settings (experts, MORL weights, extra overrides, ...) are the Hydra group `configs/quickstart/task/<name>.yaml`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.errors import SoupsError  # soups.utils re-exports it but imports torch: recipes stay light
from soups.registry import Registry


@dataclass(frozen=True)
class EntryPoint:
    """How the quickstart runs one entry point (by name: nothing here imports it).

    Attributes:
        config: Its config dir under `configs/` (e.g. "train_ppo"); also the stage's entry name.
        module: The module whose Hydra `main` `launcher=inprocess` calls (e.g. "rl.train_ppo").
        argv: What follows `python` to run it as a subprocess: a script relative to the repository root
            (("rl/train_ppo.py",)) or ("-m", "soups.mix").
        accelerate: `launcher=accelerate` starts it with `accelerate launch` (training entry points).
    """

    config: str
    module: str
    argv: tuple[str, ...]
    accelerate: bool = False

    @property
    def shown(self) -> str:
        """The command as printed beside each stage, e.g. `python rl/train_ppo.py`."""
        return "python " + " ".join(self.argv)


@dataclass(frozen=True)
class Recipe:
    """One expert family's part of the quickstart.

    Attributes:
        name: The task name (`task=<name>`).
        trainer: The entry point that trains each expert and each MORL run.
        build_init: `build_init(cfg, directory)` builds the shared init in `directory` (idempotent: an existing
            complete init is kept).
        train_overrides: `train_overrides(cfg, objective, output, weights)` -> the trainer's overrides of the
            expert of `objective` (weights None) or of the MORL run on Σ μ_i R_i (weights μ), writing in `output`.
        init_dir: The init's directory under `output_dir` (also the front's `init` point).
        init_label: How the init stage is announced.
        expert_subdir: Where a training run's directory keeps the expert that the front and the soup mix.
        done_file: A file of `expert_subdir` whose presence marks a finished training run.
        mix_overrides: Extra `python -m soups.mix` overrides of the soup stage (adapters: written merged; full
            checkpoints need none, and soups.mix refuses LoRA options for them).
        after_front: `after_front(cfg, output_dir)`, the family's own outputs made from the trained experts once the
            front and the soup are done (e.g. captioning's uniform-soup table and λ-from-preference figures); None
            adds nothing.
        soup_class: The class that loads the written soup (named in the closing lines), e.g. a transformers class or
            diffusers' `DiffusionPipeline`.
        soup_done_file: The file whose presence in `soup/` marks the soup stage done (`model_index.json` for a
            diffusers pipeline).
        soup_loader: How a user loads the soup (the closing line), with `{path}` for its directory; empty means
            `<soup_class>.from_pretrained('{path}')`.
    """

    name: str
    trainer: EntryPoint
    build_init: Callable[[Any, Path], Any]
    train_overrides: Callable[[Any, str, Path, Sequence[float] | None], list[str]]
    init_dir: str = "init"
    init_label: str = "shared init"
    expert_subdir: str = "adapter"
    done_file: str = "adapter_config.json"
    mix_overrides: tuple[str, ...] = ("lora_output=merged",)
    after_front: Callable[[Any, Path], Any] | None = None
    soup_class: str = "AutoModelForCausalLM"
    soup_done_file: str = "config.json"
    soup_loader: str = ""


# The entry points every recipe shares: the front and the soup.
SOUPS_ENTRY_POINTS: dict[str, EntryPoint] = {
    "pareto": EntryPoint("pareto", "soups.pareto", ("-m", "soups.pareto")),
    "mix": EntryPoint("mix", "soups.mix", ("-m", "soups.mix")),
}

RECIPES: Registry[Recipe] = Registry("quickstart task")

# task name -> module whose import registers its recipe (imported lazily by `get_recipe`).
TASK_MODULES: dict[str, str] = {
    "captioning": "rl.captioning.quickstart",
    "diffusion": "rl.diffusion.quickstart",
    "locomotion": "rl.locomotion.quickstart",
    "summarisation": "rl.text.quickstart",
}


def get_recipe(name: str) -> Recipe:
    """The recipe of task `name`, importing the module that registers it if needed.

    Raises:
        SoupsError: `name` is not a known task (the message lists the valid ones), or its module fails to import.
    """
    name = str(name)
    if name not in RECIPES and name in TASK_MODULES:
        try:
            importlib.import_module(TASK_MODULES[name])
        except ImportError as err:
            raise SoupsError(f"quickstart task {name!r} needs module {TASK_MODULES[name]} which failed: {err}") from err
    if name not in RECIPES:
        valid = ", ".join(sorted(set(TASK_MODULES) | set(RECIPES.names())))
        raise SoupsError(f"unknown quickstart task {name!r}; valid tasks: {valid}")
    return RECIPES.get(name)


# ---------------------------------------------------------------------------------------------------------------
# Hydra override values (recipes build their trainer's overrides with these)
# ---------------------------------------------------------------------------------------------------------------


def hydra_list(values: Sequence[Any]) -> str:
    """A Hydra list override value: [a,b,c] (strings quoted when they hold Hydra-special characters)."""
    return "[" + ",".join(hydra_value(v) for v in values) + "]"


def hydra_value(value: Any) -> str:
    """A Hydra override value: strings quoted when needed, lists as [..], mappings as {k:v}, numbers as JSON."""
    if isinstance(value, str):
        return f"'{value}'" if any(c in value for c in " ,=[]{}'\":") else value
    if isinstance(value, Sequence):
        return hydra_list(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)
