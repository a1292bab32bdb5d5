"""The `text` evaluator (rl/text/evaluator.py): logit mixing, the decoding loop, and scoring against the task's
own `evaluate_policy`, on a tiny random LLaMA of the embedded task (built from config, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rl.text.evaluator import (
    DecodeSettings,
    TextEvaluator,
    ensemble_generate,
    load_ensemble,
    mix_logits,
    model_member,
    positions_from_mask,
)
from soups.utils import SoupsError


def test_mix_logits_hand_worked() -> None:
    z1 = torch.tensor([[1.0, 2.0, 3.0]])
    z2 = torch.tensor([[3.0, 0.0, -1.0]])
    # 0.25 · [1, 2, 3] + 0.75 · [3, 0, −1] = [0.25 + 2.25, 0.5 + 0, 0.75 − 0.75] = [2.5, 0.5, 0]
    torch.testing.assert_close(mix_logits([z1, z2], [0.25, 0.75]), torch.tensor([[2.5, 0.5, 0.0]]))
    with pytest.raises(SoupsError, match="2 members but 3 weights"):
        mix_logits([z1, z2], [0.2, 0.3, 0.5])
    with pytest.raises(SoupsError, match=r"member 1 gives logits of shape \[1, 2\]"):
        mix_logits([z1, z2[:, :2]], [0.5, 0.5])


def test_positions_from_left_padded_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    # row 0: cumsum − 1 = [−1, −1, 0, 1] -> clamp -> [0, 0, 0, 1]; row 1: [0, 1, 2, 3]
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


@pytest.fixture(scope="module")
def tiny() -> tuple:
    from rl.text.models import build_tiny_causal_lm, build_tokenizer
    from rl.text.sft import SFTInitConfig
    from rl.text.task import build_task

    tokenizer = build_tokenizer()
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = SFTInitConfig(hidden_size=32, num_layers=1, num_heads=2)
        model = build_tiny_causal_lm(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).eval()
        with torch.no_grad():  # HF's init (std 0.02) decodes one token forever; larger weights vary the text
            for param in model.parameters():
                param.normal_(0.0, 0.5)
        models.append(model)
    samples = build_task({"name": "facts_summary", "seed": 3, "n_train": 0, "n_eval": 6}).eval
    return tokenizer, models, samples


def _generate(model, tokenizer, prompts: list[str], n: int) -> torch.Tensor:  # noqa: ANN001
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, temperature=None, top_k=None, top_p=None)
    return out[:, enc["input_ids"].shape[1] :]


def _decode(members, lambdas, tokenizer, prompts: list[str], n: int) -> torch.Tensor:  # noqa: ANN001
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return ensemble_generate(members, lambdas, enc["input_ids"], enc["attention_mask"], DecodeSettings(n),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def test_one_member_greedy_equals_generate(tiny: tuple) -> None:
    tokenizer, (m0, m1), samples = tiny
    prompts = [s["prompt"] for s in samples]  # different lengths: left padding is exercised
    assert len({len(p.split()) for p in prompts}) > 1
    for model in (m0, m1):
        expected = _generate(model, tokenizer, prompts, 12)
        assert torch.equal(_decode([model_member(model)], [1.0], tokenizer, prompts, 12), expected)


def test_ensemble_vertices_and_identical_members(tiny: tuple) -> None:
    tokenizer, (m0, m1), samples = tiny
    prompts = [s["prompt"] for s in samples]
    members = [model_member(m0), model_member(m1)]
    out0, out1 = _generate(m0, tokenizer, prompts, 10), _generate(m1, tokenizer, prompts, 10)
    assert not torch.equal(out0, out1)  # two different models
    assert len(out0.unique()) > 3  # varied text, not one token repeated
    assert torch.equal(_decode(members, [1.0, 0.0], tokenizer, prompts, 10), out0)  # λ = e_1: model 0 alone
    assert torch.equal(_decode(members, [0.0, 1.0], tokenizer, prompts, 10), out1)
    # ½ z + ½ z = z: an ensemble of a model with itself decodes like the model
    same = [model_member(m0), model_member(m0)]
    assert torch.equal(_decode(same, [0.5, 0.5], tokenizer, prompts, 10), out0)


def test_text_evaluator_matches_evaluate_policy(tiny: tuple) -> None:
    from rl.text.evaluator import evaluate_policy
    from rl.text.rewards import build_reward_set

    tokenizer, (m0, _), samples = tiny
    reward_set = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "complete"})
    evaluator = TextEvaluator(samples, reward_set, tokenizer, DecodeSettings(max_new_tokens=12), batch_size=4)
    stats = evaluator.evaluate(m0)
    reference = evaluate_policy(m0, tokenizer, samples, reward_set, max_new_tokens=12, batch_size=4)
    assert list(stats) == ["complete", "faithful"]
    for name, stat in stats.items():
        assert stat.n == len(samples) == reference["objectives"][name]["n"]
        assert stat.mean == pytest.approx(reference["objectives"][name]["mean"], abs=1e-6)
        assert stat.stderr == pytest.approx(reference["objectives"][name]["stderr"], abs=1e-6)


def _two_random_adapters(base_model, tmp_path: Path) -> list[str]:
    """Save `base_model` to tmp_path/base and two random (non-zero) LoRA adapters on it; returns their paths."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_model.save_pretrained(tmp_path / "base")
    adapters = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora)
        peft_model.save_pretrained(tmp_path / f"a{seed}")
        adapters.append(str(tmp_path / f"a{seed}"))
    return adapters


def test_peft_ensemble_members_are_the_adapters(tiny: tuple, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer, (m0, _), samples = tiny
    adapters = _two_random_adapters(m0, tmp_path)
    _, members = load_ensemble(adapters, str(tmp_path / "base"), torch.device("cpu"))
    prompts = [s["prompt"] for s in samples]
    outputs = []
    for i, adapter in enumerate(adapters):
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter).eval()
        outputs.append(_generate(alone, tokenizer, prompts, 8))
        assert torch.equal(_decode(members, [1.0 - i, float(i)], tokenizer, prompts, 8), outputs[-1])
    assert not torch.equal(outputs[0], outputs[1])  # the adapters really differ


def test_two_processes_give_the_single_process_front(tiny: tuple, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m soups.pareto`: λ points split over 2 CPU processes (gloo), gathered on rank 0,
    give exactly the rows of a single-process run."""
    import json
    import os
    import subprocess
    import sys

    tokenizer, (m0, _), _ = tiny
    tokenizer.save_pretrained(tmp_path / "base")
    experts = _two_random_adapters(m0, tmp_path)
    args = [f"experts=[{experts[0]},{experts[1]}]", f"init={tmp_path / 'base'}", "grid.n_points=5",
            "evaluator.task={name:facts_summary,seed:3,n_train:0,n_eval:6}",
            "evaluator.reward={objectives:[complete,faithful],optimize:complete}", "evaluator.n_prompts=6",
            "evaluator.max_new_tokens=8", f"evaluator.tokenizer={tmp_path / 'base'}"]  # fmt: skip
    fronts = {}
    for name, launcher in (("one", [sys.executable, "-m", "soups.pareto"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29561", "-m", "soups.pareto"])):  # fmt: skip
        proc = subprocess.run([*launcher, *args, f"output={tmp_path / name}"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        fronts[name] = [json.loads(line) for line in (tmp_path / name / "front.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert len(fronts["one"]) == 6 and fronts["one"] == fronts["two"]
