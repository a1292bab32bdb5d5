"""Choosing which runs go into a weight average: the uniform soup and the greedy soup.

Greedy soup (model soups, Wortsman et al. 2022; DiWA, Ramé et al. 2022, thesis §4.4.4): rank the candidates by
their own validation score, best first; the soup starts as the best candidate; each following candidate is
added if the soup's validation score with it does not drop (`accept=">="`, DiWA's code) or only if it
strictly rises (`accept=">"`, model soups' code).

The soup is kept as a running mean, θ̄_{n+1} = θ̄_n + (θ − θ̄_n) / (n + 1) (one `torch.lerp` per tensor), so
trying a candidate costs one evaluation and no rebuild from the n members already in. Cost: exactly M calls
to `evaluate` for M candidates, namely 1 for the initial one-member soup (the given `scores` only rank, they
are not trusted to be the soup metric, e.g. they may come from a different split) plus 1 per further
candidate (M − 1).

Tensors:
- floating tensors are averaged, accumulated in float32 (float64 stays float64) and cast back to the source
  dtype at the end. This includes BatchNorm's `running_mean` and `running_var`, which ARE float buffers and
  are averaged like weights (as in DiWA and model soups, whose code averages the whole state dict);
- integer and bool tensors (e.g. BatchNorm `num_batches_tracked`) are not averaged: they are taken from the
  first member of the soup (the best-ranked candidate).

Memory: candidates may be state dicts or lazy loaders (zero-argument callables returning a state dict). With
loaders, greedy selection holds about two state dicts at a time: the soup, and the candidate, which is turned
into the trial soup tensor by tensor (each candidate tensor is released once its trial tensor exists).

This is written here because no maintained library provides it: model soups and DiWA ship it as scripts that
rebuild the average from scratch for every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from soups.cli import bar_disabled
from soups.utils import SoupsError

__all__ = ["GreedySoupResult", "RunningMean", "SelectionStep", "greedy_soup", "uniform_soup"]

StateDict = dict[str, torch.Tensor]
Candidate = StateDict | Callable[[], StateDict]


# ----------------------------------------------------------------------------------------------------------
# Loading and checking candidates
# ----------------------------------------------------------------------------------------------------------


def _load(candidate: Candidate, index: int) -> StateDict:
    """Returns a shallow copy of the candidate's state dict (calling it if it is a loader)."""
    state = candidate() if callable(candidate) else candidate
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SoupsError(f"candidate {index} is not a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_compatible(reference: StateDict, state: StateDict, index: int) -> None:
    """Same keys, same shapes, finite floating tensors; errors name the candidate and the tensor."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise SoupsError(f"candidate {index}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
    for key, tensor in state.items():
        if tensor.shape != reference[key].shape:
            raise SoupsError(
                f"candidate {index}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(reference[key].shape)}"
            )
        if tensor.is_floating_point() != reference[key].is_floating_point():
            raise SoupsError(f"candidate {index}: tensor {key!r} is {tensor.dtype}, expected {reference[key].dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SoupsError(f"candidate {index}: tensor {key!r} contains NaN or infinite values")


# ----------------------------------------------------------------------------------------------------------
# Running mean of state dicts
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunningMean:
    """The mean of the state dicts added so far.

    Attributes:
        mean: Accumulated mean per key (float32/float64 for floating tensors; integer tensors of the first
            member as they were).
        dtypes: Source dtype per key, used by `state_dict()` to cast back.
        count: Number of members n.
    """

    mean: StateDict = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    count: int = 0

    def trial(self, state: StateDict, index: int = 0) -> StateDict:
        """The mean if `state` were added, without changing this object.

        θ̄' = lerp(θ̄, θ, 1/(n + 1)) per floating tensor; integer tensors come from the first member. Tensors of
        `state` are popped as they are consumed, so pass a dict you own (a shallow copy is enough).

        Args:
            state: The candidate's state dict (same keys and shapes as the members).
            index: The candidate's index, for error messages.

        Returns:
            The would-be mean, in accumulation dtypes.
        """
        if self.count == 0:
            out: StateDict = {}
            for key in list(state):
                tensor = state.pop(key)
                self.dtypes.setdefault(key, tensor.dtype)
                if tensor.is_floating_point():
                    if not bool(torch.isfinite(tensor).all()):
                        raise SoupsError(f"candidate {index}: tensor {key!r} contains NaN or infinite values")
                    out[key] = tensor.to(_accumulation_dtype(tensor.dtype), copy=True)
                else:
                    out[key] = tensor.clone()
            return out
        _check_compatible(self.mean, state, index)
        weight = 1.0 / (self.count + 1)
        out = {}
        for key in list(state):
            tensor = state.pop(key)
            current = self.mean[key]
            out[key] = torch.lerp(current, tensor.to(current), weight) if current.is_floating_point() else current
        return out

    def accept(self, trial: StateDict) -> None:
        """Makes `trial` (the output of `self.trial`) the new mean and counts one more member."""
        self.mean = trial
        self.count += 1

    def add(self, state: StateDict, index: int = 0) -> None:
        """Adds one member: `accept(trial(state))`."""
        self.accept(self.trial(dict(state), index))

    def state_dict(self, trial: StateDict | None = None) -> StateDict:
        """The mean (or a trial mean) cast back to the source dtypes (no copy where the dtype already matches)."""
        source = self.mean if trial is None else trial
        return {key: value.to(self.dtypes[key]) for key, value in source.items()}


# ----------------------------------------------------------------------------------------------------------
# Uniform soup
# ----------------------------------------------------------------------------------------------------------


def uniform_soup(candidates: Sequence[Candidate], progress: bool = True) -> StateDict:
    """The uniform average (1/M) Σ_i θ_i of all candidates, loading one at a time.

    Args:
        candidates: M ≥ 1 state dicts or loaders with identical keys and shapes.
        progress: Show a tqdm bar.

    Returns:
        The averaged state dict in the source dtypes (integer buffers from candidate 0).

    Raises:
        SoupsError: no candidates, or keys / shapes / dtypes differ, or a tensor is not finite.
    """
    if len(candidates) == 0:
        raise SoupsError("uniform soup needs at least one candidate, got none")
    soup = RunningMean()
    for index, candidate in enumerate(tqdm(candidates, desc="uniform soup", disable=bar_disabled(progress))):
        soup.add(_load(candidate, index), index)
    return soup.state_dict()


# ----------------------------------------------------------------------------------------------------------
# Greedy soup
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionStep:
    """One evaluation of greedy selection.

    Attributes:
        index: Candidate index (position in `candidates`).
        score: Validation score of the soup with this candidate added.
        accepted: Whether the candidate stayed in the soup.
        soup_size: Number of members after this step.
    """

    index: int
    score: float
    accepted: bool
    soup_size: int


@dataclass
class GreedySoupResult:
    """Output of `greedy_soup`.

    Attributes:
        selected: Indices of the chosen candidates, in the order they were added (best first).
        state_dict: The soup's weights (source dtypes).
        history: One step per evaluation, in evaluation order (length M).
        score: The final soup's validation score.
    """

    selected: list[int]
    state_dict: StateDict
    history: list[SelectionStep]
    score: float


def _ranking(scores: Sequence[float], count: int) -> list[int]:
    """Indices sorted by decreasing score; ties keep the original order."""
    values = [float(s) for s in scores]
    if len(values) != count:
        raise SoupsError(f"got {len(values)} validation scores for {count} candidates")
    bad = [i for i, s in enumerate(values) if math.isnan(s)]
    if bad:
        raise SoupsError(f"validation score of candidate {bad[0]} is NaN")
    return sorted(range(count), key=lambda i: -values[i])


def greedy_soup(
    candidates: Sequence[Candidate],
    scores: Sequence[float],
    evaluate: Callable[[StateDict], float],
    accept: Literal[">=", ">"] = ">=",
    progress: bool = True,
) -> GreedySoupResult:
    """Greedy soup: add candidates best-first while the soup's validation score does not drop.

    Args:
        candidates: M ≥ 1 state dicts or zero-argument loaders returning one (same keys and shapes).
        scores: [M] each candidate's own validation score, used only for the ranking (higher is better).
        evaluate: Maps a state dict (source dtypes) to the soup's validation score (higher is better). It is
            called exactly M times: once for the best candidate alone, then once per further candidate.
        accept: ">=" keeps a candidate when the score does not decrease (DiWA); ">" only when it strictly
            increases (model soups). A NaN trial score rejects the candidate.
        progress: Show a tqdm bar.

    Returns:
        The selected indices, the soup's state dict, the evaluation history and the final score.

    Raises:
        SoupsError: empty candidates, a score count that differs from M, a NaN validation score, an unknown
            `accept`, incompatible candidates, or a non-finite score for the first soup.
    """
    if accept not in (">=", ">"):
        raise SoupsError(f"greedy soup accept={accept!r} must be '>=' (DiWA) or '>' (model soups)")
    if len(candidates) == 0:
        raise SoupsError("greedy soup needs at least one candidate, got none")
    order = _ranking(scores, len(candidates))

    soup = RunningMean()
    history: list[SelectionStep] = []
    selected: list[int] = []
    best = -math.inf
    for step, index in enumerate(tqdm(order, desc=f"greedy soup ({accept})", disable=bar_disabled(progress))):
        trial = soup.trial(_load(candidates[index], index), index)
        score = float(evaluate(soup.state_dict(trial)))
        if step == 0:
            if not math.isfinite(score):
                raise SoupsError(f"evaluate returned {score} for the best candidate {index} alone")
            keep = True
        else:
            keep = score >= best if accept == ">=" else score > best
        if keep:
            soup.accept(trial)
            selected.append(index)
            best = score
        del trial
        history.append(SelectionStep(index=index, score=score, accepted=keep, soup_size=soup.count))
    return GreedySoupResult(selected=selected, state_dict=soup.state_dict(), history=history, score=best)
