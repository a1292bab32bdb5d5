"""The engine behind `python -m soups.serve`: one resident `Soup`, switched per request, with caches and checks.

`LiveSoup` owns the resident model. Every generation takes ONE lock around `set_weights(λ)` + generate, so two
requests can never interleave a weight switch with another λ's forward pass. Results are cached per
(λ, prompt, seed), single-flight: concurrent requests for the same key wait for the one computation instead
of repeating it (that is how requests with the same λ are batched). The mean objectives on the evaluator's
small validation batch are cached per λ the same way.

Tasks reach the server through the evaluator registry (`soups.pareto_registry.build_evaluator`): an evaluator
that also implements `LiveEvaluator` (examples, one generation, its scores) is served as is; one that predates
that interface is wrapped by an adapter registered in `LIVE_ADAPTERS` under the evaluator's name (the `text`
evaluator's is below: it uses only the evaluator's public attributes). Adding a task touches neither this
module's engine nor the page.

Input checks (`check_lambdas`, `check_prompt`, `check_seed`) raise `SoupsError` with a one-line reason; the page
shows it, the API answers 422 with it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from soups.pareto_registry import ObjectiveStat
from soups.registry import Registry
from soups.utils import SoupsError, seed_everything

__all__ = ["LIVE_ADAPTERS", "LiveEvaluator", "LiveSoup", "TextLive", "check_lambdas", "check_prompt", "check_seed",
           "live_evaluator"]  # fmt: skip

#: λ are rounded to this many decimals: the cache key and the weights actually set are the same numbers.
LAMBDA_DECIMALS = 6


@runtime_checkable
class LiveEvaluator(Protocol):
    """What the live page needs from a task, on top of `soups.pareto_registry.Evaluator`.

    Attributes:
        objectives: The objective names, in a fixed order.
        kind: What `generate` returns: "text" (a string); other kinds (images) join with their tasks.
    """

    objectives: Sequence[str]
    kind: str

    def examples(self, n: int) -> list[str]:
        """Up to `n` example prompts from the task's validation set."""
        ...

    def generate(self, model: torch.nn.Module, prompt: str, *, seed: int, max_new_tokens: int) -> Any:
        """The output of `model` (the resident soup at some λ) for `prompt`; deterministic for a fixed seed."""
        ...

    def score(self, prompt: str, output: Any) -> dict[str, float] | None:
        """Every objective of one output, or None when the task cannot score this prompt (e.g. a free-form
        prompt where the rewards need a validation sample's reference)."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        """The mean objectives on the evaluator's validation batch (the `Evaluator` method)."""
        ...


LIVE_ADAPTERS: Registry[Callable[[Any], LiveEvaluator]] = Registry("live adapter")


def live_evaluator(evaluator: Any, name: str) -> LiveEvaluator:
    """`evaluator` itself when it implements `LiveEvaluator`, else the adapter registered under `name`.

    Raises:
        SoupsError: neither (the evaluator cannot be served live).
    """
    if isinstance(evaluator, LiveEvaluator):
        return evaluator
    if name not in LIVE_ADAPTERS:
        raise SoupsError(
            f"evaluator {name!r} cannot be served live: it has no examples/generate/score methods and "
            f"no adapter in soups.serve_live.LIVE_ADAPTERS (have: {', '.join(LIVE_ADAPTERS.names())})"
        )
    return LIVE_ADAPTERS.get(name)(evaluator)


@LIVE_ADAPTERS.register("text")
class TextLive:
    """The `text` evaluator served live: greedy decoding of one prompt, scored by the evaluator's reward set.

    Greedy `generate` is the decoding the text evaluator's own loop reproduces token for token (tested there), so
    the page's outputs are those the front was scored on, up to the response length cap.
    """

    kind = "text"

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator
        self.objectives = list(evaluator.objectives)
        self.tokenizer = evaluator.tokenizer
        self._by_prompt = {str(s["prompt"]): s for s in evaluator.samples}

    def examples(self, n: int) -> list[str]:
        """The first `n` validation prompts."""
        return [str(s["prompt"]) for s in self.evaluator.samples[:n]]

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompt: str, *, seed: int, max_new_tokens: int) -> str:
        """The greedy response (new tokens only, special tokens dropped, stripped)."""
        seed_everything(seed)
        tok = self.tokenizer
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        # A prompt longer than the model's context would fail inside the forward pass: keep its last tokens.
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit:
            ids = ids[:, -max(1, int(limit) - max_new_tokens) :]
        if ids.shape[1] == 0:
            ids = torch.tensor([[tok.eos_token_id]])
        device = next(model.parameters()).device
        ids = ids.to(device)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()

    def score(self, prompt: str, output: Any) -> dict[str, float] | None:
        """The rewards of `output`: against the validation sample with this prompt, or the prompt alone."""
        sample = self._by_prompt.get(prompt, {"prompt": prompt})
        try:
            rewards = torch.as_tensor(self.evaluator.reward_set([sample], [str(output)]), dtype=torch.float64)
        except (SoupsError, KeyError, ValueError, TypeError):
            return None  # e.g. a reward that needs the sample's facts, for a prompt typed by the user
        return {name: float(rewards.reshape(-1)[k]) for k, name in enumerate(self.objectives)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, ObjectiveStat]:
        """The evaluator's own scoring of the validation batch."""
        return self.evaluator.evaluate(model)


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------


def check_lambdas(raw: Any, n_experts: int, *, extrapolate: bool = False) -> tuple[float, ...]:
    """λ from a request, checked and normalised onto the simplex (Σ λ = 1), rounded to `LAMBDA_DECIMALS`.

    Args:
        raw: The request's λ: a list of N numbers (any positive scale: [1, 3] means [0.25, 0.75]).
        n_experts: N.
        extrapolate: Accept negative λ (the sum must still be non-zero: it is divided by).

    Raises:
        SoupsError: not a list, wrong length, a non-number, NaN/Inf, a negative λ without extrapolation, or a
            sum of 0.
    """
    if not isinstance(raw, list | tuple):
        raise SoupsError(f"lambdas must be a list of {n_experts} numbers, got {type(raw).__name__}")
    if len(raw) != n_experts:
        raise SoupsError(f"lambdas has {len(raw)} values for {n_experts} experts")
    values = []
    for i, x in enumerate(raw):
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise SoupsError(f"lambdas[{i}] is not a number: {x!r}")
        if not math.isfinite(x):
            raise SoupsError(f"lambdas[{i}] is {x}; λ must be finite")
        if x < 0 and not extrapolate:
            raise SoupsError(f"lambdas[{i}] is negative ({x}); λ must be ≥ 0 unless extrapolation is on")
        values.append(float(x))
    total = math.fsum(values)
    if abs(total) < 1e-9:
        raise SoupsError(f"lambdas {values} sum to 0; they are normalised to sum to 1")
    lam = [round(x / total, LAMBDA_DECIMALS) for x in values]
    lam[-1] = round(1.0 - math.fsum(lam[:-1]), LAMBDA_DECIMALS)  # rounding must not leave the simplex
    return tuple(lam)


def check_prompt(raw: Any, max_chars: int) -> str:
    """A prompt from a request: a non-empty string of at most `max_chars` characters.

    Raises:
        SoupsError: not a string, empty, or longer than the cap.
    """
    if not isinstance(raw, str):
        raise SoupsError(f"prompt must be a string, got {type(raw).__name__}")
    if not raw.strip():
        raise SoupsError("prompt is empty")
    if len(raw) > max_chars:
        raise SoupsError(f"prompt has {len(raw)} characters; the server accepts at most {max_chars}")
    return raw


def check_seed(raw: Any) -> int:
    """A seed from a request: an integer in [0, 2**32).

    Raises:
        SoupsError: not an integer, or out of range.
    """
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise SoupsError(f"seed must be an integer, got {raw!r}")
    if not 0 <= raw < 2**32:
        raise SoupsError(f"seed {raw} is out of range [0, 2**32)")
    return raw


# ---------------------------------------------------------------------------------------------------------------
# The resident soup
# ---------------------------------------------------------------------------------------------------------------


class _SingleFlight:
    """A bounded LRU cache of futures: the first caller of a key computes it, concurrent callers wait for it."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, Future] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, was it already there or in flight)."""
        with self._lock:
            future = self._items.get(key)
            hit = future is not None
            if future is None:
                future = Future()
                self._items[key] = future
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(key)
        if not hit:
            try:
                future.set_result(compute())
            except BaseException as err:
                with self._lock:
                    if self._items.get(key) is future:
                        del self._items[key]  # a failure is not cached: the next request tries again
                future.set_exception(err)
        return future.result(), hit

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class LiveSoup:
    """A resident `Soup` served to many threads: generations, scores and validation means per λ, cached.

    Args:
        soup: The resident `soups.soup.Soup`.
        live: The task (see `LiveEvaluator`).
        experts: The expert paths (for export and provenance), in λ order.
        expert_names: Their labels.
        max_new_tokens: Server-side cap on generated tokens (or steps) per request.
        max_prompt_chars: Longest prompt accepted.
        allow_extrapolation: Whether requests may ask for λ off the simplex.
        export_dir: Where "Export this soup" writes (created on first export).
        cache_size: Entries kept per cache (outputs, validation means).

    Attributes:
        stats: Counters: generations computed, cache hits, seconds spent holding the model lock.
    """

    def __init__(
        self,
        soup: Any,
        live: LiveEvaluator,
        *,
        experts: Sequence[str],
        expert_names: Sequence[str],
        max_new_tokens: int,
        max_prompt_chars: int,
        allow_extrapolation: bool = False,
        export_dir: str | Path = "runs/serve_exports",
        cache_size: int = 4096,
    ) -> None:
        if max_new_tokens < 1:
            raise SoupsError(f"max_new_tokens={max_new_tokens} must be ≥ 1")
        if max_prompt_chars < 1:
            raise SoupsError(f"max_prompt_chars={max_prompt_chars} must be ≥ 1")
        if len(expert_names) != len(experts):
            raise SoupsError(f"{len(expert_names)} expert names for {len(experts)} experts")
        self.soup = soup
        self.live = live
        self.experts = [str(p) for p in experts]
        self.expert_names = [str(n) for n in expert_names]
        self.max_new_tokens = int(max_new_tokens)
        self.max_prompt_chars = int(max_prompt_chars)
        self.allow_extrapolation = bool(allow_extrapolation)
        self.export_dir = Path(export_dir)
        self._model_lock = threading.Lock()  # set_weights + forward passes: never interleaved
        self._export_lock = threading.Lock()
        self._outputs = _SingleFlight(cache_size)
        self._validation = _SingleFlight(cache_size)
        self.stats = {"computed": 0, "hits": 0, "locked_seconds": 0.0}

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def objectives(self) -> list[str]:
        return list(self.live.objectives)

    def clear_caches(self) -> None:
        """Forgets every cached output and validation mean (benchmarks measure cold requests with it)."""
        self._outputs.clear()
        self._validation.clear()

    def check(self, lambdas: Any, prompt: Any, seed: Any = 0, *, extrapolate: bool = False) -> tuple:
        """(λ, prompt, seed) checked; see `check_lambdas`, `check_prompt`, `check_seed`.

        Raises:
            SoupsError: a bad value, or extrapolation asked for where the server does not allow it.
        """
        if extrapolate and not self.allow_extrapolation:
            raise SoupsError("extrapolation is off on this server (start it with allow_extrapolation=true)")
        return check_lambdas(lambdas, self.n_experts, extrapolate=extrapolate), \
            check_prompt(prompt, self.max_prompt_chars), check_seed(seed)  # fmt: skip

    def _with_weights(self, lam: Sequence[float], fn: Callable[[torch.nn.Module], Any]) -> Any:
        with self._model_lock:
            t0 = time.perf_counter()
            try:
                return fn(self.soup.set_weights(list(lam)))
            finally:
                self.stats["locked_seconds"] += time.perf_counter() - t0

    def generate(self, lambdas: Any, prompt: Any, seed: Any = 0, *, extrapolate: bool = False) -> dict[str, Any]:
        """The soup's output at λ for `prompt`, and its scores (cached per (λ, prompt, seed)).

        Returns:
            {"lambdas": the normalised λ, "output": ..., "scores": {objective: value} or None, "cached": bool}.

        Raises:
            SoupsError: bad input (see `check`).
        """
        lam, prompt, seed = self.check(lambdas, prompt, seed, extrapolate=extrapolate)

        def run(model: torch.nn.Module) -> Any:
            self.stats["computed"] += 1  # under the model lock: counted exactly
            return self.live.generate(model, prompt, seed=seed, max_new_tokens=self.max_new_tokens)

        def compute() -> tuple[Any, dict[str, float] | None]:
            output = self._with_weights(lam, run)
            return output, self.live.score(prompt, output)

        (output, scores), hit = self._outputs.get((lam, prompt, seed), compute)
        self.stats["hits"] += int(hit)
        return {"lambdas": list(lam), "output": output, "scores": scores, "cached": hit}

    def validation(self, lambdas: Sequence[float]) -> dict[str, ObjectiveStat]:
        """The mean objectives at λ (already checked by `check_lambdas`) on the validation batch, cached per λ."""
        lam = tuple(float(x) for x in lambdas)
        stats, _ = self._validation.get(lam, lambda: self._with_weights(lam, self.live.evaluate))
        return stats

    def expert_outputs(self, prompt: Any, seed: Any = 0) -> list[Any]:
        """Every expert's output for `prompt` (the vertices λ = e_i), cached like any λ."""
        eye = [[1.0 if j == i else 0.0 for j in range(self.n_experts)] for i in range(self.n_experts)]
        return [self.generate(lam, prompt, seed)["output"] for lam in eye]

    def export(self, lambdas: Sequence[float], mixer: Callable[..., Any]) -> Path:
        """Writes the soup at λ (checked) under `export_dir` with `mixer` (`soups.mix.mix`), atomic, with provenance.

        The directory name is made here from λ, never taken from the request.

        Returns:
            The soup's directory (absolute).
        """
        lam = tuple(float(x) for x in lambdas)
        name = "soup_" + "_".join(f"{x:.4f}" for x in lam).replace("-", "m")
        target = (self.export_dir / name).absolute()
        with self._export_lock:
            if (target / "soup.json").is_file():
                return target  # this λ was exported already: the same weights, nothing to rewrite
            summary = mixer(self.experts, list(lam), target, allow_extrapolation=any(x < 0 for x in lam),
                            overwrite=True, progress=False)  # fmt: skip
        return Path(summary.output)


def front_rows(path: str | Path, objectives: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a `front.jsonl` written by `python -m soups.pareto`, checked against the served objectives.

    Raises:
        SoupsError: a missing or unreadable file, or a row without one of the objectives.
    """
    import json

    file = Path(path)
    if file.is_dir():
        file = file / "front.jsonl"
    if not file.is_file():
        raise SoupsError(f"front file {file} not found")
    rows = []
    for i, line in enumerate(file.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SoupsError(f"{file}:{i + 1} is not JSON: {err}") from None
        missing = [k for k in objectives if k not in (row.get("objectives") or {})]
        if missing:
            raise SoupsError(f"{file}:{i + 1} has no objective {missing[0]!r}; the served task scores "
                             f"{', '.join(objectives)}")  # fmt: skip
        rows.append(row)
    if not rows:
        raise SoupsError(f"front file {file} is empty")
    return rows


def stats_row(kind: str, name: str, lam: Sequence[float], stats: Mapping[str, ObjectiveStat]) -> dict[str, Any]:
    """A `front.jsonl`-shaped row of a point computed by the server (its coarse start-up front)."""
    return {
        "kind": kind,
        "name": name,
        "lambda": list(lam),
        "objectives": {k: {"mean": float(v[0]), "stderr": float(v[1]), "n": int(v[2])} for k, v in stats.items()},
    }
