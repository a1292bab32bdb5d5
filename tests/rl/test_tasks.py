"""The embedded facts_summary task (deterministic, parseable, imperfect references), hf_dataset, the tokenizer."""

from __future__ import annotations

import json

import pytest

from rl.text.models import build_tokenizer
from rl.text.rewards import count_statements
from rl.text.task import (
    ENTITIES,
    RELATIONS,
    SUMMARY_MARKER,
    TASKS,
    VALUES,
    FactsSummaryConfig,
    build_task,
    fact_sentence,
    parse_statements,
)
from soups.registry import UnknownNameError
from soups.utils import SoupsError


def test_task_is_deterministic_in_the_seed() -> None:
    a = build_task({"name": "facts_summary", "seed": 3, "n_train": 40, "n_eval": 20})
    b = build_task({"name": "facts_summary", "seed": 3, "n_train": 40, "n_eval": 20})
    c = build_task({"name": "facts_summary", "seed": 4, "n_train": 40, "n_eval": 20})
    assert a.train == b.train and a.eval == b.eval
    assert a.train != c.train
    # the splits are independent streams: the eval prompts are not the first train prompts
    assert [s["prompt"] for s in a.eval] != [s["prompt"] for s in a.train[:20]]
    # a larger n_train extends the same stream (prefix-stable)
    d = build_task({"name": "facts_summary", "seed": 3, "n_train": 50, "n_eval": 20})
    assert d.train[:40] == a.train


def test_samples_are_consistent() -> None:
    task = build_task({"name": "facts_summary", "n_train": 200, "n_eval": 0})
    for s in task.train:
        facts = [tuple(f) for f in s["facts"]]
        assert s["prompt"] == f"{s['document']} {SUMMARY_MARKER}"
        assert parse_statements(s["document"]) == facts  # the document parses back into its facts exactly
        assert 2 <= len(facts) <= 5 and len({(e, r) for e, r, _ in facts}) == len(facts)


def test_references_are_imperfect() -> None:
    """References drop facts, contradict some and add made-up ones, at rates near the configured ones."""
    task = build_task({"name": "facts_summary", "n_train": 400, "n_eval": 0})
    counts = [count_statements(s["facts"], s["reference"]) for s in task.train]
    n_facts = sum(len(s["facts"]) for s in task.train)
    kept = sum(c.supported + c.contradicted for c in counts)
    contradicted = sum(c.contradicted for c in counts)
    with_made_up = sum(c.unsupported > 0 for c in counts)
    assert all(c.malformed == 0 and c.foreign == 0 for c in counts)
    assert 0.6 < kept / n_facts < 0.85  # p_keep = 0.7 (+ at least one kept)
    assert 0.08 < contradicted / kept < 0.22  # p_contradict = 0.15
    assert 0.2 < with_made_up / len(counts) < 0.4  # p_unsupported = 0.35 (when a free slot exists)


def test_parse_statements_hand_written() -> None:
    text = "the fox is red . the owl lives in the cave . blah fox . the fox eats fish the"
    assert parse_statements(text) == [("fox", "color", "red"), ("owl", "habitat", "cave"), None, None]
    assert parse_statements("the fox is cave .") == [None]  # a value of another relation
    assert parse_statements("") == [] and parse_statements(". . .") == []
    for relation in RELATIONS:
        fact = (ENTITIES[0], relation, VALUES[relation][0])
        assert parse_statements(fact_sentence(fact)) == [fact]


@pytest.mark.parametrize(
    "bad", [{"p_keep": 1.5}, {"min_facts": 4, "max_facts": 2}, {"max_entities": 1, "max_facts": 5}, {"n_train": -1}]
)
def test_bad_task_settings(bad: dict) -> None:
    with pytest.raises(SoupsError, match="facts_summary"):
        FactsSummaryConfig(**bad)


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="valid names: facts_summary, hf_dataset"):
        build_task({"name": "summaries"})
    assert "facts_summary" in TASKS


def test_tokenizer_round_trip(tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    prompt = build_task({"name": "facts_summary", "n_train": 1, "n_eval": 0}).train[0]["prompt"]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(prompt.split())  # one id per word
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(prompt, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == prompt and loaded.padding_side == "left"


def test_hf_dataset_from_a_local_file(tmp_path) -> None:
    rows = [{"chosen": f"\n\nHuman: question {i} please\n\nAssistant: answer {i}", "id": i} for i in range(10)]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": "hf_dataset", "path": str(path), "train_split": "train", "eval_split": "train", "n_train": 6,
           "n_eval": 3, "text_column": "chosen", "cut_at": "\n\nAssistant:", "prompt_template": "{text}\n\nAssistant:"}
    task = build_task(cfg)
    assert len(task.train) == 6 and len(task.eval) == 3
    for s in task.train:
        assert s["prompt"].startswith("Human: question ") and s["prompt"].endswith("please\n\nAssistant:")
        assert s["document"] == s["prompt"][: -len("\n\nAssistant:")]
    assert build_task(cfg).train == task.train  # seeded shuffle
    words = build_task({**cfg, "cut_at": None, "max_text_words": 2, "prompt_template": "{text}"})
    assert all(s["prompt"] == "Human: question" for s in words.train)


def test_hf_dataset_errors(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SoupsError, match="no column 'text'; columns: body"):
        build_task({"name": "hf_dataset", "path": str(path)})
    with pytest.raises(SoupsError, match="uses 'title'"):
        build_task({"name": "hf_dataset", "path": str(path), "text_column": "body", "prompt_template": "{title}"})
    with pytest.raises(SoupsError, match="set task.path"):
        build_task({"name": "hf_dataset"})
    bad = tmp_path / "d.txt"
    bad.write_text("x")
    with pytest.raises(SoupsError, match="cannot read"):
        build_task({"name": "hf_dataset", "path": str(bad)})
