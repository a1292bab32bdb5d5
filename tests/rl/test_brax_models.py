"""Brax policies as flat safetensors: bit-identical actions after a round trip, the UInt64 count, bad files,
the reward mapping. Needs the `brax` extra (skipped without it); no training, so it stays in the default run."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("brax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rl.locomotion import models  # noqa: E402
from rl.locomotion.rewards import env_reward_kwargs, return_of  # noqa: E402
from rl.locomotion.task import check_env  # noqa: E402
from soups.utils import SoupsError  # noqa: E402

OBS, ACT = 6, 2
META = {"env": "swimmer", "backend": "generalized", "policy_hidden_layer_sizes": [16, 16],
        "value_hidden_layer_sizes": [8], "activation": "swish"}  # fmt: skip


def _params(seed: int = 0, meta: dict = META) -> tuple:
    """Random PPO params of `meta`'s networks and a normaliser that has seen 2³² + 5 observations."""
    from brax.training import types as brax_types
    from brax.training.acme import running_statistics, specs

    nets = models.make_networks(meta, OBS, ACT)
    key_p, key_v, key_o = jax.random.split(jax.random.PRNGKey(seed), 3)
    norm = running_statistics.init_state(specs.Array((OBS,), jnp.dtype("float32")))
    norm = running_statistics.update(norm, jax.random.normal(key_o, (64, OBS)) * 3.0 + 1.0)
    # a count above 2³²: the high word must survive the round trip, not only the low one
    norm = norm.replace(count=brax_types.UInt64(hi=jnp.uint32(1), lo=jnp.uint32(5)))
    return nets, (norm, nets.policy_network.init(key_p), nets.value_network.init(key_v))


def test_round_trip_gives_bit_identical_actions(tmp_path):
    nets, params = _params()
    models.save_policy(tmp_path / "p", params, META)
    loaded, meta = models.load_policy(tmp_path / "p")
    assert meta == META
    obs = jax.random.normal(jax.random.PRNGKey(1), (32, OBS)) * 4.0
    key = jax.random.PRNGKey(2)
    a0, _ = models.make_policy(nets, params)(obs, key)
    a1, _ = models.make_policy(nets, loaded)(obs, key)
    np.testing.assert_array_equal(np.asarray(a0), np.asarray(a1))
    # stochastic actions too (same key): the whole policy pytree, not just the mean, is restored
    s0, _ = models.make_policy(nets, params, deterministic=False)(obs, key)
    s1, _ = models.make_policy(nets, loaded, deterministic=False)(obs, key)
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1))
    # the value network too
    v0 = nets.value_network.apply(params[0], params[2], obs)
    v1 = nets.value_network.apply(loaded[0], loaded[2], obs)
    np.testing.assert_array_equal(np.asarray(v0), np.asarray(v1))


def test_flat_names_and_uint64_count(tmp_path):
    _, params = _params()
    flat = models.flatten_params(params)
    assert "policy/params/hidden_0/kernel" in flat and "value/params/hidden_0/bias" in flat
    assert {"normalizer/mean", "normalizer/std", "normalizer/summed_variance"} <= set(flat)
    assert flat["normalizer/count_hi"].dtype == np.uint32 and int(flat["normalizer/count_hi"]) == 1
    assert models.count_of(flat) == 2**32 + 5
    models.save_policy(tmp_path / "p", params, META)
    loaded, _ = models.load_policy(tmp_path / "p")
    assert int(loaded[0].count.hi) == 1 and int(loaded[0].count.lo) == 5


def test_nan_policy_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, params = _params()
    models.save_policy(tmp_path / "p", params, META)
    flat = load_file(str(tmp_path / "p" / models.WEIGHTS_FILE))
    flat["policy/params/hidden_1/kernel"][0, 0] = np.nan
    save_file(flat, str(tmp_path / "p" / models.WEIGHTS_FILE))
    with pytest.raises(SoupsError, match=r"policy/params/hidden_1/kernel.*NaN"):
        models.load_policy(tmp_path / "p")
    with pytest.raises(SoupsError, match="NaN"):
        models.save_policy(tmp_path / "q", models.unflatten_params(flat), META)


def test_incompatible_policies_are_named(tmp_path):
    _, params = _params()
    models.save_policy(tmp_path / "a", params, META)
    bigger = {**META, "policy_hidden_layer_sizes": [32, 32]}
    _, params_b = _params(meta=bigger)
    models.save_policy(tmp_path / "b", params_b, bigger)
    with pytest.raises(SoupsError, match=r"policy_hidden_layer_sizes.*\[16, 16\].*\[32, 32\]"):
        models.check_compatible([str(tmp_path / "a"), str(tmp_path / "b")])
    other_env = {**META, "env": "halfcheetah"}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / models.META_FILE).write_text(json.dumps(other_env))
    with pytest.raises(SoupsError, match="differ in env"):
        models.check_compatible([str(tmp_path / "a"), str(tmp_path / "c")])


def test_reward_mapping_hand_worked():
    # an expert: R_α = v − α‖a‖²
    assert env_reward_kwargs([0.0]) == {"forward_reward_weight": 1.0, "ctrl_cost_weight": 0.0}
    assert env_reward_kwargs([1.0]) == {"forward_reward_weight": 1.0, "ctrl_cost_weight": 1.0}
    # MORL μ = (0.5, 0.5) of (risky α=0, cautious α=1) is α = 0.5; μ = (0.25, 0.75) is α = 0.75
    assert env_reward_kwargs([0.0, 1.0], [0.5, 0.5]) == {"forward_reward_weight": 1.0, "ctrl_cost_weight": 0.5}
    assert env_reward_kwargs([0.0, 1.0], [0.25, 0.75])["ctrl_cost_weight"] == 0.75
    # velocity 3, control −2 (Σ‖a‖² = 2): R_0 = 3, R_1 = 1, R_0.5 = 2
    assert [return_of(3.0, -2.0, a) for a in (0.0, 1.0, 0.5)] == [3.0, 1.0, 2.0]
    with pytest.raises(SoupsError, match="sum to 1"):
        env_reward_kwargs([0.0, 1.0], [0.5, 0.6])
    with pytest.raises(SoupsError, match="≥ 0"):
        env_reward_kwargs([-1.0])


@pytest.mark.slow  # builds and jits a Brax env step: tens of seconds on 2 CPU cores
def test_env_reward_matches_brax_own_terms():
    """The env built with the mapping pays v − α‖a‖² per step (its own reward, checked against its metrics)."""
    from rl.locomotion.task import make_env

    env = make_env("swimmer", "generalized", env_reward_kwargs([0.0, 1.0], [0.5, 0.5]))
    state = env.reset(jax.random.PRNGKey(0))
    action = jnp.full((env.action_size,), 0.5)
    nxt = env.step(state, action)
    expected = float(nxt.metrics["velocity"]) - 0.5 * float(nxt.metrics["ctrl_cost"])
    assert float(nxt.metrics["ctrl_cost"]) == pytest.approx(0.25 * env.action_size)
    assert float(nxt.reward) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_unknown_env_and_backend_list_valid_names():
    with pytest.raises(SoupsError, match=r"unknown brax env 'cheetah'; valid: ant, halfcheetah"):
        check_env("cheetah", "generalized")
    with pytest.raises(SoupsError, match=r"unknown brax backend 'fast'; valid: generalized, positional"):
        check_env("halfcheetah", "fast")
    with pytest.raises(SoupsError, match=r"'swimmer' has no 'positional' backend; valid for it: generalized"):
        check_env("swimmer", "positional")
