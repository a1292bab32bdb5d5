"""`python -m soups.quickstart` and the README's "loading interpolated HF checkpoints" section.

Fast tests: the stage commands, the expert check and the report on a hand-made front; the README's
`python -m soups.mix` on two LoRA experts, loaded back with `AutoModelForCausalLM` and `PeftModel` and generating
text; and the whole smoke quickstart (SFT -> 2 experts -> MORL -> front -> soup, ≈ 15 s) and its resume.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from soups.quickstart import (
    REPO,
    _in_process,
    command,
    compose_entry,
    entry_point,
    expert_checks,
    mix_overrides,
    mu_name,
    pareto_overrides,
    report,
    run_quickstart,
    train_overrides,
)
from soups.quickstart_registry import get_recipe
from soups.utils import SoupsError


def _cfg(tmp_path: Path, *overrides: str):
    return compose_entry("quickstart", [f"output_dir={tmp_path / 'qs'}", *overrides])


def test_mu_name() -> None:
    assert mu_name([0.5, 0.5]) == "mu0.50"
    assert mu_name([0.3, 0.7]) == "mu0.30"  # two objectives: named by μ_1
    assert mu_name([0.2, 0.3, 0.5]) == "mu0.20-0.30-0.50"


def test_stage_overrides_compose_in_their_entry_points(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    out = tmp_path / "qs"
    experts = [out / "experts" / "complete", out / "experts" / "faithful"]
    morl = [(out / "morl" / "mu0.50", [0.5, 0.5])]
    train = compose_entry("train_ppo", train_overrides(cfg, "morl", morl[0][0], [0.5, 0.5]))
    assert train.reward.optimize == "morl" and list(train.reward.weights) == [0.5, 0.5]
    assert train.model.name_or_path == str(out / "sft") and train.output_dir == str(morl[0][0])
    expert = compose_entry("train_ppo", train_overrides(cfg, "faithful", experts[1]))
    assert expert.reward.optimize == "faithful"
    front = compose_entry("pareto", pareto_overrides(cfg, experts, morl))
    assert list(front.experts) == [str(p / "adapter") for p in experts]
    assert OmegaConf.to_container(front.morl) == [
        {"path": str(morl[0][0] / "adapter"), "name": "MORL μ=0.50", "mu": [0.5, 0.5]}
    ]
    assert front.init == str(out / "sft") and front.evaluator.n_prompts == 128
    mix = compose_entry("mix", mix_overrides(cfg, experts))
    assert list(mix.weights) == [0.5, 0.5] and mix.output == str(out / "soup")


def test_experts_train_on_responses_as_long_as_the_front_evaluates(tmp_path: Path) -> None:
    # Trained on shorter responses than the front is scored on, the completeness expert saw summaries cut
    # mid-sentence (its reward capped, and jumping with the length drawn per batch) and ended below its init.
    cfg = _cfg(tmp_path)
    out = tmp_path / "qs"
    expert = compose_entry("train_ppo", train_overrides(cfg, "complete", out / "experts" / "complete"))
    front = compose_entry("pareto", pareto_overrides(cfg, [out / "experts" / "complete"], []))
    assert min(expert.generation.response_length) >= front.evaluator.max_new_tokens


def test_task_recipes_by_name_and_unknown_ones_listed(tmp_path: Path) -> None:
    recipe = get_recipe("summarisation")
    assert (recipe.trainer.config, recipe.trainer.module, recipe.init_dir) == ("train_ppo", "rl.train_ppo", "sft")
    valid = "valid tasks: captioning, diffusion, locomotion, summarisation"
    with pytest.raises(SoupsError, match=f"unknown quickstart task 'nope'; {valid}"):
        get_recipe("nope")
    cfg = _cfg(tmp_path)
    assert cfg.task == "summarisation"  # the default task
    cfg.task = "nope"
    with pytest.raises(SoupsError, match="valid tasks: captioning, diffusion, locomotion, summarisation"):
        run_quickstart(cfg)
    assert not (tmp_path / "qs").exists()  # refused before anything is written


def test_brax_soup_stage_is_done_by_what_soups_mix_writes(tmp_path: Path) -> None:
    """A Brax soup directory holds brax_policy.json, no config.json: the recipe must mark its soup stage done by the
    file soups.mix copies (else every rerun re-mixes it), and name the loader that reads it."""
    from rl.locomotion.models import META_FILE

    recipe = get_recipe("locomotion")
    assert recipe.soup_done_file == META_FILE == recipe.done_file
    assert recipe.soup_loader.format(path="/s") == "rl.locomotion.models.load_policy('/s')"
    assert get_recipe("summarisation").soup_loader == ""  # the default: <soup_class>.from_pretrained


def test_subprocess_commands_of_the_stages() -> None:
    trainer = entry_point("train_ppo", get_recipe("summarisation"))
    cmd = command(trainer, ["reward=faithful"], "accelerate")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[-2:] == [str(REPO / "rl" / "train_ppo.py"), "reward=faithful"]
    assert command(trainer, ["reward=faithful"], "python")[1:] == [str(REPO / "rl" / "train_ppo.py"), "reward=faithful"]
    # the front and the soup are never launched through accelerate
    assert command(entry_point("mix"), ["progress=false"], "accelerate")[1:] == ["-m", "soups.mix", "progress=false"]
    with pytest.raises(SoupsError, match="no entry point 'train_ppo'"):
        entry_point("train_ppo")  # the trainer is the recipe's: without one it is unknown


def _front_row(kind: str, name: str, complete: tuple[float, float], faithful: tuple[float, float]) -> dict:
    return {"kind": kind, "name": name, "lambda": None, "n": 100, "seed": 0, "path": None,
            "objectives": {"complete": {"mean": complete[0], "stderr": complete[1], "n": 100},
                           "faithful": {"mean": faithful[0], "stderr": faithful[1], "n": 100}}}  # fmt: skip


def test_expert_checks_use_combined_stderr() -> None:
    rows = [_front_row("expert", "complete", (0.80, 0.03), (-0.20, 0.05)),
            _front_row("expert", "faithful", (0.70, 0.04), (0.10, 0.05))]  # fmt: skip
    checks = {c["expert"]: c for c in expert_checks(rows, ["complete", "faithful"], ["complete", "faithful"])}
    # complete: margin 0.80 − 0.70 = 0.10 > sqrt(0.03² + 0.04²) = 0.05 -> ok
    assert checks["complete"]["margin"] == pytest.approx(0.10)
    assert checks["complete"]["stderr"] == pytest.approx(0.05)
    assert checks["complete"]["ok"] is True
    # faithful: margin 0.10 − (−0.20) = 0.30 > sqrt(0.05² + 0.05²) ≈ 0.0707 -> ok
    assert checks["faithful"]["margin"] == pytest.approx(0.30) and checks["faithful"]["ok"] is True
    rows[1]["objectives"]["complete"]["mean"] = 0.78  # margin 0.02 < 0.05: not met
    checks = {c["expert"]: c for c in expert_checks(rows, ["complete", "faithful"], ["complete", "faithful"])}
    assert checks["complete"]["ok"] is False


def test_report_reads_the_front(tmp_path: Path) -> None:
    rows = [_front_row("init", "sft", (0.5, 0.01), (-0.1, 0.01)),
            _front_row("expert", "complete", (0.80, 0.03), (-0.20, 0.05)),
            _front_row("expert", "faithful", (0.70, 0.04), (0.10, 0.05))]  # fmt: skip
    (tmp_path / "front.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"objectives": ["complete", "faithful"], "normalisation": {"mode": "minmax"},
               "reference_point": [0.0, 0.0], "hypervolume": {"rs": 0.4321, "morl": 0.1234},
               "lmc": {"rows": [{}], "min_gap": {"complete": 0.01, "faithful": -0.02},
                       "mean_gap": {"complete": 0.03, "faithful": 0.04}, "fraction_nonnegative": 0.75}}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = report(tmp_path, ["complete", "faithful"], 90.0)
    assert "rewarded soups 0.4321  vs  MORL 0.1234" in text
    assert "0.800 ± 0.030" in text and "75% ≥ 0" in text
    assert "expert complete beats faithful on complete by +0.100 (stderr 0.050): ok" in text
    assert str(tmp_path / "front.png") in text and "total 1.5 min" in text


# ---------------------------------------------------------------------------------------------------------------
# README: loading interpolated HF checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_readme_mix_then_from_pretrained_and_peft(tmp_path: Path) -> None:
    """The README section, command for command: mix two LoRA experts, load the soup with transformers / peft."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.text.models import build_tiny_causal_lm, build_tokenizer
    from rl.text.sft import SFTInitConfig

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    base = build_tiny_causal_lm(SFTInitConfig(hidden_size=32, num_layers=1, num_heads=2), len(tokenizer),
                                tokenizer.pad_token_id, tokenizer.eos_token_id)  # fmt: skip
    base.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    experts = []
    for seed, name in ((1, "complete"), (2, "faithful")):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "sft"), lora)
        model.save_pretrained(tmp_path / name / "adapter")
        tokenizer.save_pretrained(tmp_path / name / "adapter")
        experts.append(str(tmp_path / name / "adapter"))

    merged, adapter = tmp_path / "soup", tmp_path / "soup_adapter"
    # README: python -m soups.mix experts=[...] weights=[0.5,0.5] output=... (merged), then lora_output=adapter
    proc = subprocess.run(
        [sys.executable, "-m", "soups.mix", f"experts=[{experts[0]},{experts[1]}]", "weights=[0.5,0.5]",
         f"output={merged}", "progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the same Hydra main in this process (saves a second interpreter start)
    _in_process("mix")(compose_entry("mix", [f"experts=[{experts[0]},{experts[1]}]", "weights=[0.5,0.5]",
                                             f"output={adapter}", "lora_output=adapter", "progress=false"]))

    # README: from_pretrained on the merged soup, generate text
    soup = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    enc = tok(["the fox is red . the fox eats fish . summary :"], return_tensors="pt", add_special_tokens=False)
    out = soup.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert isinstance(text, str) and out.shape[1] > enc["input_ids"].shape[1]
    # README: PeftModel on the rank-Σr adapter gives the same logits as the merged soup
    peft_soup = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "sft"), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_soup(**enc).logits, soup(**enc).logits, rtol=1e-4, atol=1e-5)
        # and it is the mix, not an expert: ½ (B_1 A_1 + B_2 A_2) differs from each expert's delta
        first = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "sft"), experts[0]).eval()
        assert not torch.allclose(first(**enc).logits, soup(**enc).logits, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The whole smoke quickstart
# ---------------------------------------------------------------------------------------------------------------


def test_smoke_quickstart_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path, "experiment=smoke", f"output_dir={tmp_path / 'qs'}")
    front = run_quickstart(cfg)
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (front / "front.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"init", "morl", "expert", "soup"}
    summary = json.loads((front / "summary.json").read_text())
    assert set(summary["hypervolume"]) == {"rs", "morl"} and summary["lmc"]["rows"]
    assert (front / "front.png").stat().st_size > 10_000
    assert (tmp_path / "qs" / "soup" / "config.json").is_file()
    assert "hypervolume" in printed and str(front / "front.png") in printed
    # resume: every stage is found done and skipped; the front is not re-evaluated
    mtime = (front / "summary.json").stat().st_mtime
    run_quickstart(cfg)
    printed = capsys.readouterr().out
    assert printed.count("done, reusing") == 5 and (front / "summary.json").stat().st_mtime == mtime
