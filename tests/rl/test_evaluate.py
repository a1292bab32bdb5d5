"""evaluate_policy: greedy determinism, seeded sampling, per-objective mean/stderr, texts scored as returned."""

from __future__ import annotations

import math

import pytest
import torch

from rl.text.evaluator import evaluate_policy, generate_responses, mean_stderr, summarize_rewards
from rl.text.models import build_tiny_causal_lm, build_tokenizer
from rl.text.rewards import build_reward_set
from rl.text.sft import SFTInitConfig
from rl.text.task import build_task
from soups.utils import SoupsError


def test_mean_stderr_hand_worked() -> None:
    # [1, 2, 3, 4]: mean 2.5; sample var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; stderr = sqrt(5/3) / 2 = 0.645497
    mean, stderr = mean_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and stderr == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_stderr(torch.tensor([7.0])) == (7.0, 0.0)
    with pytest.raises(SoupsError):
        mean_stderr(torch.tensor([]))
    summary = summarize_rewards(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), ["a", "b"])
    # a: mean 2, sample std sqrt(2), stderr sqrt(2)/sqrt(2) = 1 ; b: all zeros
    assert summary["a"] == {"mean": 2.0, "stderr": pytest.approx(1.0), "n": 2}
    assert summary["b"] == {"mean": 0.0, "stderr": 0.0, "n": 2}


@pytest.fixture(scope="module")
def policy() -> tuple:
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_tiny_causal_lm(SFTInitConfig(hidden_size=32, num_layers=1, num_heads=2), len(tok),
                                 tok.pad_token_id, tok.eos_token_id)
    return model, tok


@pytest.fixture(scope="module")
def samples() -> list:
    return build_task({"name": "facts_summary", "n_train": 0, "n_eval": 12}).eval


def test_greedy_evaluation_is_deterministic_and_consistent(policy: tuple, samples: list) -> None:
    model, tok = policy
    rs = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "faithful"})
    a = evaluate_policy(model, tok, samples, rs, max_new_tokens=6, batch_size=5)
    b = evaluate_policy(model, tok, samples, rs, max_new_tokens=6, batch_size=12)
    assert a["texts"] == b["texts"]  # greedy, and independent of the batching (left padding)
    assert a["names"] == ["complete", "faithful"] and len(a["texts"]) == 12
    rewards = torch.tensor(a["rewards"])
    assert torch.equal(rewards, rs(samples, a["texts"]))  # the returned rewards are the texts' rewards
    for k, name in enumerate(a["names"]):
        mean, stderr = mean_stderr(rewards[:, k])
        assert a["objectives"][name] == {"mean": pytest.approx(mean), "stderr": pytest.approx(stderr), "n": 12}
    for text in a["texts"]:  # the prompt is not part of the response, and the length cap holds
        assert "summary :" not in text and len(text.split()) <= 6


def test_sampling_is_seeded_and_leaves_the_caller_rng_alone(policy: tuple, samples: list) -> None:
    model, tok = policy
    rs = build_reward_set({"objectives": ["complete"], "optimize": "complete"})
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = evaluate_policy(model, tok, samples, rs, max_new_tokens=8, do_sample=True, seed=1)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    b = evaluate_policy(model, tok, samples, rs, max_new_tokens=8, do_sample=True, seed=1)
    c = evaluate_policy(model, tok, samples, rs, max_new_tokens=8, do_sample=True, seed=2)
    assert a["texts"] == b["texts"] and a["texts"] != c["texts"]
    assert a["decoding"]["seed"] == 1 and a["decoding"]["do_sample"] is True


def test_model_mode_and_padding_side_restored(policy: tuple, samples: list) -> None:
    model, tok = policy
    model.train()
    tok.padding_side = "right"
    generate_responses(model, tok, [s["prompt"] for s in samples[:2]], max_new_tokens=2)
    assert model.training and tok.padding_side == "right"
    tok.padding_side = "left"
    model.eval()


def test_bad_inputs(policy: tuple) -> None:
    model, tok = policy
    rs = build_reward_set({"objectives": ["complete"], "optimize": "complete"})
    with pytest.raises(SoupsError, match="no samples"):
        evaluate_policy(model, tok, [], rs, max_new_tokens=4)
    with pytest.raises(SoupsError, match="sample 0 has no 'prompt'"):
        evaluate_policy(model, tok, [{"document": "x"}], rs, max_new_tokens=4)
    with pytest.raises(SoupsError, match="max_new_tokens=0"):
        generate_responses(model, tok, ["the fox"], max_new_tokens=0)
