"""`Soup`: N experts held in memory and ONE resident model whose weights are set to any λ in place.

A sweep over λ (a Pareto front, a greedy soup) needs the model at many mixes. Rebuilding it from disk for each
λ costs a `from_pretrained` (or a mix written and re-read) per point; a `Soup` pays the reading once.

Full checkpoints (`Soup.from_checkpoints`). The floating tensors of the resident model (parameters and float
buffers, tied weights once) are re-bound as views into one flat buffer per dtype, and the experts' copies are
stacked once into a matrix Θ of shape (N, P). Setting λ is then a single matrix-vector product written
straight into the model's memory, θ = λᵀΘ (float32 accumulation; for bf16/fp16 storage it runs in float32 over
chunks of `CHUNK` elements). Nothing is allocated per switch, nothing touches the disk, and recomputing from the
stored experts means switching back and forth cannot drift. Integer, bool and float8 tensors are copied from the
first expert when that is right: counters (`num_batches_tracked`) and tensors equal in every expert
(`position_ids`); one that differs across experts (a quantized weight) is refused, as in `soups.interpolate`.
Memory: N + 1 copies of the floating weights, on `device`.

LoRA adapters (`Soup.from_lora`). The base model is wrapped ONCE with a single concatenated adapter of rank
R = Σ r_i per module (A_cat = vstack(A_i), scaling 1, see `soups.lora`). Setting λ only rewrites the B blocks,
B_cat = hstack(λ_i s_i B_i): out×R numbers per module, no copy of the base, no merge. `modules_to_save`
tensors are mixed like full checkpoints. The forward pass costs one rank-R LoRA per module.

λ-batched forwards (`Soup.batched`, LoRA only). The mixed delta Σ_i λ_i s_i B_i A_i x = B_cat (c_λ ⊙ A_cat x),
with c_λ = (λ_owner(j))_j over the R rank-1 columns, is linear in λ. So K mixes run in ONE batched forward, with
no weight switch: B_cat holds hstack(s_i B_i) (λ = 1), and a forward hook on every concatenated lora_A scales
each row's A_cat x by the c_λ of that row's λ. Rows are λ-major (row j of a batch of B rows belongs to λ
j // (B/K)), which `generate` keeps: it expands the batch with `repeat_interleave` (num_return_sequences,
beams) and reorders only within one prompt's beams, so the per-row λ follows every row and its KV cache.
This is exact up to float rounding (the product is only associated differently). Full checkpoints (and LoRA
soups with `modules_to_save`, whose mixed tensors are not applied per row) keep the in-place switch.

Every tensor an expert provides must land in the model (and every model tensor must be provided), checked
when the soup is built: the reference rewarded-soups code silently loaded nothing. Experts must be finite (NaN
or Inf anywhere refuses the soup: 0·NaN = NaN would spoil every λ, even the other experts' vertices), and a
checkpoint of LoRA factors is never taken for full weights.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from soups.checkpoint import Checkpoint, open_checkpoint
from soups.cli import bar_disabled
from soups.interpolate import (
    check_copyable,
    find_lora_factor,
    is_quantized,
    lora_factor_message,
    parse_dtype,
    validate_weights,
)
from soups.lora import check_compatible, concat_adapter_config, load_state_dict_strict, mix_modules, read_adapter
from soups.utils import SoupsError

__all__ = ["CHUNK", "BatchedSoup", "Soup"]

#: Elements per chunk when the stored experts are not float32 (bounds the float32 temporary).
CHUNK = 1 << 24


def _finite(tensor: torch.Tensor, key: str, path: object) -> torch.Tensor:
    """`tensor`, if it holds no NaN/Inf; else a `SoupsError` naming the expert and the tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise SoupsError(
            f"tensor {key!r} of expert {path} holds NaN/Inf values; refusing to build a soup from it "
            "(0·NaN = NaN would corrupt every mix, even the other experts' vertices)"
        )
    return tensor


# ----------------------------------------------------------------------------------------------------------
# the fused weighted sum over a flat buffer
# ----------------------------------------------------------------------------------------------------------


def weighted_rows(lam: torch.Tensor, stacked: torch.Tensor, out: torch.Tensor, chunk: int = CHUNK) -> None:
    """out = λᵀ Θ, accumulated in float32, written in place.

    Args:
        lam: λ, shape (N,), float32, on `stacked`'s device.
        stacked: Θ, shape (N, P): expert i's flattened tensors in row i.
        out: shape (P,), any floating dtype; overwritten.
        chunk: Columns per float32 temporary when `stacked` or `out` is not float32.
    """
    if stacked.dtype == torch.float32 and out.dtype == torch.float32:
        torch.mv(stacked.T, lam, out=out)  # (P, N) @ (N,) -> (P,), BLAS gemv on the transposed stack
        return
    for start in range(0, stacked.shape[1], chunk):
        stop = min(start + chunk, stacked.shape[1])
        out[start:stop].copy_(torch.mv(stacked[:, start:stop].T.float(), lam))


@dataclass
class _Slot:
    """A model tensor re-bound as a view of a flat buffer: `module._parameters[name]` or `._buffers[name]`."""

    module: nn.Module
    name: str
    is_param: bool
    ptr: int

    def current(self) -> torch.Tensor:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]


class _FlatGroup:
    """Model tensors of one dtype bound to one flat buffer, plus the (N, P) stack of the experts' values."""

    def __init__(self, stacked: torch.Tensor, flat: torch.Tensor, slots: list[_Slot]) -> None:
        self.stacked = stacked
        self.flat = flat
        self.slots = slots

    def apply(self, lam: torch.Tensor) -> None:
        for slot in self.slots:
            if slot.current().data_ptr() != slot.ptr:
                raise SoupsError(
                    f"tensor {slot.name!r} of the resident model was replaced (moved with .to() or reloaded?) after "
                    "the Soup was built; build the Soup on the target device and dtype"
                )
        weighted_rows(lam.to(self.stacked.device), self.stacked, self.flat)


def _bind(
    targets: list[tuple[list[tuple[nn.Module, str, bool]], torch.Size]],
    n_experts: int,
    read: Callable[[int, int], torch.Tensor],
    dtype: torch.dtype,
    storage_dtype: torch.dtype,
    device: torch.device,
) -> _FlatGroup:
    """Re-binds `targets` (each: the (module, name, is_param) aliases of one tensor, and its shape) as views
    of one flat buffer, and stacks `read(i, j)` (expert i, target j) into Θ of shape (N, P), one tensor at a
    time (expert-major, so each expert's files are read in order)."""
    sizes = [int(torch.Size(shape).numel()) for _, shape in targets]
    offsets = [0, *itertools.accumulate(sizes)]
    flat = torch.empty(offsets[-1], dtype=dtype, device=device)
    slots: list[_Slot] = []  # bind first: the model's own storage is released before the stack is filled
    for (aliases, shape), offset, size in zip(targets, offsets, sizes):
        view = flat[offset : offset + size].view(shape)
        for module, name, is_param in aliases:
            if is_param:
                module._parameters[name].data = view  # type: ignore[union-attr]
            else:
                module._buffers[name] = view
            slots.append(_Slot(module, name, is_param, view.data_ptr()))
    stacked = torch.empty(n_experts, offsets[-1], dtype=storage_dtype, device=device)
    for i in range(n_experts):
        for j, (offset, size) in enumerate(zip(offsets, sizes)):
            stacked[i, offset : offset + size].copy_(read(i, j).reshape(-1))
    return _FlatGroup(stacked, flat, slots)


def _aliases(model: nn.Module) -> dict[int, tuple[list[str], torch.Tensor]]:
    """Groups `model.state_dict()` names by tensor identity (tied weights share one entry)."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return groups


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, bool]:
    """(module, attribute, is_param) for a state-dict name."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return module, attr, attr in module._parameters


# ----------------------------------------------------------------------------------------------------------
# building models
# ----------------------------------------------------------------------------------------------------------


def _build_model(ckpt: Checkpoint, dtype: torch.dtype | None) -> nn.Module:
    """The first expert's model class (`config.json` architectures, else AutoModel), via `from_pretrained`."""
    import transformers

    if ckpt.config_dir is None or not (ckpt.config_dir / "config.json").is_file():
        raise SoupsError(f"expert {ckpt.path} has no config.json; pass model=<an nn.Module> to Soup.from_checkpoints")
    config = json.loads((ckpt.config_dir / "config.json").read_text())
    cls: Any = transformers.AutoModel
    for arch in config.get("architectures") or []:
        candidate = getattr(transformers, str(arch), None)
        if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
            cls = candidate
            break
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(ckpt.config_dir, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Soup
# ----------------------------------------------------------------------------------------------------------


class Soup:
    """A resident mix: `soup.set_weights(λ)` sets `soup.model` to the mix of the experts, in place.

    Build it with `Soup.from_checkpoints(paths)` (full checkpoints) or `Soup.from_lora(adapters, base_model)`.

    Attributes:
        model: The resident model (a PeftModel for LoRA experts); keep using this object.
        paths: The experts.
        weights: The current λ (a tuple of floats).
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Sequence[Path],
        groups: list[_FlatGroup],
        lora_blocks: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]],
        allow_extrapolation: bool,
    ) -> None:
        self.model = model
        self.paths = list(paths)
        self._groups = groups
        self._lora_blocks = lora_blocks  # (B parameter, hstack(s_i B_i) float32 (out, R), owner index (R,))
        self._allow_extrapolation = allow_extrapolation
        self._batched = False  # inside `batched`: B holds the λ = 1 blocks, set_weights must not touch it
        self.weights: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        kind = "lora" if self._lora_blocks else "full"
        return f"Soup({kind}, experts={len(self)}, weights={self.weights}, model={type(self.model).__name__})"

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float]) -> nn.Module:
        """Sets the resident model to Σ_i λ_i θ_i (full) or base + Σ_i λ_i s_i B_i A_i (LoRA), in place.

        Args:
            weights: λ, one per expert; on the simplex unless the soup allows extrapolation.

        Returns:
            The resident model (the same object every time).

        Raises:
            SoupsError: bad λ (count, sign, sum, NaN), or the model's tensors were replaced behind the soup's back.
        """
        if self._batched:
            raise SoupsError("set_weights inside Soup.batched(...): leave the batched context first")
        lam_list = validate_weights(weights, len(self.paths), self._allow_extrapolation)
        lam = torch.tensor(lam_list, dtype=torch.float32)
        for group in self._groups:
            group.apply(lam)
        for param, blocks, owner in self._lora_blocks:
            lam_cols = lam.to(blocks.device)[owner]  # (R,): λ of the expert owning each rank-1 column
            param.data.copy_(blocks * lam_cols)
        self.weights = tuple(lam_list)
        return self.model

    @property
    def batchable(self) -> bool:
        """Whether `batched` applies: LoRA experts without `modules_to_save`."""
        return bool(self._lora_blocks) and not self._groups

    @contextmanager
    def batched(self, lambdas: Sequence[Sequence[float]] | torch.Tensor) -> Iterator[BatchedSoup]:
        """K mixes in one batched forward (LoRA soups only): each row of a batch runs at its own λ.

        Inside the context `soup.model` computes, for row j of a batch of B rows, the soup at
        λ_{j // (B/K)} (λ-major rows: `BatchedSoup.expand` lays a batch of prompts out so). `generate` works
        unchanged, including with `num_return_sequences` and beams. On exit the model is back at `soup.weights`.

        Args:
            lambdas: K weight vectors, shape (K, N); each on the simplex unless the soup allows extrapolation.

        Yields:
            A `BatchedSoup` (its `model` is `soup.model`).

        Raises:
            SoupsError: a soup of full checkpoints or with `modules_to_save`, bad λ, a nested context, or (in a
                forward) a batch whose size is not a multiple of K.
        """
        if not self._lora_blocks:
            raise SoupsError("Soup.batched needs LoRA experts; a soup of full checkpoints switches weights in place "
                             "(set_weights), one λ per forward")
        if self._groups:
            raise SoupsError("Soup.batched: these LoRA experts have modules_to_save (full tensors mixed per λ, not "
                             "per row); evaluate them one λ at a time with set_weights")
        if self._batched:
            raise SoupsError("Soup.batched contexts cannot be nested")
        rows = lambdas.tolist() if isinstance(lambdas, torch.Tensor) else [list(lam) for lam in lambdas]
        if not rows:
            raise SoupsError("Soup.batched needs at least one λ")
        lam = torch.tensor([validate_weights(r, len(self.paths), self._allow_extrapolation) for r in rows],
                           dtype=torch.float32)  # (K, N)
        a_of_b = {}  # B parameter -> the lora_A module of the same layer
        for module in self.model.modules():
            lora_b = getattr(module, "lora_B", None)
            if isinstance(lora_b, nn.ModuleDict) and "default" in lora_b:
                a_of_b[id(lora_b["default"].weight)] = module.lora_A["default"]  # type: ignore[index]
        batch = BatchedSoup(self.model, lam)
        handles = []
        self._batched = True
        try:
            with torch.no_grad():
                for param, blocks, owner in self._lora_blocks:
                    param.data.copy_(blocks)  # λ = 1: the rows' own λ are applied to A_cat x
                    cols = lam.to(blocks.device)[:, owner]  # (K, R): row k's λ of the expert owning column j
                    handles.append(a_of_b[id(param)].register_forward_hook(batch._hook(cols)))
            yield batch
        finally:
            for handle in handles:
                handle.remove()
            self._batched = False
            if self.weights:
                self.set_weights(self.weights)

    # ---- constructors ------------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_checkpoints(
        cls,
        paths: Sequence[str | Path],
        model: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        weights: Sequence[float] | None = None,
        allow_extrapolation: bool = False,
        progress: bool = True,
    ) -> Soup:
        """Holds N full checkpoints and one resident model.

        Args:
            paths: Expert checkpoints (HF dirs, .safetensors or state-dict files; see `soups.checkpoint`).
            model: The resident model; default: the first expert's architecture via `from_pretrained`.
            device: Where the model and the stacked experts live ("cuda" for speed).
            dtype: dtype of the model and of the stored experts (e.g. "bf16" halves memory); default: the model's.
            weights: Initial λ; default uniform.
            allow_extrapolation: Accept λ off the simplex in `set_weights`.
            progress: tqdm bar while reading experts.

        Raises:
            SoupsError: unreadable experts, or a tensor of an expert that has no place in the model (or a model
                tensor that an expert lacks, or a shape mismatch), a NaN/Inf in an expert, LoRA factors, or an
                integer/quantized tensor that differs across experts, naming the expert and the tensor.
        """
        if not paths:
            raise SoupsError("a Soup needs at least one expert")
        ckpts = [open_checkpoint(p) for p in paths]
        adapters = [c.path for c in ckpts if c.kind == "peft"]
        if adapters:
            raise SoupsError(f"expert {adapters[0]} is a PEFT adapter; use Soup.from_lora(adapters, base_model)")
        for ckpt in ckpts:
            found = find_lora_factor(ckpt.keys())
            if found is not None:
                raise SoupsError(lora_factor_message(ckpt.path, *found))
        if weights is not None:
            validate_weights(weights, len(ckpts), allow_extrapolation)  # fail before reading anything
        torch_dtype = parse_dtype(dtype)
        if model is None:
            model = _build_model(ckpts[0], torch_dtype)
        dev = torch.device(device)
        model = model.to(device=dev, dtype=torch_dtype) if torch_dtype is not None else model.to(dev)
        model.eval()

        # ---- map every model tensor to the experts' keys --------------------------------------------------------
        groups = _aliases(model)
        model_names = {n for names, _ in groups.values() for n in names}
        plan: list[tuple[str, list[str], torch.Tensor]] = []  # (checkpoint key, aliases, tensor)
        for names, tensor in groups.values():
            key = next((n for n in names if n in ckpts[0]), None)
            if key is None:
                raise SoupsError(f"model tensor {names[0]!r} is missing from expert {ckpts[0].path}")
            plan.append((key, names, tensor))
        for ckpt in ckpts:
            extra = [k for k in ckpt.keys() if k not in model_names]
            if extra:
                raise SoupsError(
                    f"tensor {extra[0]!r} of expert {ckpt.path} matches no tensor of {type(model).__name__} "
                    f"({len(extra)} such tensors); is it the same architecture?"
                )
            for key, _, tensor in plan:
                if key not in ckpt:
                    raise SoupsError(f"expert {ckpt.path} has no tensor {key!r}")
                if tuple(ckpt.shape(key)) != tuple(tensor.shape):
                    raise SoupsError(
                        f"tensor {key!r} of expert {ckpt.path} has shape {ckpt.shape(key)}, "
                        f"the model expects {tuple(tensor.shape)}"
                    )

        # ---- read experts: stack float tensors per dtype, copy integer/quantized ones where that is right --------
        by_dtype: dict[torch.dtype, list[tuple[str, list[str], torch.Tensor]]] = {}
        for key, names, tensor in plan:
            if not is_quantized(tensor.dtype) and not is_quantized(ckpts[0].dtype(key)):
                by_dtype.setdefault(tensor.dtype, []).append((key, names, tensor))
            else:
                tensor.data.copy_(check_copyable(key, (c.get_tensor(key) for c in ckpts), [c.path for c in ckpts]))
        flat_groups: list[_FlatGroup] = []
        bar = tqdm(total=len(ckpts) * sum(len(v) for v in by_dtype.values()), desc="soup experts", unit="tensor",
                   disable=bar_disabled(progress))
        for tdtype, entries in by_dtype.items():

            def read(i: int, j: int, entries: list[tuple[str, list[str], torch.Tensor]] = entries) -> torch.Tensor:
                bar.update(1)
                key = entries[j][0]
                return _finite(ckpts[i].get_tensor(key), key, ckpts[i].path)

            targets = [([_owner(model, n) for n in names], tensor.shape) for _, names, tensor in entries]
            flat_groups.append(_bind(targets, len(ckpts), read, tdtype, torch_dtype or tdtype, dev))
        bar.close()
        soup = cls(model, [c.path for c in ckpts], flat_groups, [], allow_extrapolation)
        soup.set_weights(weights if weights is not None else [1.0 / len(ckpts)] * len(ckpts))
        return soup

    @classmethod
    @torch.no_grad()
    def from_lora(
        cls,
        adapter_paths: Sequence[str | Path],
        base_model: nn.Module,
        *,
        weights: Sequence[float] | None = None,
        allow_extrapolation: bool = False,
    ) -> Soup:
        """Wraps `base_model` (in place, no copy) with one concatenated adapter of rank Σr_i.

        Args:
            adapter_paths: PEFT LoRA adapter directories on this base.
            base_model: The base transformers model (not already a PeftModel); it becomes `soup.model.base_model`.
            weights: Initial λ; default uniform.
            allow_extrapolation: Accept λ off the simplex in `set_weights`.

        Raises:
            SoupsError: incompatible or unsupported adapters (see `soups.lora.check_compatible`), or a tensor that
                does not land in the model.
        """
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(base_model, PeftModel):
            raise SoupsError("Soup.from_lora needs the plain base model, got a PeftModel; pass model.get_base_model()")
        adapters = [read_adapter(p) for p in adapter_paths]
        check_compatible(adapters, "delta")
        for ad in adapters:  # before the base model is wrapped
            for name, factors in ad.modules.items():
                _finite(factors.a, f"{name}.lora_A", ad.path)
                _finite(factors.b, f"{name}.lora_B", ad.path)
            for name, tensor in ad.saved.items():
                _finite(tensor, name, ad.path)
        n = len(adapters)
        if weights is not None:
            validate_weights(weights, n, allow_extrapolation)  # fail before touching the base model
        # λ = 1 for everyone: B_cat = hstack(s_i B_i), the blocks that set_weights rescales by λ_i.
        blocks = mix_modules(adapters, [1.0] * n, "delta")
        raw = concat_adapter_config(adapters, blocks, "delta")
        fields = {f for f, spec in LoraConfig.__dataclass_fields__.items() if spec.init}
        config = LoraConfig(**{k: v for k, v in raw.items() if k in fields and k not in ("peft_type", "task_type")})
        config.task_type = raw.get("task_type")
        model = get_peft_model(base_model, config)
        model.eval()

        # ---- A blocks (fixed) and modules_to_save (as a flat group) land through the strict loader ------------
        own = model.state_dict()
        state = {}
        for name, m in blocks.items():
            key = f"base_model.model.{name}.lora_A.default.weight"
            if key not in own:
                raise SoupsError(f"adapter module {name!r} was not created in {type(base_model).__name__}")
            state[key] = m.a.to(own[key].dtype)
        load_state_dict_strict(model, state, "concatenated LoRA A")
        lora_blocks = []
        for name, m in blocks.items():
            param = model.get_submodule(f"base_model.model.{name}").lora_B["default"].weight
            owner = torch.cat([torch.full((ad.modules[name].rank,), i) for i, ad in enumerate(adapters)
                               if name in ad.modules])
            lora_blocks.append((param, m.b.to(param.device), owner.to(param.device)))
        groups: list[_FlatGroup] = []
        if adapters[0].saved:
            by_dtype: dict[torch.dtype, list[tuple[str, str]]] = {}  # dtype -> [(adapter key, model key)]
            for saved_key in adapters[0].saved:
                module_name, _, attr = saved_key.rpartition(".")
                key = f"base_model.model.{module_name}.modules_to_save.default.{attr}"
                if key not in own:
                    raise SoupsError(f"modules_to_save tensor {saved_key!r} of {adapters[0].path} has no place {key!r}")
                by_dtype.setdefault(own[key].dtype, []).append((saved_key, key))
            for tdtype, entries in by_dtype.items():
                targets = [([_owner(model, key)], own[key].shape) for _, key in entries]
                names = [k for k, _ in entries]
                groups.append(_bind(targets, n, lambda i, j, names=names: adapters[i].saved[names[j]], tdtype,
                                    torch.float32, own[entries[0][1]].device))
        soup = cls(model, [a.path for a in adapters], groups, lora_blocks, allow_extrapolation)
        soup.set_weights(weights if weights is not None else [1.0 / n] * n)
        return soup


class BatchedSoup:
    """The model of `Soup.batched`: row j of a batch of B rows runs at λ_{j // (B/K)} (λ-major).

    Attributes:
        model: The resident model (the soup's), with per-row λ hooks while the context is open.
        lambdas: The K weight vectors, shape (K, N), float32.
    """

    def __init__(self, model: nn.Module, lambdas: torch.Tensor) -> None:
        self.model = model
        self.lambdas = lambdas

    def __len__(self) -> int:
        return int(self.lambdas.shape[0])

    def expand(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch of P rows repeated for every λ, λ-major: shape (K·P, ...), rows k·P..(k+1)·P−1 at λ_k."""
        return tensor.repeat(len(self), *([1] * (tensor.dim() - 1)))

    def split(self, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of `expand` on outputs: (K·P, ...) -> (K, P, ...)."""
        if tensor.shape[0] % len(self):
            raise SoupsError(f"a batch of {tensor.shape[0]} rows does not split over {len(self)} λ")
        return tensor.reshape(len(self), tensor.shape[0] // len(self), *tensor.shape[1:])

    def _hook(self, cols: torch.Tensor) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
        """A forward hook on a concatenated lora_A: its output (B, ..., R) scaled by each row's λ columns."""
        k = len(self)

        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            rows = out.shape[0]
            if rows % k:
                raise SoupsError(f"Soup.batched with {k} λ got a batch of {rows} rows; lay rows out λ-major "
                                 "(BatchedSoup.expand), K·P rows")
            scale = cols.to(out.dtype).repeat_interleave(rows // k, dim=0)  # (B, R)
            return out * scale.view(rows, *([1] * (out.dim() - 2)), -1)

        return hook
