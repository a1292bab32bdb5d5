"""The evaluator interface of `python -m soups.pareto`, and the registry evaluators join.

An evaluator scores one model on every objective of a task. `soups.pareto` builds it ONCE from its config,
then calls `evaluate(model)` for every λ after switching the resident model's weights with a `Soup`. Tasks
(text RLHF, vision domains, Brax, diffusion, captioning) plug in by registering a builder:

    from soups.pareto_registry import EVALUATORS, ObjectiveStat

    @EVALUATORS.register("my_task")
    def build_my_task(cfg, *, experts, device):
        return MyEvaluator(...)          # has .objectives and .evaluate(model)

The builder receives the `evaluator` config node (its `name` field selects the builder; every other field is
the builder's own), the expert paths (to read a tokenizer or a base config from the first one) and the
device of the resident model. The module that registers must be imported for its name to exist: list it in
`EVALUATOR_MODULES` below, so `build_evaluator` imports it lazily (and a missing optional extra, e.g. vision
deps, only breaks that one evaluator).

`check_experts` is shared by the front and the evaluators: it checks that the experts can be mixed and names
the base model of LoRA experts, reading headers and configs only.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from soups.registry import Registry
from soups.utils import SoupsError


class ObjectiveStat(NamedTuple):
    """One objective's estimate on a validation set.

    Attributes:
        mean: The objective's mean over the `n` validation samples (higher is better).
        stderr: The standard error of that mean (sample std / sqrt(n); 0 when n == 1).
        n: The number of samples averaged.
    """

    mean: float
    stderr: float
    n: int


@runtime_checkable
class Evaluator(Protocol):
    """What `soups.pareto` needs from a task.

    Attributes:
        objectives: The objective names, in a fixed order; every `evaluate` result has exactly these keys.
    """

    objectives: Sequence[str]

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        """Scores `model` (the resident soup model, already set to some λ) on every objective.

        Must be deterministic for a fixed model and seed (seed inside if sampling), and must not modify
        the model's weights.
        """
        ...


@runtime_checkable
class EnsembleEvaluator(Protocol):
    """Optional: a task that can also score the functional ensemble (λ-weighted average of the experts'
    outputs, e.g. logits during decoding), the baseline of thesis Fig. 6.4(c)."""

    def evaluate_ensemble(self, lambdas: Sequence[float]) -> dict[str, ObjectiveStat]:
        """Scores the ensemble Σ_i λ_i f_i(x) of the experts given to the builder (same order as `lambdas`).

        The evaluator loads the experts it needs itself (lazily, once) from the paths its builder received.
        """
        ...


@runtime_checkable
class OutputWriter(Protocol):
    """Optional: a task that writes its own files beside `front.jsonl` (e.g. the diffusion family's contact sheet
    of the images at every λ). `soups.pareto` keeps `last_outputs()` after each `evaluate`, gathers them from every
    process, and calls `write_outputs` inside the front's atomic output directory before it is published."""

    def last_outputs(self) -> Any:
        """What the last `evaluate` produced that the files need (small and picklable, e.g. uint8 thumbnails)."""
        ...

    def write_outputs(self, directory: Path, rows: Sequence[Mapping[str, Any]], outputs: Sequence[Any]) -> None:
        """Writes the task's files into `directory`; `outputs[i]` is `last_outputs()` of `rows[i]`'s evaluation
        (None for rows not scored by `evaluate`, e.g. the functional ensemble)."""
        ...


EvaluatorBuilder = Callable[..., Evaluator]
"""`builder(cfg, *, experts: Sequence[str], device: torch.device) -> Evaluator`."""

EVALUATORS: Registry[EvaluatorBuilder] = Registry("evaluator")

# name -> module whose import registers it (imported lazily by `build_evaluator`).
EVALUATOR_MODULES: dict[str, str] = {
    "brax": "rl.locomotion.evaluator",
    "captioning": "rl.captioning.evaluator",
    "diffusion": "rl.diffusion.evaluator",
    "text": "rl.text.evaluator",
    "vision_domains": "vision.pareto_eval",
}


# Checkpoint kinds whose resident model is not a transformers model: a directory holding the kind's marker file
# is that kind, and its family's module (imported lazily, like the evaluators) provides
# `check_compatible(paths)` (raises, naming both experts, before any weight is read) and
# `build_resident_model(path) -> torch.nn.Module` (the module a `Soup` mixes in place; its state-dict names are the
# checkpoint's tensor names). A kind whose experts are not one state dict of that module each (diffusers LoRA
# experts, UNets inside pipeline dirs) also provides `open_soup(paths, *, base_model, device, dtype,
# allow_extrapolation) -> Soup`, and its `check_compatible` then returns `check_experts`' answer {"kind", "base"}.
# kind -> (marker file, module).
CHECKPOINT_KINDS: dict[str, tuple[str, str]] = {
    "brax": ("brax_policy.json", "rl.locomotion.models"),
    "diffusers": ("soups_expert.json", "soups.diffusers_lora"),  # LoRA or full-UNet experts of a diffusers pipeline
    "diffusers_pipeline": ("model_index.json", "soups.diffusers_lora"),  # a pipeline dir: its UNet (e.g. the init)
}


def checkpoint_kind(path: str | Path) -> str | None:
    """The `CHECKPOINT_KINDS` kind of the checkpoint at `path` (a directory holding its marker file), else None."""
    path = Path(path)
    for kind, (marker, _) in CHECKPOINT_KINDS.items():
        if (path / marker).is_file():
            return kind
    return None


def checkpoint_loader(kind: str) -> Any:
    """The module that loads checkpoints of `kind` (see `CHECKPOINT_KINDS`).

    Raises:
        SoupsError: the module cannot be imported (e.g. its optional extra is missing).
    """
    module = CHECKPOINT_KINDS[kind][1]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SoupsError(f"{kind} checkpoints need module {module} which failed: {err}") from err


def build_evaluator(cfg: Mapping[str, Any], *, experts: Sequence[str], device: torch.device) -> Evaluator:
    """Builds the evaluator named by `cfg["name"]`, importing the module that registers it if needed.

    Args:
        cfg: The `evaluator` config node; `name` picks the builder, the rest goes to it.
        experts: The expert paths of the front.
        device: Where the resident model lives.

    Raises:
        UnknownNameError: `name` is not a registered evaluator (the message lists the valid ones).
        SoupsError: `cfg` has no `name`, or the evaluator's module cannot be imported.
    """
    name = cfg.get("name") if hasattr(cfg, "get") else None
    if not name:
        raise SoupsError("evaluator config has no `name`; valid names: " + ", ".join(sorted(EVALUATOR_MODULES)))
    if name not in EVALUATORS and name in EVALUATOR_MODULES:
        try:
            importlib.import_module(EVALUATOR_MODULES[name])
        except ImportError as err:
            raise SoupsError(f"evaluator {name!r} needs module {EVALUATOR_MODULES[name]} which failed: {err}") from err
    evaluator = EVALUATORS.get(name)(cfg, experts=list(experts), device=device)
    if not isinstance(evaluator, Evaluator):
        raise SoupsError(f"evaluator {name!r} builder returned {type(evaluator).__name__}, not an Evaluator")
    return evaluator


def mean_stderr(values: torch.Tensor) -> ObjectiveStat:
    """Mean and standard error of a 1-D sample.

    Args:
        values: Shape [n], the per-sample scores.

    Returns:
        `ObjectiveStat(mean, std_unbiased / sqrt(n), n)`; stderr is 0 for n == 1.

    Raises:
        SoupsError: `values` is empty or holds a non-finite value.
    """
    values = values.detach().double().flatten()
    n = int(values.numel())
    if n == 0:
        raise SoupsError("cannot summarise an empty set of scores")
    if not torch.isfinite(values).all():
        raise SoupsError(f"non-finite score among {n} samples: {values[~torch.isfinite(values)][:3].tolist()}")
    stderr = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return ObjectiveStat(float(values.mean()), stderr, n)


def _resolve_base(name: str | None, adapter_dir: Path) -> str | None:
    """An adapter's base id, made absolute when it is a local path (relative to the cwd or the adapter)."""
    if not name:
        return None
    for candidate in (Path(name), adapter_dir / name):
        if candidate.exists():
            return str(candidate.resolve())
    return name


def check_experts(paths: Sequence[str]) -> dict[str, Any]:
    """Checks that the experts can be mixed: all PEFT adapters on the same base, or all full checkpoints with the
    same keys and shapes. Reads headers and configs only.

    Returns:
        {"kind": "peft" | "full", "base": base id/path or None}.

    Raises:
        SoupsError: a missing path, a mix of adapters and full checkpoints, adapters on different bases, or
            checkpoints with different keys/shapes — naming both experts.
    """
    from soups.checkpoint import open_checkpoint

    if not paths:
        raise SoupsError("no experts given: set experts=[path1,path2,...]")
    kinds_of = [checkpoint_kind(p) for p in paths]
    if any(kinds_of):
        if len(set(kinds_of)) > 1:
            odd = next(i for i, k in enumerate(kinds_of) if k != kinds_of[0])
            raise SoupsError(f"experts are of different kinds: {paths[0]} is {kinds_of[0] or 'a transformers model'}, "
                             f"{paths[odd]} is {kinds_of[odd] or 'a transformers model'}")  # fmt: skip
        loader = checkpoint_loader(str(kinds_of[0]))
        result = loader.check_compatible(list(paths))
        if hasattr(loader, "open_soup"):  # the kind reads its own experts (see CHECKPOINT_KINDS)
            return dict(result)
    ckpts = [open_checkpoint(p) for p in paths]
    kinds = ["peft" if c.kind == "peft" else "full" for c in ckpts]
    bases: list[str | None] = [None] * len(ckpts)
    if len(set(kinds)) > 1:
        raise SoupsError(f"experts mix PEFT adapters and full checkpoints: {paths[0]} is {kinds[0]}, "
                         f"{paths[kinds.index(next(k for k in kinds if k != kinds[0]))]} is not")
    if kinds[0] == "peft":
        bases = [
            _resolve_base((ckpt.adapter_config or {}).get("base_model_name_or_path"), Path(path))
            for ckpt, path in zip(ckpts, paths)
        ]
        for path, base in zip(paths[1:], bases[1:]):
            if base != bases[0]:
                raise SoupsError(f"experts have different bases: {paths[0]} is on {bases[0]}, {path} is on {base}")
    first = ckpts[0]
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        missing = sorted(set(first.keys()) ^ set(ckpt.keys()))
        if missing:
            raise SoupsError(f"experts have different tensors: {missing[0]!r} is in only one of {paths[0]} and {path}")
        for key in first.keys():
            if first.shape(key) != ckpt.shape(key):
                raise SoupsError(f"experts have different bases: tensor {key!r} is {list(first.shape(key))} in "
                                 f"{paths[0]} but {list(ckpt.shape(key))} in {path}")
    return {"kind": kinds[0], "base": bases[0] if kinds[0] == "peft" else None}
