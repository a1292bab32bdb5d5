"""Rule rewards on hand-worked examples, their tension, reward-model scoring, RewardSet, NaN checks, normaliser."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rl.text.reward_models import (
    RewardModelConfig,
    bradley_terry_loss,
    build_reward_classifier,
    build_reward_tokenizer,
    ensure_reward_models,
    perturbed_summary,
    preference_pairs,
)
from rl.text.rewards import (
    ModelReward,
    RewardSet,
    RunningNormalizer,
    build_reward_set,
    check_finite,
    completeness_score,
    count_statements,
    faithfulness_score,
    scalarize,
)
from rl.text.task import build_task
from soups.registry import UnknownNameError
from soups.utils import SoupsError

FACTS = [["fox", "color", "red"], ["fox", "food", "fish"], ["owl", "habitat", "cave"]]
COPY = "the fox is red . the fox eats fish . the owl lives in the cave ."
SAMPLE = {"prompt": COPY + " summary :", "document": COPY, "facts": FACTS}


# ----------------------------------------------------------------------------------------------------------
# Rule rewards
# ----------------------------------------------------------------------------------------------------------


def test_count_statements_classifies_each_kind() -> None:
    response = "the fox is red . the fox eats mice . the fox lives in the river . the crow is black . blah blah ."
    c = count_statements(FACTS, response)
    # supported: fox red; contradicted: fox eats mice (fish); unsupported: fox habitat (not stated);
    # foreign: crow; malformed: "blah blah".
    assert (c.n_statements, c.supported, c.contradicted, c.unsupported, c.foreign, c.malformed) == (5, 1, 1, 1, 1, 1)
    # slots of document entities: (fox,color) true; (fox,food) and (fox,habitat) only wrong/made up.
    assert (c.slots_true, c.slots_other) == (1, 2)


def test_rule_rewards_hand_worked() -> None:
    response = "the fox is red . the fox eats mice . the fox lives in the river . the crow is black . blah blah ."
    c = count_statements(FACTS, response)
    # complete = (slots_true + 0.5 * slots_other) / n_facts = (1 + 0.5 * 2) / 3 = 2/3
    assert completeness_score(c, 3) == pytest.approx(2 / 3)
    # faithful = (supported - 1 * (contr + unsup + foreign + malformed)) / n = (1 - 4) / 5 = -0.6
    assert faithfulness_score(c) == pytest.approx(-0.6)
    # penalty 0.5: (1 - 0.5 * 4) / 5 = -0.2
    assert faithfulness_score(c, penalty=0.5) == pytest.approx(-0.2)


def test_copy_empty_repeat_and_truncated() -> None:
    copy = count_statements(FACTS, COPY)
    assert completeness_score(copy, 3) == 1.0 and faithfulness_score(copy) == 1.0
    empty = count_statements(FACTS, "")
    assert completeness_score(empty, 3) == 0.0 and faithfulness_score(empty) == 0.0
    rep = count_statements(FACTS, "the fox is red . the fox is red .")
    # one supported, one repeat: complete = 1/3; faithful = 1 / 2 (the repeat counts in the denominator only)
    assert completeness_score(rep, 3) == pytest.approx(1 / 3) and faithfulness_score(rep) == 0.5
    cut = count_statements(FACTS, "the fox is red . the owl lives in")
    # a truncated last sentence is malformed: faithful = (1 - 1) / 2 = 0
    assert cut.malformed == 1 and faithfulness_score(cut) == 0.0


def test_rewards_in_tension_at_the_optimum() -> None:
    """Adding made-up statements about document entities raises `complete` and lowers `faithful`."""
    padded = COPY + " the fox lives in the river . the owl is grey ."
    c_copy, c_pad = count_statements(FACTS, COPY), count_statements(FACTS, padded)
    # padded: slots_true 3, slots_other 2 -> complete (3 + 1) / 3 = 4/3 > 1; faithful (3 - 2) / 5 = 0.2 < 1
    assert completeness_score(c_pad, 3) == pytest.approx(4 / 3)
    assert faithfulness_score(c_pad) == pytest.approx(0.2)
    assert completeness_score(c_pad, 3) > completeness_score(c_copy, 3)
    assert faithfulness_score(c_pad) < faithfulness_score(c_copy)


def test_best_of_n_tension_on_noisy_candidates() -> None:
    """Best-of-8 by one reward loses on the other, by more than 2 standard errors (noisy policy stand-in)."""
    rs = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "complete"})
    samples = build_task({"name": "facts_summary", "n_train": 0, "n_eval": 200}).eval
    rng = random.Random(0)
    n = 8
    rep = [s for s in samples for _ in range(n)]
    rewards = rs(rep, [perturbed_summary(rng, s["facts"]) for s in rep]).view(len(samples), n, 2)
    rows = torch.arange(len(samples))
    by_complete = rewards[rows, rewards[:, :, 0].argmax(1)]  # [N, 2]
    by_faithful = rewards[rows, rewards[:, :, 1].argmax(1)]
    diff = by_complete - by_faithful  # paired differences per prompt
    stderr = diff.std(0) / math.sqrt(len(samples))
    assert diff[:, 0].mean() > 2 * stderr[0]  # the complete pick is more complete...
    assert diff[:, 1].mean() < -2 * stderr[1]  # ...and less faithful


def test_rule_rewards_robust_and_need_facts() -> None:
    rs = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "faithful"})
    garbage = ["", ". . .", "summary : the the", "<unk> fox fox is", "the fox is red"]
    out = rs([SAMPLE] * len(garbage), garbage)
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    with pytest.raises(SoupsError, match="needs sample\\['facts'\\]"):
        rs([{"prompt": "x"}], ["the fox is red ."])


# ----------------------------------------------------------------------------------------------------------
# RewardSet, scalarisation, errors
# ----------------------------------------------------------------------------------------------------------


def test_scalarize_hand_worked() -> None:
    rewards = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # 0.25 * 1 + 0.75 * 2 = 1.75 ; 0.25 * 3 + 0.75 * 4 = 3.75
    assert torch.allclose(scalarize(rewards, torch.tensor([0.25, 0.75])), torch.tensor([1.75, 3.75]))
    with pytest.raises(SoupsError):
        scalarize(rewards, torch.tensor([1.0]))


def test_build_reward_set_expert_and_morl() -> None:
    expert = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "faithful"})
    assert expert.names == ["complete", "faithful"] and expert.weights.tolist() == [0.0, 1.0]
    morl = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "morl", "weights": [0.3, 0.7]})
    raw = morl([SAMPLE, SAMPLE], [COPY, "the fox eats mice ."])
    # row 0: complete 1, faithful 1 -> 1.0; row 1: complete 0.5/3, faithful -1 -> 0.3 * 0.5/3 - 0.7 = -0.65
    assert torch.allclose(morl.scalar(raw), torch.tensor([1.0, -0.65]), atol=1e-6)
    assert torch.allclose(expert.scalar(raw), raw[:, 1])


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"objectives": ["complete", "faithful"], "optimize": "morl", "weights": [0.5]}, "1 values for 2"),
        ({"objectives": ["complete", "faithful"], "optimize": "morl", "weights": [0.5, 0.6]}, "sum to 1"),
        ({"objectives": ["complete", "faithful"], "optimize": "morl"}, "needs reward.weights"),
        ({"objectives": ["complete", "faithful"], "optimize": "faithful", "weights": [0.5, 0.5]}, "only used"),
        ({"objectives": ["complete", "faithful"], "optimize": "fluency"}, "valid: complete, faithful, morl"),
        ({"objectives": []}, "empty"),
        ({"objectives": ["complete", "complete"], "optimize": "complete"}, "unique"),
    ],
)
def test_bad_reward_configs(cfg: dict, match: str) -> None:
    with pytest.raises(SoupsError, match=match):
        build_reward_set(cfg)


def test_unknown_reward_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown reward 'completeness'; valid names: complete, .*faithful"):
        build_reward_set({"objectives": ["completeness"], "optimize": "completeness"})


def test_check_finite_names_the_reward() -> None:
    def broken(samples: list, responses: list) -> torch.Tensor:
        return torch.tensor([1.0, float("nan"), float("nan")])

    def fine(samples: list, responses: list) -> torch.Tensor:
        return torch.zeros(len(responses))

    rs = RewardSet([("fine", fine), ("broken", broken)], torch.tensor([0.5, 0.5]), "morl")
    with pytest.raises(SoupsError, match="reward 'broken' returned nan for 2 of 3 responses \\(first: response 1\\)"):
        rs([{}] * 3, ["a", "b", "c"])
    raw = rs([{}] * 3, ["a", "b", "c"], check=False)  # a trainer may check itself
    assert torch.isnan(raw[1, 1])
    with pytest.raises(SoupsError, match="'broken'"):
        check_finite(raw, rs.names)
    check_finite(torch.zeros(3, 2), ["a", "b"])  # finite: no error


def test_reward_returning_wrong_length_is_an_error() -> None:
    rs = RewardSet([("short", lambda s, r: torch.zeros(1))], torch.tensor([1.0]), "short")
    with pytest.raises(SoupsError, match="'short' returned \\(1,\\) values for 2 responses"):
        rs([{}, {}], ["a", "b"])


# ----------------------------------------------------------------------------------------------------------
# Running normaliser
# ----------------------------------------------------------------------------------------------------------


def test_running_normalizer_hand_worked_and_resume() -> None:
    norm = RunningNormalizer(1)
    norm.update(torch.tensor([[1.0], [3.0]]))  # n=2, mean 2, M2 = 1 + 1 = 2
    assert norm.count == 2 and norm.mean.item() == 2.0 and norm.m2.item() == 2.0
    norm.update(torch.tensor([[5.0]]))
    # delta = 5 - 2 = 3; n = 3; mean = 2 + 3 * 1/3 = 3; M2 = 2 + 0 + 9 * 2 * 1 / 3 = 8; var = 8/3
    assert norm.mean.item() == pytest.approx(3.0) and norm.m2.item() == pytest.approx(8.0)
    assert norm.std.item() == pytest.approx(math.sqrt(8 / 3))
    # (5 - 3) / sqrt(8/3) = 1.224745
    assert norm.normalize(torch.tensor([[5.0]])).item() == pytest.approx(1.224745, abs=1e-5)
    # exact resume: a copy from state_dict evolves identically
    other = RunningNormalizer(1)
    other.load_state_dict(norm.state_dict())
    batch = torch.tensor([[0.5], [7.25], [-2.0]])
    norm.update(batch)
    other.update(batch)
    assert torch.equal(norm.mean, other.mean) and torch.equal(norm.m2, other.m2) and norm.count == other.count == 6
    with pytest.raises(SoupsError):
        RunningNormalizer(2).load_state_dict(norm.state_dict())


def test_normalized_reward_set_state_round_trip() -> None:
    cfg = {"objectives": ["complete", "faithful"], "optimize": "morl", "weights": [0.5, 0.5], "normalize": True}
    a, b = build_reward_set(cfg), build_reward_set(cfg)
    raw = a([SAMPLE, SAMPLE, SAMPLE], [COPY, "the fox eats mice .", ""])
    a.scalar(raw)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.scalar(raw, update=False), b.scalar(raw, update=False))
    # after one batch the statistics are that batch's: its normalised columns have zero mean
    assert torch.allclose(a.normalizer.normalize(raw).mean(0), torch.zeros(2, dtype=raw.dtype), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Reward models (HF sequence classifiers) loaded by path
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    tokenizer = build_reward_tokenizer()
    cfg = RewardModelConfig(hidden_size=16, num_layers=1, num_heads=2)
    model = build_reward_classifier(cfg, len(tokenizer), 2, tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _manual_logits(path: str, first: list[str], second: list[str] | None) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    for i, text in enumerate(first):  # one at a time: no padding involved
        enc = tok(text, second[i] if second else None, return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


def test_model_reward_label_and_difference(tiny_classifier: str) -> None:
    samples = [SAMPLE, SAMPLE, SAMPLE]
    responses = [COPY, "the fox eats mice .", "the owl is grey . the owl is grey ."]
    logits = _manual_logits(tiny_classifier, responses, [SAMPLE["document"]] * 3)
    single = ModelReward(tiny_classifier, label=1, text="{response}", text_pair="{document}", device="cpu")
    assert torch.allclose(single(samples, responses), logits[:, 1], atol=1e-5)
    # label names from config.label2id, and the difference logit[faithful] - logit[hallucinated]
    diff = ModelReward(tiny_classifier, label="faithful", minus_label="hallucinated", text="{response}",
                       text_pair="{document}", batch_size=2, device="cpu")
    assert torch.allclose(diff(samples, responses), logits[:, 1] - logits[:, 0], atol=1e-5)


def test_model_reward_template_and_errors(tiny_classifier: str) -> None:
    templ = ModelReward(tiny_classifier, label=0, text="{document} summary : {response}", device="cpu")
    logits = _manual_logits(tiny_classifier, [SAMPLE["document"] + " summary : " + COPY], None)
    assert torch.allclose(templ([SAMPLE], [COPY]), logits[:, 0], atol=1e-5)
    with pytest.raises(SoupsError, match="uses 'title'"):
        ModelReward(tiny_classifier, text="{title} {response}", device="cpu")([SAMPLE], [COPY])
    with pytest.raises(SoupsError, match="label 5 out of range"):
        ModelReward(tiny_classifier, label=5, device="cpu")
    with pytest.raises(SoupsError, match="no label 'fluent'"):
        ModelReward(tiny_classifier, label="fluent", device="cpu")
    with pytest.raises(SoupsError, match="cannot load reward model"):
        ModelReward(str(tiny_classifier) + "-missing", device="cpu")


def test_reward_model_through_config(tiny_classifier: str) -> None:
    cfg = {
        "objectives": [
            "complete",
            {"name": "judge", "type": "reward_model", "model": tiny_classifier, "label": 1, "minus_label": 0,
             "text": "{response}", "text_pair": "{document}", "device": "cpu"},
        ],
        "optimize": "judge",
    }  # fmt: skip
    rs = build_reward_set(cfg)
    out = rs([SAMPLE], [COPY])
    assert rs.names == ["complete", "judge"] and out.shape == (1, 2) and out[0, 0] == 1.0


# ----------------------------------------------------------------------------------------------------------
# Tiny reward models of the embedded task
# ----------------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_hand_worked() -> None:
    # -log sigmoid(2 - 0) = log(1 + e^-2) = 0.126928 ; -log sigmoid(0) = log 2 = 0.693147 ; mean = 0.410038
    loss = bradley_terry_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-5)


def test_preference_pairs_follow_the_rule_reward() -> None:
    samples = build_task({"name": "facts_summary", "n_train": 0, "n_eval": 50}).eval
    rs = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "faithful"})
    pairs = preference_pairs(samples, "faithful", random.Random(0))
    assert len(pairs) > 25
    chosen = rs([s for s, _, _ in pairs], [c for _, c, _ in pairs])[:, 1]
    rejected = rs([s for s, _, _ in pairs], [r for _, _, r in pairs])[:, 1]
    assert (chosen > rejected).all()


def test_embedded_reward_models_load_through_the_reward_model_path(tmp_path) -> None:
    tiny = {"steps": 3, "n_docs": 32, "n_eval_docs": 16, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    paths = ensure_reward_models(tmp_path / "rm", overrides=tiny, show_progress=False)
    assert sorted(paths) == ["complete", "faithful"]
    again = ensure_reward_models(tmp_path / "rm", overrides=tiny, show_progress=False)  # idempotent
    assert again == paths
    with pytest.raises(SoupsError, match="other settings"):
        ensure_reward_models(tmp_path / "rm", overrides={**tiny, "steps": 4}, show_progress=False)
    complete = ModelReward(str(paths["complete"]), label=0, text="{document} summary : {response}", device="cpu")
    manual = _manual_logits(str(paths["complete"]), [SAMPLE["document"] + " summary : " + COPY], None)[:, 0]
    assert torch.allclose(complete([SAMPLE], [COPY]), manual, atol=1e-5)
    # the faithful model: a (response, document) pair scored as logit[faithful] - logit[hallucinated]
    faithful = ModelReward(str(paths["faithful"]), label="faithful", minus_label="hallucinated", text="{response}",
                           text_pair="{document}", device="cpu")
    assert faithful([SAMPLE, SAMPLE], [COPY, ""]).shape == (2,)


@pytest.mark.slow
def test_embedded_reward_models_learn_the_rule_rewards(tmp_path) -> None:
    """The default tiny reward models agree with their rule reward on held-out pairs well above chance (0.5).

    Measured with the defaults (400 steps, 2048 documents): complete 0.872, faithful 0.671. Faithfulness needs the
    classifier to match every stated value against the document, which the 2-layer, 64-wide BERT learns slowly:
    1500 steps on 16384 documents at lr 3e-4 reach 0.725 (91 s instead of ~15 s), so the defaults stay cheap.
    """
    cfg = {
        "objectives": [{"name": n, "type": "embedded_reward_model", "which": n, "dir": str(tmp_path), "device": "cpu"}
                       for n in ("complete", "faithful")],
        "optimize": "faithful",
    }  # fmt: skip
    rs = build_reward_set(cfg)
    import json

    for name, floor in (("complete", 0.75), ("faithful", 0.65)):
        info = json.loads((tmp_path / name / "reward_info.json").read_text())
        assert info["eval_pair_accuracy"] > floor, (name, info["eval_pair_accuracy"])
    assert rs([SAMPLE], [COPY]).shape == (1, 2)
