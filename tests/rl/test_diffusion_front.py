"""The `diffusion` evaluator of `python -m soups.pareto` and its contact sheet.

Fast: common random numbers (the same UNet scored twice gives identical images and scores; another UNet sees the
same latents), the contact sheet's geometry, prompt-file errors, the images generated as the pipeline itself does
from the same latents. Slow: the whole front on two tiny experts (`python -m soups.pareto evaluator=diffusion`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from rl.diffusion.evaluator import (  # noqa: E402
    DiffusionEvaluator,
    build_prompts,
    expert_base,
    reward_specs,
    sampler_settings,
)
from rl.diffusion.rewards import build_reward  # noqa: E402
from rl.diffusion.sheet import contact_sheet, save_contact_sheet  # noqa: E402
from rl.diffusion.task import scene_prompts, vocabulary  # noqa: E402
from soups.utils import SoupsError  # noqa: E402


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rl.diffusion.models import build_tiny_pipeline

    path = tmp_path_factory.mktemp("pipe") / "init"
    build_tiny_pipeline(vocabulary(), seed=0).save_pretrained(path)
    return path


def _evaluator(pipeline_dir: Path, **kwargs) -> tuple[DiffusionEvaluator, torch.nn.Module]:
    from diffusers import UNet2DConditionModel

    from rl.diffusion.evaluator import load_base_pipeline

    pipe = load_base_pipeline(str(pipeline_dir), device=torch.device("cpu"))
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    settings = {"seeds": 2, "steps": 3, "guidance_scale": 3.0, "batch_size": 3, "sheet_columns": 3,
                "height": 16, "width": 16, "latent_shape": (4, 16, 16)}  # fmt: skip
    settings.update(kwargs)
    rewards = {"colourfulness": build_reward("colourfulness", {})}
    return DiffusionEvaluator(pipe, rewards, scene_prompts(2, 7), **settings), unet


def test_common_random_numbers_same_unet_same_images_other_unet_same_noise(pipeline_dir: Path) -> None:
    evaluator, unet = _evaluator(pipeline_dir)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    first = evaluator.evaluate(unet)
    images = evaluator.last_images.copy()
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8  # 2 prompts × 2 seeds
    assert evaluator.evaluate(unet) == first  # bit for bit: the latents are drawn once, DDIM is deterministic
    assert np.array_equal(evaluator.last_images, images)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # weights untouched
    assert first["colourfulness"].n == 4 and first["colourfulness"].stderr > 0
    # another evaluator from the same seed draws the same latents; another seed other ones
    again, _ = _evaluator(pipeline_dir)
    assert torch.equal(again.latents, evaluator.latents)
    assert not torch.equal(_evaluator(pipeline_dir, seed=1)[0].latents, evaluator.latents)
    # a different UNet (a nudged weight) starts from the same noise: images differ, deterministically
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.conv_out.bias.add_(0.5)
    evaluator.evaluate(other)
    assert not np.array_equal(evaluator.last_images, images)


def test_images_are_the_pipelines_own_from_the_same_latents(pipeline_dir: Path) -> None:
    from diffusers import DiffusionPipeline

    evaluator, unet = _evaluator(pipeline_dir)
    stats = evaluator.evaluate(unet)
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=evaluator.image_prompts, latents=evaluator.latents.clone(), num_inference_steps=3,
               guidance_scale=3.0, height=16, width=16, output_type="pt").images  # fmt: skip
    expected = (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(expected.astype(int) - evaluator.last_images.astype(int)).max() <= 1
    reference = build_reward("colourfulness", {})(out, evaluator.image_prompts)
    assert stats["colourfulness"].mean == pytest.approx(float(reference.double().mean()), rel=1e-5)


def test_contact_sheet_geometry_and_cells() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 16, 16, 3), dtype=np.uint8)  # 5 λ rows × 3 (prompt, seed) columns
    sheet = contact_sheet(images, scale=4, pad=2)
    assert sheet.shape == (5 * (64 + 2) + 2, 3 * (64 + 2) + 2, 3)
    # cell (r, c) is image (r, c) upscaled 4× (nearest), framed in white
    r, c = 3, 2
    top, left = 2 + r * 66, 2 + c * 66
    assert np.array_equal(sheet[top : top + 64 : 4, left : left + 64 : 4], images[r, c])
    assert np.array_equal(sheet[top + 3 : top + 64 : 4, left + 1 : left + 64 : 4], images[r, c])
    assert (sheet[:2] == 255).all() and (sheet[top - 2 : top, left : left + 64] == 255).all()
    with pytest.raises(SoupsError, match="uint8"):
        contact_sheet(images.astype(np.float32))


def test_contact_sheet_png(tmp_path: Path) -> None:
    from PIL import Image

    images = np.zeros((4, 2, 16, 16, 3), dtype=np.uint8)
    save_contact_sheet(tmp_path / "grid.png", images, [f"λ={x:.2f}" for x in (0, 0.33, 0.67, 1)], ["p0", "p1"])
    width, height = Image.open(tmp_path / "grid.png").size
    assert height >= 4 * 66 and width >= 2 * 66
    with pytest.raises(SoupsError, match="3 row labels"):
        save_contact_sheet(tmp_path / "bad.png", images, ["a", "b", "c"], ["p0", "p1"])


def test_write_outputs_sheet_rows_per_point_and_paired_scores(pipeline_dir: Path, tmp_path: Path) -> None:
    import json

    from PIL import Image

    evaluator, unet = _evaluator(pipeline_dir)
    rows, outputs = [], []
    for kind, name, lam in [("init", "init", None), ("expert", "a", [1.0, 0.0]), ("soup", "λ=0.50,0.50", [0.5, 0.5]),
                            ("expert", "b", [0.0, 1.0])]:  # fmt: skip
        evaluator.evaluate(unet)
        rows.append({"kind": kind, "name": name, "lambda": lam})
        outputs.append(evaluator.last_outputs())
    rows.append({"kind": "ensemble", "name": "e", "lambda": [0.5, 0.5]})
    outputs.append(None)  # a row not scored by evaluate: left out
    evaluator.write_outputs(tmp_path, rows, outputs)
    assert Image.open(tmp_path / "lambda_grid.png").size[1] >= 4 * 66
    lines = [json.loads(x) for x in (tmp_path / "sample_scores.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["init", "a", "λ=0.50,0.50", "b"]
    assert len(lines[0]["scores"]["colourfulness"]) == 4 and lines[0]["prompts"] == evaluator.image_prompts


def test_prompt_files_missing_or_empty_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SoupsError, match=r"prompt file .*nope.txt does not exist"):
        build_prompts(str(tmp_path / "nope.txt"), 4, 0)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(SoupsError, match=r"prompt file .*empty.txt is empty"):
        build_prompts(str(empty), None, 0)
    two = tmp_path / "two.txt"
    two.write_text("a red circle on a blue background\na grey square on a white background\n")
    assert build_prompts(str(two), None, 0) == two.read_text().splitlines()
    with pytest.raises(SoupsError, match="n_prompts=3 but prompt file"):
        build_prompts(str(two), 3, 0)
    # embedded held-out prompts: a pure function of the seed
    assert build_prompts(None, 5, 2026) == scene_prompts(5, 2026) != scene_prompts(5, 0)


def test_rewards_default_to_the_union_of_the_experts_objectives(tmp_path: Path) -> None:
    for name, objectives in [("a", "[colourfulness]"), ("b", "[fidelity, colourfulness]")]:
        (tmp_path / name / "expert").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text(f"reward:\n  objectives: {objectives}\n")
    experts = [str(tmp_path / "a" / "expert"), str(tmp_path / "b" / "expert")]
    assert reward_specs(None, experts) == [("colourfulness", {}), ("fidelity", {})]
    # the sampler: as given, else the first expert's training sampler, else 20 DDIM steps without guidance
    assert sampler_settings(None, None, experts) == {"steps": 20, "guidance_scale": 1.0}
    (tmp_path / "a" / "config.yaml").write_text("reward:\n  objectives: [colourfulness]\nrwr:\n  inference_steps: 7\n"
                                                "  guidance_scale: 2.5\n")  # fmt: skip
    assert sampler_settings(None, None, experts) == {"steps": 7, "guidance_scale": 2.5}
    assert sampler_settings(3, None, experts) == {"steps": 3, "guidance_scale": 2.5}
    assert reward_specs([{"name": "c", "type": "colourfulness"}], experts) == [("c", {"type": "colourfulness"})]
    with pytest.raises(SoupsError, match="has no training config"):
        reward_specs(None, [str(tmp_path / "nowhere")])
    (tmp_path / "a" / "expert" / "soups_expert.json").write_text('{"kind": "diffusers_lora", "base": "../base"}')
    (tmp_path / "a" / "base").mkdir()
    assert expert_base(experts[0]) == str((tmp_path / "a" / "base").resolve())
    with pytest.raises(SoupsError, match="cannot read the expert's description"):
        expert_base(experts[1])


def test_paired_conflict_hand_worked(tmp_path: Path) -> None:
    import json

    from rl.diffusion.quickstart import paired_conflict

    rows = [
        {"kind": "init", "name": "init", "scores": {"colourfulness": [0, 0, 0], "fidelity": [0, 0, 0]}},
        {"kind": "expert", "name": "colourfulness",
         "scores": {"colourfulness": [3, 5, 4], "fidelity": [0.1, 0.2, 0.3]}},
        {"kind": "expert", "name": "fidelity", "scores": {"colourfulness": [1, 4, 4], "fidelity": [0.5, 0.4, 0.3]}},
    ]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checks = {c["expert"]: c for c in paired_conflict(tmp_path / "s.jsonl", ["colourfulness", "fidelity"])}
    c = checks["colourfulness"]  # differences 2, 1, 0: mean 1, std 1
    assert c["margin"] == pytest.approx(1.0) and c["paired_stderr"] == pytest.approx(1 / 3**0.5)
    assert c["unpaired_stderr"] == pytest.approx((1 / 3 + 3 / 3) ** 0.5) and c["ok_paired"] and c["n"] == 3
    f = checks["fidelity"]  # differences 0.4, 0.2, 0.0: mean 0.2, std 0.2
    assert f["margin"] == pytest.approx(0.2) and f["paired_stderr"] == pytest.approx(0.2 / 3**0.5) and f["ok_paired"]


# ----------------------------------------------------------------------------------------------------------
# The front on two LoRA experts (the diffusers checkpoint kind's resident Soup)
# ----------------------------------------------------------------------------------------------------------

# Two objectives (the second a rescaled first: what matters here is that both score the same images).
REWARDS_NODE = ["colourfulness", {"name": "colour100", "type": "colourfulness", "scale": 100.0}]


@pytest.fixture(scope="module")
def lora_experts(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two rank-2/rank-4 LoRA experts on the tiny pipeline with random (non-zero) B factors."""
    from rl.diffusion.models import add_trainable, load_pipeline, save_expert

    root = tmp_path_factory.mktemp("experts")
    out = []
    for k, rank in enumerate((2, 4)):
        unet = load_pipeline(pipeline_dir).unet
        torch.manual_seed(10 + k)
        add_trainable(unet, "lora", rank=rank, alpha=2.0 * rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.2)
        out.append(str(save_expert(unet, root / f"expert{k}", "lora", base=str(pipeline_dir))))
    return out


def test_soup_at_a_vertex_scores_as_the_expert_loaded_by_diffusers(pipeline_dir: Path, lora_experts: list[str]) -> None:
    from rl.diffusion.models import load_pipeline
    from soups.front import open_soup

    evaluator, _ = _evaluator(pipeline_dir)
    evaluator.rewards = {"colourfulness": build_reward("colourfulness", {})}
    soup = open_soup(lora_experts, base_model=None, device=torch.device("cpu"), dtype=torch.float32)
    soup.set_weights([1.0, 0.0])
    at_vertex = evaluator.evaluate(soup.model)
    soup_images = evaluator.last_images.copy()
    soup.set_weights([0.0, 1.0])
    other = evaluator.evaluate(soup.model)
    assert other != at_vertex  # the experts differ
    pipe = load_pipeline(pipeline_dir)  # expert 1 the diffusers way: its LoRA on the base UNet, unmerged
    pipe.load_lora_weights(lora_experts[0])
    expert = evaluator.evaluate(pipe.unet)
    assert np.abs(evaluator.last_images.astype(int) - soup_images.astype(int)).max() <= 1
    assert expert["colourfulness"].mean == pytest.approx(at_vertex["colourfulness"].mean, rel=1e-4, abs=1e-3)


def test_pareto_front_with_the_diffusion_evaluator_writes_the_contact_sheet(
    pipeline_dir: Path, lora_experts: list[str], tmp_path: Path
) -> None:
    import json

    from PIL import Image

    from soups.pareto import run_front
    from soups.quickstart import compose_entry
    from soups.quickstart_registry import hydra_value

    out = tmp_path / "front"
    cfg = compose_entry("pareto", [f"experts=[{lora_experts[0]},{lora_experts[1]}]", "expert_names=[a,b]",
                                   f"init={pipeline_dir}", "evaluator=diffusion", "evaluator.n_prompts=2",
                                   "evaluator.seeds=2", "evaluator.steps=3", "evaluator.batch_size=4",
                                   f"evaluator.rewards={hydra_value(REWARDS_NODE)}",
                                   "grid.n_points=3", "eum_divisions=2", f"output={out}", "device=cpu"])  # fmt: skip
    run_front(cfg)
    for name in ("front.jsonl", "summary.json", "front.png", "lambda_grid.png", "sample_scores.jsonl"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "front.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["init", "expert", "soup", "expert"]
    assert set(rows[0]["objectives"]) == {"colourfulness", "colour100"} and rows[0]["n"] == 4
    for row in rows:  # one reward is the other / 100: the same images were scored by both
        assert 100 * row["objectives"]["colour100"]["mean"] == pytest.approx(row["objectives"]["colourfulness"]["mean"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expert_kind"] == "diffusers_lora" and len(summary["lmc"]["rows"]) == 1
    # the sheet: 3 λ rows + the init row, 4 (prompt, seed) columns of 16×16 images upscaled 4×
    width, height = Image.open(out / "lambda_grid.png").size
    assert height >= 4 * 66 and width >= 4 * 66
    scores = [json.loads(x) for x in (out / "sample_scores.jsonl").read_text().splitlines()]
    assert [s["name"] for s in scores] == [r["name"] for r in rows]
    mean = np.mean(scores[1]["scores"]["colourfulness"])
    assert mean == pytest.approx(rows[1]["objectives"]["colourfulness"]["mean"])


@pytest.mark.slow
def test_quickstart_diffusion_smoke_writes_the_front_the_contact_sheet_and_a_pipeline_soup(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from diffusers import DiffusionPipeline

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "qs"
    done = subprocess.run([sys.executable, "-m", "soups.quickstart", "task=diffusion", "experiment=smoke",
                           f"output_dir={out}"], cwd=root, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("front.jsonl", "summary.json", "front.png", "lambda_grid.png", "sample_scores.jsonl"):
        assert (out / "front" / name).is_file(), name
    rows = [json.loads(line) for line in (out / "front" / "front.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["init", "morl", "expert", "soup", "expert"]
    assert set(rows[0]["objectives"]) == {"colourfulness", "fidelity"}
    summary = json.loads((out / "front" / "summary.json").read_text())
    assert set(summary["hypervolume"]) == {"rs", "morl"} and summary["lmc"]["rows"]
    conflict = json.loads((out / "diffusion" / "conflict.json").read_text())
    assert {c["expert"] for c in conflict["conflict"]} == {"colourfulness", "fidelity"}
    pipe = DiffusionPipeline.from_pretrained(out / "soup")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert "DiffusionPipeline.from_pretrained" in done.stdout
