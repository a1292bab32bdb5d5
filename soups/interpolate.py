"""The weighted sum θ = Σ_i λ_i θ_i, tensor by tensor, validated before anything is written.

Three layers, each usable on its own:

- `validate_weights`: λ are finite, one per expert, and on the simplex (λ_i ≥ 0, Σ λ_i = 1) unless
  `allow_extrapolation` (task arithmetic, extrapolation beyond the experts).
- `weighted_sum`: the maths for one tensor. Floating tensors are accumulated in float32 (float64 stays
  float64) and cast back to the source dtype; integer and bool tensors are taken from the first expert, since
  averaging counters or indices is meaningless. `interpolate` only lets that happen where it is right: for
  counters (`num_batches_tracked`) and for integer, bool or float8 tensors equal in every expert (`position_ids`).
  Such a tensor that differs across experts (an int8 / GPTQ / float8 quantized weight) is refused: copying expert
  1's would silently be wrong, and its quantization scales make a linear mix wrong too; dequantize first.
- `plan_interpolation` + `interpolate`: checks key sets, shapes and dtypes of every expert from the headers
  only (no weights read), then streams `(key, tensor)` pairs, reading one tensor per expert at a time, so
  peak memory is one output tensor plus one input tensor, never N whole models.

Key policies (`keys=`):

- `"exact"` (default): every expert has the same keys; otherwise the error names the expert and a missing key.
- `"intersection"`: only keys every expert has are mixed; the others are dropped (listed in `plan.dropped`).
- `"union"`: every key of every expert is kept. A key held by a subset S of the experts is mixed over S with
  λ renormalised there: θ_k = Σ_{i∈S} λ_i θ_{i,k} / Σ_{i∈S} λ_i. A key held by one expert is thus copied from
  it, and a key held by all experts gets the plain weighted sum. Renormalising (rather than treating the
  missing tensors as zeros) keeps every output tensor a convex combination of real weights, so e.g. a
  classification head present in some experts keeps its scale. Refused when Σ_{i∈S} λ_i = 0.

Dtypes: experts may store a floating tensor in different floating dtypes (an fp32 and a bf16 copy of one
model); the output takes the first holder's dtype unless `dtype=` is given. Integer tensors must have one
dtype across experts. Floating and integer never mix.

LoRA factors are never mixed as weights: (Σλ_i B_i)(Σλ_i A_i) is not Σλ_i B_i A_i. A checkpoint whose tensor
names look like LoRA factors (PEFT `lora_A`/`lora_B`, diffusers `lora.down`/`lora.up`, kohya `lora_unet_…`,
`lora_down`/`lora_up`) is refused with a pointer to the exact LoRA path (`find_lora_factor`).

Non-finite outputs are never produced: a NaN/Inf result raises a `SoupsError` naming the tensor and, when an
expert holds the non-finite values, that expert (otherwise it is an overflow of the output dtype).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from soups.checkpoint import Checkpoint
from soups.utils import SoupsError

__all__ = [
    "COUNTER_NAMES",
    "KEY_POLICIES",
    "InterpolationPlan",
    "Interpolation",
    "find_lora_factor",
    "interpolate",
    "is_quantized",
    "lora_factor_message",
    "parse_dtype",
    "plan_interpolation",
    "validate_weights",
    "weighted_sum",
    "check_copyable",
]

KEY_POLICIES = ("exact", "intersection", "union")
#: Tolerance on Σ λ = 1 for simplex weights (weights typed by hand, e.g. 0.1 + 0.2 + 0.7, sum to 1 ± 1e-16).
SIMPLEX_ATOL = 1e-6
#: Last name components of integer tensors that are counters: copied from the first expert even when they differ.
COUNTER_NAMES = frozenset({"num_batches_tracked", "n_averaged"})

# Tensor-name patterns of LoRA factors, by naming style (checked in this order; the first match names the style).
_LORA_STYLES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("PEFT (lora_A/lora_B)", re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")),
    ("diffusers (lora.down/lora.up)", re.compile(r"(^|[._])lora(_linear_layer)?\.(down|up)(\.|$)")),
    ("kohya (lora_unet_/lora_te_ prefixes)", re.compile(r"^lora_(unet|te\d*)_")),
    ("lora_down/lora_up", re.compile(r"(^|[._])lora_(down|up)(\.|$)")),
)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Maps a dtype name ("bf16", "float16", "float32", ...) or a torch dtype to a floating torch dtype.

    Raises:
        SoupsError: unknown name or a non-floating dtype.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise SoupsError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name in ("", "none", "null", "auto", "source"):
        return None
    if name not in _DTYPE_NAMES:
        raise SoupsError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(set(_DTYPE_NAMES)))} or null (source)")
    return _DTYPE_NAMES[name]


def find_lora_factor(keys: Iterable[str]) -> tuple[str, str] | None:
    """The first tensor name that looks like a LoRA factor, and its naming style; None if there is none.

    Args:
        keys: Tensor names of one checkpoint.

    Returns:
        `(key, style)`, e.g. `("unet.x.lora.down.weight", "diffusers (lora.down/lora.up)")`, or None.
    """
    for key in keys:
        for style, pattern in _LORA_STYLES:
            if pattern.search(key):
                return key, style
    return None


def lora_factor_message(path: object, key: str, style: str) -> str:
    """The refusal for a checkpoint of LoRA factors offered as full weights (one line, names path and tensor)."""
    return (
        f"expert {path} holds LoRA factors, not full weights ({style} naming, e.g. tensor {key!r}); mixing A and B "
        "factors linearly gives (Σλ_i B_i)(Σλ_i A_i), which is not the mix Σλ_i B_i A_i. Mix LoRA experts as PEFT "
        "adapter directories (adapter_config.json + adapter_model.safetensors; soups.mix then mixes the exact "
        "delta), or merge each LoRA into its base model first and mix the merged checkpoints; for diffusers or kohya "
        "LoRA files pass base=<diffusers pipeline dir> (soups.mix then mixes them exactly)"
    )


def is_quantized(dtype: torch.dtype) -> bool:
    """Integer, bool and float8 dtypes: values that a weighted sum cannot mix (indices, counters, quantized codes
    whose scales live in other tensors)."""
    return not dtype.is_floating_point or dtype.itemsize == 1


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    # compare bytes: torch.equal has no kernel for every 1-byte float type
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def check_copyable(key: str, tensors: Iterable[torch.Tensor], paths: Sequence[object]) -> torch.Tensor:
    """Returns the first of an integer/bool/float8 tensor's per-expert copies, if copying it is right.

    It is right for counters (`COUNTER_NAMES`) and for a tensor equal in every expert (`position_ids`). Any
    other such tensor that differs across experts (an int8, GPTQ or float8 quantized weight) is refused.

    Args:
        key: The tensor name.
        tensors: Its copies, one per expert (read lazily; at most two are held).
        paths: The experts, in the same order (for the message).

    Raises:
        SoupsError: the copies differ; the message names the tensor and two experts, and says to dequantize.
    """
    iterator = iter(tensors)
    first = next(iterator)
    if key.rpartition(".")[2] in COUNTER_NAMES:
        return first
    for i, other in enumerate(iterator, start=1):
        if not _bitwise_equal(first, other):
            raise SoupsError(
                f"tensor {key!r} is {str(first.dtype).removeprefix('torch.')} and differs between experts "
                f"{paths[0]} and {paths[i]}; integer/quantized tensors cannot be mixed (copying one expert's would "
                "silently drop the others, and quantization scales make a linear mix wrong): dequantize the "
                "experts to a floating dtype first (e.g. load each one and save_pretrained it in float16/bfloat16)"
            )
        del other
    return first


def validate_weights(
    weights: Sequence[float], n_experts: int, allow_extrapolation: bool = False, *, allow_zero_sum: bool = False
) -> list[float]:
    """Checks interpolation weights λ.

    Args:
        weights: λ_1..λ_N.
        n_experts: N, the number of experts.
        allow_extrapolation: Accept negative weights and Σ λ ≠ 1 (task arithmetic, extrapolation).
        allow_zero_sum: Accept Σ λ = 0 with extrapolation. A linear soup with Σ λ = 0 has no scale left (all
            zeros, or a pure difference of experts): not a model. Only a mode that mixes differences (a future
            task-arithmetic mode) should pass True. All-zero λ are refused regardless.

    Returns:
        The weights as Python floats.

    Raises:
        SoupsError: wrong count, a non-numeric or non-finite weight, (without extrapolation) a negative
            weight or Σ λ ≠ 1 (± `SIMPLEX_ATOL`), or (with it) Σ λ = 0; the message names the offending value.
    """
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
        raise SoupsError(f"weights must be a list of numbers, got {weights!r}")
    if len(weights) != n_experts:
        raise SoupsError(f"got {len(weights)} weights {list(weights)} for {n_experts} experts; give one per expert")
    out: list[float] = []
    for i, w in enumerate(weights):
        if isinstance(w, bool):
            raise SoupsError(f"weight {i} is a boolean ({w}); give a number")
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise SoupsError(f"weight {i} is not a number: {w!r}") from None
        if not math.isfinite(value):
            raise SoupsError(f"weight {i} is {value}; weights must be finite")
        if value < 0 and not allow_extrapolation:
            raise SoupsError(
                f"weight {i} is negative ({value}); pass allow_extrapolation=true for task arithmetic/extrapolation"
            )
        out.append(value)
    total = math.fsum(out)
    if not allow_extrapolation and abs(total - 1.0) > SIMPLEX_ATOL:
        raise SoupsError(
            f"weights {out} sum to {total:.9g}, not 1; rescale them or pass allow_extrapolation=true"
        )
    if out and all(w == 0.0 for w in out):
        raise SoupsError(f"weights {out} are all 0: the soup would be all zeros; give at least one non-zero weight")
    if abs(total) <= SIMPLEX_ATOL and not allow_zero_sum:
        raise SoupsError(
            f"weights {out} sum to 0: Σλ_iθ_i would be a difference of experts with no scale left, not a model "
            "(even with allow_extrapolation); make them sum to 1, e.g. task arithmetic θ_0 + Σλ_i(θ_i - θ_0) is "
            "weights [1 - Σλ_i, λ_1, ...] on [θ_0, θ_1, ...]"
        )
    return out


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """A float64 output accumulates in float64; every other floating output in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(
    tensors: Iterable[torch.Tensor],
    weights: Sequence[float],
    *,
    out_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Σ_i w_i t_i for one tensor, accumulated in float32, cast back to the first tensor's dtype.

    Tensors are consumed one at a time (pass a generator to read them lazily). Integer and bool tensors are
    not summed: the first tensor is returned as is. Tensors with weight 0 are skipped (so a NaN in an
    expert with λ = 0 does not leak into the soup).

    Args:
        tensors: N tensors of one shape `(*S)`; floating dtypes may differ between them.
        weights: N weights w_i (not checked here; see `validate_weights`).
        out_dtype: Output dtype for floating tensors; default: the first tensor's dtype.
        device: Where to accumulate; default: the first tensor's device.

    Returns:
        The weighted sum, shape `(*S)`, on `device`.

    Raises:
        SoupsError: shape mismatch, or mixing floating and integer tensors.
    """
    iterator = iter(tensors)
    try:
        first = next(iterator)
    except StopIteration:
        raise SoupsError("weighted_sum needs at least one tensor") from None
    device = torch.device(device) if device is not None else first.device
    if not first.dtype.is_floating_point:
        return first.to(device)
    shape, first_dtype = first.shape, first.dtype
    acc_dtype = _accumulation_dtype(out_dtype or first_dtype)
    acc = torch.zeros(shape, dtype=acc_dtype, device=device)
    # Hold one input at a time: each reference is dropped before the next tensor is read, so the peak is the
    # accumulator plus one input (keeping tensor 0 or the loop variable alive would add up to two more).
    tensor: torch.Tensor | None = first
    del first
    n = 0
    while tensor is not None:
        i, n = n, n + 1
        if i >= len(weights):
            raise SoupsError(f"weighted_sum got more tensors than the {len(weights)} weights")
        if tensor.shape != shape:
            raise SoupsError(f"weighted_sum: tensor {i} has shape {tuple(tensor.shape)}, tensor 0 {tuple(shape)}")
        if not tensor.dtype.is_floating_point:
            raise SoupsError(f"weighted_sum: tensor {i} is {tensor.dtype} but tensor 0 is {first_dtype}")
        if weights[i] != 0.0:
            acc.add_(tensor.to(device=device, dtype=acc_dtype), alpha=float(weights[i]))
        tensor = None
        tensor = next(iterator, None)
    if n != len(weights):
        raise SoupsError(f"weighted_sum got {n} tensors for {len(weights)} weights")
    return acc.to(out_dtype or first_dtype)


@dataclass
class InterpolationPlan:
    """What will be written, decided from the experts' headers only.

    Attributes:
        keys: Output tensor names, in the first expert's order (then keys only later experts hold).
        holders: key -> indices of the experts that hold it (all experts except under `union`).
        shapes: key -> shape.
        dtypes: key -> output dtype (first holder's dtype, or the requested floating dtype).
        dropped: Keys left out by the `intersection` policy.
        policy: The key policy used.
    """

    keys: list[str]
    holders: dict[str, tuple[int, ...]]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    dropped: list[str] = field(default_factory=list)
    policy: str = "exact"

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensors."""
        return sum(math.prod(self.shapes[k]) * self.dtypes[k].itemsize for k in self.keys)


def plan_interpolation(
    experts: Sequence[Checkpoint], keys_policy: str = "exact", dtype: str | torch.dtype | None = None
) -> InterpolationPlan:
    """Validates that the experts can be mixed and lists the output tensors (headers only, no weights read).

    Args:
        experts: The opened checkpoints (≥ 1).
        keys_policy: "exact", "intersection" or "union" (see the module docstring).
        dtype: Output dtype for floating tensors; None keeps each tensor's source dtype.

    Returns:
        The plan.

    Raises:
        SoupsError: unknown policy, missing keys (exact), no common keys (intersection), or a shape/dtype
            mismatch; the message names the expert path and the tensor.
    """
    if keys_policy not in KEY_POLICIES:
        raise SoupsError(f"unknown keys policy {keys_policy!r}; valid: {', '.join(KEY_POLICIES)}")
    if not experts:
        raise SoupsError("no experts given")
    out_dtype = parse_dtype(dtype)
    key_sets = [set(e.keys()) for e in experts]
    first = experts[0]
    if keys_policy == "exact":
        for expert, ks in zip(experts[1:], key_sets[1:]):
            missing = [k for k in first.keys() if k not in ks]
            if missing:
                raise SoupsError(
                    f"expert {expert.path} lacks tensor {missing[0]!r} ({len(missing)} missing) that {first.path} has; "
                    "pass keys=intersection or keys=union to mix anyway"
                )
            extra = [k for k in expert.keys() if k not in key_sets[0]]
            if extra:
                raise SoupsError(
                    f"expert {first.path} lacks tensor {extra[0]!r} ({len(extra)} missing) that {expert.path} has; "
                    "pass keys=intersection or keys=union to mix anyway"
                )
    ordered: list[str] = list(first.keys())
    if keys_policy == "union":
        seen = set(ordered)
        for expert in experts[1:]:
            for k in expert.keys():
                if k not in seen:
                    ordered.append(k)
                    seen.add(k)
    dropped: list[str] = []
    if keys_policy == "intersection":
        common = set.intersection(*key_sets)
        dropped = [k for k in ordered if k not in common]
        for expert in experts[1:]:
            dropped += [k for k in expert.keys() if k not in common and k not in dropped]
        ordered = [k for k in ordered if k in common]
        if not ordered:
            raise SoupsError(f"experts {first.path} and others share no tensor names; nothing to mix")

    holders: dict[str, tuple[int, ...]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for key in ordered:
        idx = tuple(i for i, ks in enumerate(key_sets) if key in ks)
        ref = experts[idx[0]]
        shape, src_dtype = ref.shape(key), ref.dtype(key)
        for i in idx[1:]:
            other = experts[i]
            if other.shape(key) != shape:
                raise SoupsError(
                    f"shape mismatch for tensor {key!r}: {other.path} has {other.shape(key)}, {ref.path} has {shape}"
                )
            o_dtype = other.dtype(key)
            if o_dtype != src_dtype and not (o_dtype.is_floating_point and src_dtype.is_floating_point):
                raise SoupsError(
                    f"dtype mismatch for tensor {key!r}: {other.path} has {o_dtype}, {ref.path} has {src_dtype}"
                )
        holders[key] = idx
        shapes[key] = shape
        dtypes[key] = out_dtype if (out_dtype is not None and src_dtype.is_floating_point) else src_dtype
    return InterpolationPlan(ordered, holders, shapes, dtypes, dropped, keys_policy)


def _renormalised(weights: Sequence[float], holders: Sequence[int], n: int, key: str) -> list[float]:
    """λ restricted to the experts holding `key`, rescaled to keep their sum (union policy)."""
    if len(holders) == n:
        return [weights[i] for i in holders]
    total = math.fsum(weights[i] for i in holders)
    if abs(total) < 1e-12:
        raise SoupsError(
            f"tensor {key!r} is held only by experts {list(holders)} whose weights sum to 0; "
            "cannot renormalise (keys=union)"
        )
    return [weights[i] / total for i in holders]


class Interpolation:
    """The stream returned by `interpolate`: iterate it once for `(key, tensor)` pairs.

    Attributes:
        plan: The validated plan.
        weights: The validated λ.
        specs: key -> (shape, dtype) of every output tensor in stream order (the writer uses it to lay out
            shards before the first tensor is computed).
    """

    def __init__(
        self,
        experts: Sequence[Checkpoint],
        weights: list[float],
        plan: InterpolationPlan,
        device: torch.device,
    ) -> None:
        self.experts = list(experts)
        self.weights = weights
        self.plan = plan
        self.device = device
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            k: (plan.shapes[k], plan.dtypes[k]) for k in plan.keys
        }
        self._consumed = False

    def __len__(self) -> int:
        return len(self.plan.keys)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._consumed:
            raise SoupsError("an interpolation stream can be iterated only once; call interpolate() again")
        self._consumed = True
        return self._generate()

    def _generate(self) -> Iterator[tuple[str, torch.Tensor]]:
        n = len(self.experts)
        for key in self.plan.keys:
            holders = self.plan.holders[key]
            tensors = (self.experts[i].get_tensor(key) for i in holders)
            if is_quantized(self.experts[holders[0]].dtype(key)):
                first = check_copyable(key, tensors, [self.experts[i].path for i in holders])
                yield key, first.to(device=self.device, dtype=self.plan.dtypes[key])
                del first
                continue
            weights = _renormalised(self.weights, holders, n, key)
            out = weighted_sum(tensors, weights, out_dtype=self.plan.dtypes[key], device=self.device)
            if out.dtype.is_floating_point and not bool(torch.isfinite(out).all()):
                raise SoupsError(self._non_finite_message(key, holders, weights))
            yield key, out
            del out  # the consumer holds the tensor now; do not keep it alive while the next one is computed

    def _non_finite_message(self, key: str, holders: Sequence[int], weights: Sequence[float]) -> str:
        for i, w in zip(holders, weights):
            if w != 0.0 and not bool(torch.isfinite(self.experts[i].get_tensor(key)).all()):
                return f"tensor {key!r} of expert {self.experts[i].path} holds NaN/Inf values; refusing to save NaN"
        return (
            f"tensor {key!r} overflows {self.plan.dtypes[key]} for weights {list(weights)} (non-finite result); "
            "use smaller weights or dtype=float32"
        )


def interpolate(
    experts: Sequence[Checkpoint],
    weights: Sequence[float],
    *,
    keys: str = "exact",
    allow_extrapolation: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Interpolation:
    """Validates everything, then streams θ = Σ_i λ_i θ_i tensor by tensor.

    All checks (weights, key sets, shapes, dtypes, no LoRA factors) run here, before the first tensor is read,
    so a caller that writes the stream never starts an output for bad input. Reading errors (truncated data),
    non-finite results and integer/quantized tensors that differ across experts raise `SoupsError` during
    iteration; `write_soup` then removes its partial output.

    Args:
        experts: Opened checkpoints (`soups.checkpoint.open_checkpoint`).
        weights: λ, one per expert.
        keys: "exact", "intersection" or "union".
        allow_extrapolation: Accept λ off the simplex (negative, or not summing to 1).
        dtype: Output dtype for floating tensors ("bf16", "float16", "float32", ...); None keeps the source's.
        device: Where to accumulate (e.g. "cuda" for speed); yielded tensors live there.

    Returns:
        An `Interpolation`: iterable of `(key, tensor)` with tensor shape `plan.shapes[key]`, plus `specs`.
    """
    lam = validate_weights(weights, len(experts), allow_extrapolation)
    for expert in experts:
        found = find_lora_factor(expert.keys())
        if found is not None:
            raise SoupsError(lora_factor_message(expert.path, *found))
    plan = plan_interpolation(experts, keys, dtype)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SoupsError(f"bad device {device!r}: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SoupsError(f"device {device!r} requested but CUDA is not available")
    return Interpolation(experts, lam, plan, dev)
