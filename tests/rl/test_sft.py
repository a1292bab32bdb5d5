"""SFT batches (label masking), the SFT loop, and the embedded SFT init (deterministic, idempotent, atomic)."""

from __future__ import annotations

import json

import pytest
import torch

from rl.text.models import build_tiny_causal_lm, build_tokenizer
from rl.text.sft import SFTInitConfig, _lr_factor, build_sft_batch, ensure_sft_init, sft_train
from soups.utils import SoupsError

TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "n_train": 32, "steps": 4, "batch_size": 8}


def test_sft_batch_masks_prompt_and_padding() -> None:
    tok = build_tokenizer()
    batch = build_sft_batch(tok, ["the fox is red . summary :", "the owl is grey . summary :"],
                            ["the fox is red .", "the owl is grey . the owl eats fish ."])
    # row 0: 7 prompt words + 5 target words + eos = 13 tokens; row 1: 7 + 10 + 1 = 18 (the width)
    assert batch["input_ids"].shape == (2, 18)
    assert batch["attention_mask"][0].tolist() == [1] * 13 + [0] * 5
    labels = batch["labels"][0].tolist()
    assert labels[:7] == [-100] * 7 and labels[13:] == [-100] * 5
    assert labels[7:12] == tok("the fox is red .", add_special_tokens=False)["input_ids"]
    assert labels[12] == tok.eos_token_id
    with pytest.raises(SoupsError, match="2 prompts but 1 targets"):
        build_sft_batch(tok, ["a", "b"], ["c"])


def test_lr_schedule_hand_worked() -> None:
    # warm-up: (step + 1) / warmup ; end of cosine: 0.1 ; midpoint: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert _lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert _lr_factor(55, 100, 10) == pytest.approx(0.55)
    assert _lr_factor(100, 100, 10) == pytest.approx(0.1)


def test_sft_train_fits_a_few_pairs() -> None:
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_tiny_causal_lm(SFTInitConfig(hidden_size=32, num_layers=1, num_heads=2), len(tok),
                                 tok.pad_token_id, tok.eos_token_id)
    prompts = ["the fox is red . summary :", "the owl eats fish . summary :"]
    targets = ["the fox is red .", "the owl eats fish ."]
    losses = sft_train(model, tok, prompts, targets, steps=30, batch_size=2, lr=2e-2, warmup=3,
                       show_progress=False)
    assert len(losses) == 30 and losses[-1] < 0.2 * losses[0]
    assert not model.training


def test_ensure_sft_init_deterministic_idempotent(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = ensure_sft_init(tmp_path / "a", seed=1, overrides=TINY, show_progress=False)
    b = ensure_sft_init(tmp_path / "b", seed=1, overrides=TINY, show_progress=False)
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    stamp = (a / "sft_info.json").stat().st_mtime_ns
    assert ensure_sft_init(a, seed=1, overrides=TINY, show_progress=False) == a  # reused, not rebuilt
    assert (a / "sft_info.json").stat().st_mtime_ns == stamp
    info = json.loads((a / "sft_info.json").read_text())
    assert info["settings"]["steps"] == 4 and len(info["loss_curve"]) == 4
    with pytest.raises(SoupsError, match="other settings"):
        ensure_sft_init(a, seed=1, overrides={**TINY, "steps": 5}, show_progress=False)
    with pytest.raises(SoupsError, match="unknown setting 'layers'"):
        ensure_sft_init(tmp_path / "c", overrides={"layers": 3})
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary dir left behind
    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    enc = tok("the fox is red . summary :", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 4


def test_gpt2_arch_builds() -> None:
    tok = build_tokenizer()
    model = build_tiny_causal_lm(SFTInitConfig(arch="gpt2", hidden_size=16, num_layers=1, num_heads=2), len(tok),
                                 tok.pad_token_id, tok.eos_token_id)
    assert model.config.model_type == "gpt2"
    with pytest.raises(SoupsError, match="unknown arch"):
        build_tiny_causal_lm(SFTInitConfig(arch="rnn"), len(tok), 0, 2)


@pytest.mark.slow
def test_default_sft_init_learns_the_format(tmp_path) -> None:
    """The default init (~2 min on CPU) writes well-formed fact sentences for most eval prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.text.evaluator import generate_responses
    from rl.text.rewards import count_statements
    from rl.text.task import build_task

    path = ensure_sft_init(tmp_path / "sft", show_progress=False)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    samples = build_task({"name": "facts_summary", "n_train": 0, "n_eval": 64}).eval
    texts = generate_responses(model, tok, [s["prompt"] for s in samples], max_new_tokens=32)
    counts = [count_statements(s["facts"], t) for s, t in zip(samples, texts, strict=True)]
    assert sum(c.malformed for c in counts) < 0.1 * sum(c.n_statements for c in counts)
    assert sum(c.supported for c in counts) > 0.4 * sum(c.n_statements for c in counts)
