"""Brax PPO params <-> flat named arrays (safetensors), the policy file's JSON, and the torch view a `Soup` mixes.

`brax.training.agents.ppo.train` returns params = (normaliser state, policy params, value params). A policy file
(a directory) holds them as ONE safetensors of flat, named float32 arrays plus a small JSON:

    <dir>/model.safetensors      policy/params/hidden_0/kernel, ..., value/params/..., normalizer/mean,
                                 normalizer/std, normalizer/summed_variance, normalizer/count_hi, normalizer/count_lo
    <dir>/brax_policy.json       env, backend, network sizes, activation, reward, normaliser mode (the marker file)

The normaliser's `count` is a `UInt64(hi, lo)` of two uint32 words, which safetensors has no type for as one
number: its two words are stored as uint32 arrays of shape [] and joined back on load. Names are
`flax.traverse_util.flatten_dict(sep="/")` keys, so no pickle is involved and `soups.mix`/`Soup` see a policy as
any other checkpoint. `BraxParams` is the torch module a `Soup` keeps resident (one parameter per float array,
one buffer per count word); the evaluator turns its tensors back into the jax pytree.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from soups.utils import SoupsError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "brax_policy.json"  # its presence marks a directory as a Brax policy (soups.front's checkpoint kinds)
PREFIXES = ("policy", "value", "normalizer")
COUNT_KEYS = ("normalizer/count_hi", "normalizer/count_lo")
META_KEYS = ("env", "backend", "policy_hidden_layer_sizes", "value_hidden_layer_sizes", "activation")
ACTIVATIONS = ("swish", "relu", "tanh", "elu", "gelu", "silu")

__all__ = ["flatten_params", "unflatten_params", "save_policy", "load_policy", "read_meta", "check_compatible",
           "make_networks", "make_policy", "BraxParams", "build_resident_model"]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# pytree <-> flat arrays
# ----------------------------------------------------------------------------------------------------------


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """(normaliser state, policy, value) -> {"policy/params/hidden_0/kernel": array, ...}, all numpy.

    Raises:
        SoupsError: `params` is not a 3-tuple, or the normaliser has nested (dict) observations.
    """
    from flax.traverse_util import flatten_dict

    if not isinstance(params, tuple | list) or len(params) != 3:
        raise SoupsError(f"brax PPO params must be (normalizer, policy, value), got {type(params).__name__}")
    normalizer, policy, value = params
    flat: dict[str, np.ndarray] = {}
    for prefix, tree in (("policy", policy), ("value", value)):
        for key, leaf in flatten_dict(dict(tree), sep="/").items():
            flat[f"{prefix}/{key}"] = np.asarray(leaf)
    for name in ("mean", "std", "summed_variance"):
        leaf = getattr(normalizer, name)
        if isinstance(leaf, Mapping):
            raise SoupsError("dict observations are not supported: the normaliser's statistics must be arrays")
        flat[f"normalizer/{name}"] = np.asarray(leaf)
    count = normalizer.count
    hi, lo = (count.hi, count.lo) if hasattr(count, "hi") else divmod(int(np.asarray(count)), 2**32)
    # safetensors has no uint64: the count's two uint32 words are stored as they are (exact, no float rounding)
    flat[COUNT_KEYS[0]] = np.asarray(hi, dtype=np.uint32).reshape(())
    flat[COUNT_KEYS[1]] = np.asarray(lo, dtype=np.uint32).reshape(())
    return flat


def count_of(flat: Mapping[str, Any]) -> int:
    """The normaliser's observation count, hi · 2³² + lo."""
    return int(np.asarray(flat[COUNT_KEYS[0]])) * 2**32 + int(np.asarray(flat[COUNT_KEYS[1]]))


def unflatten_params(flat: Mapping[str, Any], *, std_eps: float = 0.0, mode: str = "welford") -> tuple[Any, Any, Any]:
    """The inverse of `flatten_params`: {name: array} -> (RunningStatisticsState, policy, value) of jax arrays.

    Raises:
        SoupsError: a prefix outside policy/value/normalizer, or a missing normaliser array.
    """
    import jax.numpy as jnp
    from brax.training import types as brax_types
    from brax.training.acme import running_statistics
    from flax.traverse_util import unflatten_dict

    trees: dict[str, dict[str, Any]] = {"policy": {}, "value": {}, "normalizer": {}}
    for key, value in flat.items():
        prefix, _, rest = key.partition("/")
        if prefix not in trees or not rest:
            raise SoupsError(f"tensor {key!r} is not under {', '.join(p + '/' for p in PREFIXES)}")
        trees[prefix][rest] = value
    norm = trees["normalizer"]
    missing = [k for k in ("mean", "std", "summed_variance", "count_hi", "count_lo") if k not in norm]
    if missing:
        raise SoupsError(f"brax params lack normalizer/{missing[0]}")
    # numpy scalars: UInt64 casts them with jnp.uint32, which would turn a 0-d jax array into shape [1]
    count = brax_types.UInt64(hi=np.uint32(np.asarray(norm["count_hi"]).item()),
                              lo=np.uint32(np.asarray(norm["count_lo"]).item()))  # fmt: skip
    modes = running_statistics.NormalizationMode
    normalizer = running_statistics.RunningStatisticsState(
        mean=jnp.asarray(norm["mean"]), std=jnp.asarray(norm["std"]), count=count,
        summed_variance=jnp.asarray(norm["summed_variance"]), std_eps=std_eps,
        mode=modes.EMA if mode == "ema" else modes.WELFORD,
    )  # fmt: skip

    def tree(prefix: str) -> dict[str, Any]:
        return unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in trees[prefix].items()})

    return normalizer, tree("policy"), tree("value")


# ----------------------------------------------------------------------------------------------------------
# policy files
# ----------------------------------------------------------------------------------------------------------


def save_policy(directory: str | Path, params: Any, meta: Mapping[str, Any]) -> Path:
    """Writes `params` as `<directory>/model.safetensors` + `<directory>/brax_policy.json` (`meta`: env, backend,
    network sizes, activation, reward, normaliser). Refuses non-finite arrays.

    Raises:
        SoupsError: a NaN/Inf array (named), or `meta` lacking one of `META_KEYS`.
    """
    from safetensors.numpy import save_file

    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise SoupsError(f"brax policy meta lacks {missing[0]!r}")
    flat = flatten_params(params)
    for key, value in flat.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise SoupsError(f"refusing to save brax policy to {directory}: tensor {key!r} has a NaN/Inf")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(directory / WEIGHTS_FILE))
    (directory / META_FILE).write_text(json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The policy's JSON (`brax_policy.json`) with its network sizes as lists.

    Raises:
        SoupsError: no such file, unreadable JSON, or a missing key.
    """
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise SoupsError(f"{directory} is not a brax policy: no {META_FILE}")
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise SoupsError(f"cannot read {path}: {err}") from err
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise SoupsError(f"{path} lacks {missing[0]!r}")
    return meta


def load_policy(directory: str | Path) -> tuple[tuple[Any, Any, Any], dict[str, Any]]:
    """Reads a policy file back: ((normaliser, policy, value) as jax pytrees, meta).

    Raises:
        SoupsError: a missing/unreadable file, or a NaN/Inf tensor (named with the file).
    """
    from safetensors.numpy import load_file

    meta = read_meta(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise SoupsError(f"brax policy {directory} has {META_FILE} but no {WEIGHTS_FILE}")
    try:
        flat = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a truncated/corrupt file
        raise SoupsError(f"cannot read {path}: {err}") from err
    check_finite_arrays(flat, path)
    norm = meta.get("normalizer", {}) if isinstance(meta.get("normalizer"), Mapping) else {}
    return unflatten_params(flat, std_eps=float(norm.get("std_eps", 0.0)), mode=str(norm.get("mode", "welford"))), meta


def check_finite_arrays(flat: Mapping[str, Any], source: object) -> None:
    """Raises `SoupsError` naming the first float array of `flat` holding a NaN/Inf, and `source`."""
    for key, value in flat.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise SoupsError(f"{source}: tensor {key!r} has a NaN/Inf; this policy cannot be loaded or mixed")


def check_compatible(paths: list[str]) -> list[dict[str, Any]]:
    """Checks that brax policies can be mixed: same env, backend, network sizes and activation. Reads JSON only.

    Returns:
        Every policy's meta, in order.

    Raises:
        SoupsError: naming the differing key, its two values and the two policies.
    """
    metas = [read_meta(p) for p in paths]
    for path, meta in zip(paths[1:], metas[1:]):
        for key in META_KEYS:
            if meta[key] != metas[0][key]:
                raise SoupsError(f"brax policies differ in {key}: {paths[0]} has {metas[0][key]!r}, {path} has "
                                 f"{meta[key]!r}; only policies of one env and one network can be mixed")  # fmt: skip
    return metas


# ----------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------


def activation_fn(name: str) -> Any:
    """The flax activation called `name`.

    Raises:
        SoupsError: an unknown name (the message lists the valid ones).
    """
    from flax import linen

    if name not in ACTIVATIONS:
        raise SoupsError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return getattr(linen, name)


def make_networks(meta: Mapping[str, Any], observation_size: int, action_size: int) -> Any:
    """The brax `PPONetworks` the policy `meta` describes (normalised observations, as in training)."""
    from brax.training.acme import running_statistics
    from brax.training.agents.ppo import networks as ppo_networks

    return ppo_networks.make_ppo_networks(
        observation_size, action_size, preprocess_observations_fn=running_statistics.normalize,
        policy_hidden_layer_sizes=tuple(meta["policy_hidden_layer_sizes"]),
        value_hidden_layer_sizes=tuple(meta["value_hidden_layer_sizes"]), activation=activation_fn(meta["activation"]),
    )  # fmt: skip


def network_factory(meta: Mapping[str, Any]) -> Any:
    """A `network_factory` for `ppo.train` building the networks of `meta`."""
    from brax.training.agents.ppo import networks as ppo_networks

    return functools.partial(
        ppo_networks.make_ppo_networks, policy_hidden_layer_sizes=tuple(meta["policy_hidden_layer_sizes"]),
        value_hidden_layer_sizes=tuple(meta["value_hidden_layer_sizes"]), activation=activation_fn(meta["activation"]),
    )  # fmt: skip


def make_policy(networks: Any, params: Any, deterministic: bool = True) -> Any:
    """`policy(obs, key) -> (action, extras)` of `params` (deterministic = the tanh of the mean action)."""
    from brax.training.agents.ppo import networks as ppo_networks

    return ppo_networks.make_inference_fn(networks)(params[:2], deterministic=deterministic)


# ----------------------------------------------------------------------------------------------------------
# the torch view a Soup mixes
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _torch_module() -> Any:
    import torch

    class BraxParams(torch.nn.Module):
        """A Brax policy's arrays as torch tensors under their flat names (float: parameters; count words:
        buffers), so a `Soup` mixes them in place. It computes nothing: the brax evaluator reads them back."""

        def __init__(self, flat: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
            super().__init__()
            self.meta = dict(meta)
            for key, value in flat.items():
                arr = np.asarray(value)
                if arr.dtype.kind == "f":
                    self.register_parameter(key, torch.nn.Parameter(torch.from_numpy(arr.copy()),
                                                                    requires_grad=False))  # fmt: skip
                else:  # uint32 count words: torch has uint32 storage; kept exact
                    self.register_buffer(key, torch.from_numpy(arr.astype(np.int64)))

        def flat_numpy(self) -> dict[str, np.ndarray]:
            """The current (mixed) arrays as numpy, float32 as brax trains them, count words as uint32."""
            out = {}
            for key, tensor in self.state_dict().items():
                arr = tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
                out[key] = arr.astype(np.uint32) if key in COUNT_KEYS else arr
            return out

    return BraxParams


def build_resident_model(path: str | Path) -> Any:
    """The resident `BraxParams` module of the brax policy at `path` (soups.front's loader of kind `brax`)."""
    from safetensors.numpy import load_file

    meta = read_meta(path)
    flat = load_file(str(Path(path) / WEIGHTS_FILE))
    check_finite_arrays(flat, Path(path) / WEIGHTS_FILE)
    return _torch_module()(flat, meta)


def BraxParams(flat: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Any:  # noqa: N802 - a class factory
    """A `BraxParams` torch module (built lazily so importing this module does not import torch)."""
    return _torch_module()(flat, meta)
