"""Image rewards of the diffusion family (rl/diffusion/rewards.py): hand-worked numbers, registry errors, and every
preset's loading code on tiny models saved with save_pretrained and loaded by the code path a Hub id takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl.diffusion import rewards as R
from rl.diffusion.task import generate_scenes
from soups.registry import UnknownNameError
from soups.utils import SoupsError


def _image(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float Tensor[1, 3, H, W] in [0, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0


def _colourfulness_numpy(pixels: np.ndarray) -> float:
    """Independent re-derivation on one uint8 [H, W, 3] image (float64, population std), straight from the paper."""
    rgb = pixels.astype(np.float64).reshape(-1, 3)
    rg = rgb[:, 0] - rgb[:, 1]
    yb = 0.5 * (rgb[:, 0] + rgb[:, 1]) - rgb[:, 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def test_colourfulness_hand_worked():
    grey = np.full((8, 8, 3), 128, np.uint8)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, :4, 0] = 255  # left half red (255, 0, 0): rg = 255, yb = 127.5
    half[:, 4:, 1] = 255  # right half green (0, 255, 0): rg = -255, yb = 127.5
    # grey: rg = yb = 0 everywhere -> 0.
    # red: σ = 0, μ = (255, 127.5) -> 0.3 * sqrt(255² + 127.5²) = 0.3 * 285.0987... = 85.5296...
    # half/half: μ_rg = 0, σ_rg = 255; μ_yb = 127.5, σ_yb = 0 -> 255 + 0.3 * 127.5 = 293.25.
    # (pyimagesearch's |R - G| variant would give 85.53 here: the signed differences of the paper matter.)
    images = torch.cat([_image(grey), _image(red), _image(half)])
    reward = R.build_reward("colourfulness", {})
    got = reward(images, ["p"] * 3)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor([0.0, 85.529_61, 293.25]), atol=1e-3, rtol=0)
    assert R.build_reward("colourfulness", {"scale": 100.0})(images, ["p"] * 3)[2].item() == pytest.approx(2.9325)


def test_colourfulness_matches_numpy_on_scenes():
    scenes = generate_scenes(12, seed=3)
    images = torch.cat([_image(s["image"]) for s in scenes])
    got = R.colourfulness(images)
    want = torch.tensor([_colourfulness_numpy(s["image"]) for s in scenes], dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)
    # dull scenes (grey/white/black/brown only) are less colourful than vivid ones
    dull = {"white", "grey", "black", "brown"}
    by_kind = {True: [], False: []}
    for s, m in zip(scenes, got.tolist(), strict=True):
        by_kind[s["scene"].colour in dull and s["scene"].background in dull].append(m)
    if by_kind[True] and by_kind[False]:
        assert max(by_kind[True]) < max(by_kind[False])


def test_colourfulness_nan_propagates_and_bad_shapes_named():
    images = torch.rand(2, 3, 4, 4)
    images[1, 0, 0, 0] = float("nan")
    out = R.build_reward("colourfulness", {})(images, ["a", "b"])
    assert torch.isfinite(out[0]) and torch.isnan(out[1])  # not filtered: the trainer catches it
    with pytest.raises(SoupsError, match=r"colourfulness.*Tensor\[B, 3, H, W\]"):
        R.build_reward("colourfulness", {})(torch.rand(2, 4, 4), ["a", "b"])
    with pytest.raises(SoupsError, match="2 images but 1 prompts"):
        R.build_reward("colourfulness", {})(torch.rand(2, 3, 4, 4), ["a"])


def test_unknown_reward_and_option_list_valid_ones():
    with pytest.raises(UnknownNameError, match="valid names: .*colourfulness"):
        R.build_reward("sharpness", {})
    with pytest.raises(SoupsError, match=r"unknown option\(s\) \['gamma'\]; valid: scale, device"):
        R.build_reward("colourfulness", {"gamma": 2})


def test_reward_set_scores_images_and_scalarises():
    images = torch.rand(4, 3, 8, 8)
    rs = R.build_reward_set({"objectives": ["colourfulness", {"name": "c2", "type": "colourfulness", "scale": 2.0}],
                             "optimize": "morl", "weights": [0.5, 0.5]})
    raw = rs(images, ["p"] * 4)
    assert raw.shape == (4, 2)
    torch.testing.assert_close(raw[:, 1], raw[:, 0] / 2)
    torch.testing.assert_close(rs.scalar(raw), 0.75 * raw[:, 0])
    with pytest.raises(SoupsError, match="only used with reward.optimize=morl"):
        R.build_reward_set({"objectives": ["colourfulness"], "optimize": "colourfulness", "weights": [1.0]})


# ----------------------------------------------------------------------------------------------------------
# Model rewards: fidelity (tiny CLIP trained on the scenes) and the Hub presets on tiny models
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fidelity_dir(tmp_path_factory):
    """The smoke fidelity CLIP (a few seconds), built once for the module through ensure_fidelity_model."""
    return R.ensure_fidelity_model(tmp_path_factory.mktemp("fid") / "fidelity", seed=0, smoke=True,
                                   show_progress=False)  # fmt: skip


def _scenes_tensor(scenes) -> torch.Tensor:
    return torch.cat([_image(s["image"]) for s in scenes])


def test_fidelity_model_saved_like_a_hub_clip(fidelity_dir):
    import json

    from transformers import AutoModel, AutoProcessor, CLIPModel

    from rl.diffusion.models import tiny_tokenizer
    from rl.diffusion.task import vocabulary

    info = json.loads((fidelity_dir / R.FIDELITY_INFO).read_text())
    assert info["eval_top1_retrieval"] > 0.6 > 0.1 > info["eval_top1_retrieval_at_init"]
    assert info["eval_top1_retrieval_colours"] >= info["eval_top1_retrieval"]
    assert (fidelity_dir / "model.safetensors").is_file() and (fidelity_dir / "processor_config.json").is_file()
    model, processor = AutoModel.from_pretrained(fidelity_dir), AutoProcessor.from_pretrained(fidelity_dir)
    assert isinstance(model, CLIPModel)
    prompts = ["a grey square on a white background", "a red circle on a blue background"]
    want = tiny_tokenizer(vocabulary())(prompts, padding=True, truncation=True)["input_ids"]
    assert processor(text=prompts, padding=True, truncation=True)["input_ids"] == want  # the tiny tokenizer
    # reused when the settings match; refused, naming both, when they do not
    assert R.ensure_fidelity_model(fidelity_dir, seed=0, smoke=True) == fidelity_dir
    with pytest.raises(SoupsError, match="was built with settings"):
        R.ensure_fidelity_model(fidelity_dir, seed=0, smoke=True, overrides={"steps": 3})
    with pytest.raises(SoupsError, match="unknown setting 'step'; valid: seed"):
        R.ensure_fidelity_model(fidelity_dir, smoke=True, overrides={"step": 3})


def test_fidelity_is_pickscore_of_the_tiny_clip(fidelity_dir):
    """The score is exp(logit_scale)·cos, i.e. the diagonal of CLIPModel's own logits_per_image."""
    from transformers import CLIPModel, CLIPProcessor

    scenes = generate_scenes(6, seed=11)
    images, prompts = _scenes_tensor(scenes), [s["prompt"] for s in scenes]
    got = R.build_reward("fidelity", {"dir": str(fidelity_dir), "smoke": True, "batch_size": 4})(images, prompts)
    model, processor = CLIPModel.from_pretrained(fidelity_dir), CLIPProcessor.from_pretrained(fidelity_dir)
    pixels = [torch.from_numpy(s["image"]).permute(2, 0, 1) for s in scenes]
    inputs = processor(text=prompts, images=pixels, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**inputs).logits_per_image.diagonal()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_fidelity_and_colourfulness_conflict_on_scenes(fidelity_dir):
    """On dull prompts, fidelity prefers the right dull scene and colourfulness the same scene recoloured vividly."""
    fidelity = R.build_reward("fidelity", {"dir": str(fidelity_dir), "smoke": True})
    got = R.conflict_on_scenes(fidelity, R.build_reward("colourfulness", {}), n_scenes=600, seed=5)
    assert got["pairs"] >= 20
    assert got["colourfulness_prefers_recoloured"] == 1.0
    assert got["colourfulness_recoloured"] > got["colourfulness_right"]
    assert got["fidelity_prefers_right"] >= 0.95, got
    assert got["fidelity_right"] - got["fidelity_recoloured"] > 3 * got["fidelity_gap_stderr"]


def test_model_rewards_give_nan_for_non_finite_images(fidelity_dir):
    images = torch.rand(3, 3, 16, 16)
    images[1, 2, 3, 4] = float("inf")
    out = R.build_reward("fidelity", {"dir": str(fidelity_dir), "smoke": True})(images, ["a red circle"] * 3)
    assert torch.isfinite(out[[0, 2]]).all() and torch.isnan(out[1])


def test_clipscore_matches_torchmetrics(fidelity_dir):
    """CLIPScore = 2.5·max(cos, 0); torchmetrics' clip_score is 100·max(cos, 0) of the same CLIP (per image)."""
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    class _Tensors(torch.nn.Module):  # transformers 5 returns a ModelOutput from get_*_features; torchmetrics 1.9
        def __init__(self, model):  # divides it as a tensor: hand it the projected pooler output, nothing else
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    scenes = generate_scenes(8, seed=21)
    images = _scenes_tensor(scenes)
    prompts = [s["prompt"] for s in scenes[:4]] + [s["prompt"] for s in scenes[4:][::-1]]  # 4 right, 4 mismatched
    reward = R.build_reward("clipscore", {"name_or_path": str(fidelity_dir), "device": "cpu"})
    got = reward(images, prompts)

    def loader():
        return _Tensors(CLIPModel.from_pretrained(fidelity_dir)), CLIPProcessor.from_pretrained(fidelity_dir)

    pixels = (images * 255).round().to(torch.uint8)
    want = torch.stack([clip_score(pixels[i], prompts[i], model_name_or_path=loader).detach() for i in range(8)])
    torch.testing.assert_close(got, 2.5 * want / 100, atol=1e-4, rtol=1e-5)
    assert (got > 0).any()


def test_pickscore_loads_model_and_processor_from_separate_places(fidelity_dir, tmp_path):
    from transformers import AutoModel, AutoProcessor

    AutoModel.from_pretrained(fidelity_dir).save_pretrained(tmp_path / "model")
    AutoProcessor.from_pretrained(fidelity_dir).save_pretrained(tmp_path / "processor")
    assert not (tmp_path / "model" / "preprocessor_config.json").exists()
    scenes = generate_scenes(5, seed=2)
    images, prompts = _scenes_tensor(scenes), [s["prompt"] for s in scenes]
    pick = R.build_reward("pickscore", {"name_or_path": str(tmp_path / "model"),
                                        "processor": str(tmp_path / "processor"), "device": "cpu"})  # fmt: skip
    fid = R.build_reward("fidelity", {"dir": str(fidelity_dir), "smoke": True})
    assert pick.name == "pickscore"
    torch.testing.assert_close(pick(images, prompts), fid(images, prompts))
    with pytest.raises(SoupsError, match="cannot load the CLIP reward model .*nowhere"):
        R.build_reward("pickscore", {"name_or_path": str(tmp_path / "nowhere"), "device": "cpu"})


def test_ava_head_on_a_tiny_clip(fidelity_dir, tmp_path):
    """ava = MLP(CLIP image embedding / ‖·‖) with the LAION head layout, read from .pth (weights_only) or
    .safetensors; checked against the embedding of CLIPVisionModelWithProjection and a hand-written MLP."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    head = R.AestheticMLP(32)
    (tmp_path / "repo").mkdir()
    torch.save(head.state_dict(), tmp_path / "repo" / "aesthetic-model.pth")
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    assert sorted(head.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    scenes = generate_scenes(5, seed=4)
    images = _scenes_tensor(scenes)
    got = R.build_reward("ava", {"clip": str(fidelity_dir), "head": str(tmp_path / "repo"), "device": "cpu"})(
        images, [""] * 5)
    again = R.build_reward("ava", {"clip": str(fidelity_dir), "head": str(tmp_path / "head.safetensors"),
                                   "device": "cpu"})(images, [""] * 5)  # fmt: skip
    vision = CLIPVisionModelWithProjection.from_pretrained(fidelity_dir)
    pixels = [torch.from_numpy(s["image"]).permute(2, 0, 1) for s in scenes]
    with torch.no_grad():
        embed = vision(pixel_values=CLIPImageProcessor.from_pretrained(fidelity_dir)(
            images=pixels, return_tensors="pt")["pixel_values"]).image_embeds
        x = embed / embed.norm(dim=-1, keepdim=True)
        sd = head.state_dict()
        for i in (0, 2, 4, 6, 7):  # no activations between the linear layers (dropout is off in eval)
            x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(got, x[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, got)
    torch.save({"layers.0.weight": torch.zeros(1024, 32)}, tmp_path / "bad.pth")
    with pytest.raises(SoupsError, match="does not match the aesthetic MLP layout"):
        R.build_reward("ava", {"clip": str(fidelity_dir), "head": str(tmp_path / "bad.pth"), "device": "cpu"})
    torch.save(R.AestheticMLP(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(SoupsError, match="reads 768-d embeddings but .* 32 dimensions"):
        R.build_reward("ava", {"clip": str(fidelity_dir), "head": str(tmp_path / "l14.pth"), "device": "cpu"})
    with pytest.raises(SoupsError, match="has no aesthetic-model.pth"):
        R.build_reward("ava", {"clip": str(fidelity_dir), "head": str(tmp_path), "device": "cpu"})


def test_cafe_on_a_tiny_beit_matches_the_pipeline(tmp_path):
    """cafe = softmax probability (or logit) of the "aesthetic" label, as the image-classification pipeline gives."""
    from PIL import Image
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor, pipeline

    torch.manual_seed(0)
    config = BeitConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, id2label={0: "aesthetic", 1: "not_aesthetic"},
                        label2id={"aesthetic": 0, "not_aesthetic": 1})  # fmt: skip
    BeitForImageClassification(config).save_pretrained(tmp_path / "cafe")
    BeitImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16},
                       do_center_crop=False).save_pretrained(tmp_path / "cafe")  # fmt: skip
    scenes = generate_scenes(4, seed=8)
    images = _scenes_tensor(scenes)
    prob = R.build_reward("cafe", {"name_or_path": str(tmp_path / "cafe"), "device": "cpu"})(images, [""] * 4)
    logit = R.build_reward("cafe", {"name_or_path": str(tmp_path / "cafe"), "output": "logit", "device": "cpu"})(
        images, [""] * 4)
    classify = pipeline("image-classification", model=str(tmp_path / "cafe"), device="cpu")
    want = [{d["label"]: d["score"] for d in classify(Image.fromarray(s["image"]), top_k=2)}["aesthetic"]
            for s in scenes]  # fmt: skip
    torch.testing.assert_close(prob, torch.tensor(want), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(prob, logit)
    with pytest.raises(SoupsError, match="has no label 'pretty'; its labels: aesthetic, not_aesthetic"):
        R.build_reward("cafe", {"name_or_path": str(tmp_path / "cafe"), "label": "pretty", "device": "cpu"})
    with pytest.raises(SoupsError, match="output='rank'; valid: prob, logit"):
        R.build_reward("cafe", {"name_or_path": str(tmp_path / "cafe"), "output": "rank", "device": "cpu"})


def test_registry_lists_every_reward():
    assert R.REWARDS.names() == ["ava", "cafe", "clipscore", "colourfulness", "fidelity", "pickscore"]
    with pytest.raises(UnknownNameError, match="ava, cafe, clipscore, colourfulness, fidelity, pickscore"):
        R.build_reward("imagereward", {})
