"""The Brax front: policies load as checkpoint kind `brax`, a Soup mixes them, the `brax` evaluator rolls them out.
Needs the `brax` extra (skipped without it); random policies, no training."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("brax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from rl.locomotion import models  # noqa: E402
from soups.front import open_soup  # noqa: E402
from soups.pareto_registry import build_evaluator, check_experts, checkpoint_kind  # noqa: E402
from soups.utils import SoupsError  # noqa: E402

META = {"env": "swimmer", "backend": "generalized", "policy_hidden_layer_sizes": [16, 16],
        "value_hidden_layer_sizes": [8], "activation": "swish", "episode_length": 12}  # fmt: skip
EVAL = {"name": "brax", "episodes": 3, "seed": 0, "episode_length": 12}


def _policy(path, seed: int, meta: dict = META) -> str:
    """A random policy of `meta` saved at `path`; every policy shares one normaliser (as frozen experts do)."""
    from brax.training.acme import running_statistics, specs

    obs_size, act_size = 8, 2  # swimmer (generalized)
    nets = models.make_networks(meta, obs_size, act_size)
    key_p, key_v = jax.random.split(jax.random.PRNGKey(seed))
    norm = running_statistics.init_state(specs.Array((obs_size,), jnp.dtype("float32")))
    norm = running_statistics.update(norm, jax.random.normal(jax.random.PRNGKey(99), (32, obs_size)))
    models.save_policy(path, (norm, nets.policy_network.init(key_p), nets.value_network.init(key_v)), meta)
    return str(path)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("brax")
    return [_policy(root / "risky", 1), _policy(root / "cautious", 2)]


@pytest.fixture(scope="module")
def evaluator(experts):
    return build_evaluator(EVAL, experts=experts, device=torch.device("cpu"))


def test_vertex_of_the_soup_scores_as_the_expert_itself(experts, evaluator):
    assert checkpoint_kind(experts[0]) == "brax"
    soup = open_soup(experts, base_model=None, device=torch.device("cpu"), dtype=torch.float32)
    own, _ = models.load_policy(experts[0])
    expected = evaluator.evaluate_params(own)
    soup.set_weights([1.0, 0.0])
    got = evaluator.evaluate(soup.model)
    assert got == expected  # same seeds, same params: the rollout returns are identical, not just close
    # the two experts differ, so the test above could fail
    assert evaluator.evaluate_params(models.load_policy(experts[1])[0]) != expected


def test_half_soup_is_the_mean_of_the_params(experts, evaluator):
    soup = open_soup(experts, base_model=None, device=torch.device("cpu"), dtype=torch.float32)
    soup.set_weights([0.5, 0.5])
    a, b = (models.load_policy(p)[0] for p in experts)

    def half(x, y):  # floats averaged; the count words (equal) and the static std_eps kept
        return (x + y) / 2 if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x

    mean = jax.tree_util.tree_map(half, a, b)
    vel_soup, ctrl_soup = evaluator.rollout(models.unflatten_params(soup.model.flat_numpy()))
    vel_mean, ctrl_mean = evaluator.rollout(mean)
    np.testing.assert_allclose(vel_soup, vel_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ctrl_soup, ctrl_mean, rtol=1e-4, atol=1e-5)


def test_different_networks_are_refused_before_any_rollout(experts, tmp_path):
    other = _policy(tmp_path / "big", 3, {**META, "policy_hidden_layer_sizes": [32, 32]})
    with pytest.raises(SoupsError, match=r"differ in policy_hidden_layer_sizes"):
        check_experts([experts[0], other])
    with pytest.raises(SoupsError, match=r"differ in policy_hidden_layer_sizes"):
        build_evaluator(EVAL, experts=[experts[0], other], device=torch.device("cpu"))


def test_nan_expert_is_refused(experts, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = _policy(tmp_path / "nan", 4)
    flat = load_file(f"{bad}/{models.WEIGHTS_FILE}")
    flat["value/params/hidden_0/bias"][0] = np.nan
    save_file(flat, f"{bad}/{models.WEIGHTS_FILE}")
    with pytest.raises(SoupsError, match=r"value/params/hidden_0/bias.*NaN"):
        open_soup([experts[0], bad], base_model=None, device=torch.device("cpu"), dtype=torch.float32)
