"""λ-batched front evaluation (`grid.batch_lambdas`): the text evaluator's K λ per pass equal K sequential passes.

A tiny random LLaMA of the embedded text task (built from config, nothing downloaded) and three random LoRA
experts with different ranks and alphas; greedy decoding, so responses and scores must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rl.text.evaluator import DecodeSettings, TextEvaluator, model_member
from soups.pareto import run_front
from soups.soup import Soup
from soups.utils import SoupsError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "pareto"
K8 = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.0, 0.25, 0.75),
      (1 / 3, 1 / 3, 1 / 3), (0.2, 0.3, 0.5), (0.6, 0.1, 0.3)]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(tokenizer, base dir, three adapter dirs, eval samples, reward set, three adapters of one shape)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rl.text.models import build_tiny_causal_lm, build_tokenizer
    from rl.text.rewards import build_reward_set
    from rl.text.sft import SFTInitConfig
    from rl.text.task import build_task

    tmp = tmp_path_factory.mktemp("batched")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_causal_lm(SFTInitConfig(hidden_size=32, num_layers=1, num_heads=2), len(tokenizer),
                                 tokenizer.pad_token_id, tokenizer.eos_token_id).eval()  # fmt: skip
    with torch.no_grad():  # HF's init (std 0.02) decodes one token forever; larger weights vary the text
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    def save(name: str, specs: list[tuple[int, int, list[str]]]) -> list[str]:
        paths = []
        for seed, (r, alpha, targets) in enumerate(specs):
            torch.manual_seed(seed)
            lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
            peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp / "base"), lora)
            with torch.no_grad():  # visible deltas, so the 8 mixes decode differently
                for key, param in peft_model.named_parameters():
                    if "lora_" in key:
                        param.normal_(0.0, 0.6)
            peft_model.save_pretrained(tmp / f"{name}{seed}")
            paths.append(str(tmp / f"{name}{seed}"))
        return paths

    # ranks, alphas and target modules differ (the Soup's concatenated adapter); soups.pareto wants one shape
    adapters = save("a", [(4, 8, ["q_proj", "v_proj"]), (2, 8, ["q_proj"]), (3, 3, ["v_proj", "o_proj"])])
    same_shape = save("s", [(2, 8, ["q_proj", "v_proj"]), (2, 2, ["q_proj", "v_proj"]), (2, 5, ["q_proj", "v_proj"])])
    samples = build_task({"name": "facts_summary", "seed": 3, "n_train": 0, "n_eval": 6}).eval
    reward_set = build_reward_set({"objectives": ["complete", "faithful"], "optimize": "complete"})
    return tokenizer, tmp / "base", adapters, samples, reward_set, same_shape


def _soup(base: Path, adapters: list[str]) -> Soup:
    from transformers import AutoModelForCausalLM

    return Soup.from_lora(adapters, AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval())


def test_batched_evaluator_equals_sequential(setup: tuple) -> None:
    tokenizer, base, adapters, samples, reward_set, _ = setup
    soup = _soup(base, adapters)
    evaluator = TextEvaluator(samples, reward_set, tokenizer, DecodeSettings(max_new_tokens=10), batch_size=4)
    device = torch.device("cpu")
    seq_texts, seq_stats = [], []
    for lam in K8:
        model = soup.set_weights(lam)
        seq_texts.append(evaluator.responses([model_member(model)], [1.0], device))
        seq_stats.append(evaluator.evaluate(model))
    assert len({tuple(t) for t in seq_texts}) >= 4  # the mixes decode differently: rows cannot be confused unseen
    with soup.batched(K8) as batch:
        texts = evaluator.responses([model_member(batch.model)], [1.0], device, copies=len(K8))
        stats = evaluator.evaluate_batched(batch)
    n = len(samples)
    for k, lam in enumerate(K8):  # 6 prompts in batches of 4 and 2: K·4 and K·2 rows per pass
        assert texts[k * n : (k + 1) * n] == seq_texts[k], f"responses differ at λ={lam}"
        assert stats[k] == seq_stats[k], f"scores differ at λ={lam}"

    sampling = TextEvaluator(samples, reward_set, tokenizer, DecodeSettings(max_new_tokens=4, do_sample=True),
                             batch_size=4)  # fmt: skip
    with soup.batched(K8[:2]) as batch, pytest.raises(SoupsError, match="greedy decoding"):
        sampling.evaluate_batched(batch)


def _front(setup: tuple, out: Path, *overrides: str) -> list[dict]:
    _, base, _, _, _, adapters = setup
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"experts=[{','.join(adapters)}]", f"base_model={base}", "grid.step=0.25", "device=cpu",
            "evaluator.task={name:facts_summary,seed:3,n_train:0,n_eval:6}", f"evaluator.tokenizer={base}",
            "evaluator.reward={objectives:[complete,faithful],optimize:complete}", "evaluator.n_prompts=6",
            "evaluator.max_new_tokens=8", "evaluator.batch_size=4", f"output={out}", *overrides,
        ])  # fmt: skip
    run_front(cfg)
    return [json.loads(line) for line in (out / "front.jsonl").read_text().splitlines()]


def test_front_with_batch_lambdas_equals_one_lambda_at_a_time(setup: tuple, tmp_path: Path) -> None:
    one = _front(setup, tmp_path / "one", "grid.batch_lambdas=1")
    eight = _front(setup, tmp_path / "eight", "grid.batch_lambdas=8")  # 15 points: chunks of 8 and 7
    assert len(one) == 15 and one == eight
    assert json.loads((tmp_path / "eight" / "summary.json").read_text())["batch_lambdas"] == 8
    with pytest.raises(SoupsError, match="grid.batch_lambdas=0 must be ≥ 1"):
        _front(setup, tmp_path / "zero", "grid.batch_lambdas=0")
