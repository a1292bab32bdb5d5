"""The diffusion family's models: the tiny pipeline (tokenizer, round trip through `DiffusionPipeline`), the
trainables (`lora`, `difffit`) and their experts on disk, checked against diffusers/peft loading them.

The tiny pipeline is built once per session and saved with `save_pretrained`; everything loads it back through
`load_pipeline`, the code path a Hub id takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rl.diffusion.models import (
    DIFFFIT_GAMMA,
    INIT_DEFAULTS,
    INIT_FILES,
    INIT_SMOKE,
    LORA_TARGETS,
    add_trainable,
    build_tiny_pipeline,
    colour_accuracy,
    ensure_init,
    fold_difffit,
    load_pipeline,
    save_expert,
    tiny_tokenizer,
)
from rl.diffusion.task import vocabulary
from soups.registry import UnknownNameError
from soups.utils import SoupsError

# Stable Diffusion 1.5's UNet config (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json), typed in.
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_UNET_PARAMS = 859_520_964  # the published parameter count of the SD 1.5 UNet


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_pipeline")
    build_tiny_pipeline(vocabulary(), seed=0).save_pretrained(path)
    return path


def _unet_inputs(unet: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return {
        "sample": torch.randn(2, unet.config.in_channels, size, size, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 5, unet.config.cross_attention_dim, generator=g),
    }


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and pipeline
# ----------------------------------------------------------------------------------------------------------


def test_tokenizer_one_token_per_word() -> None:
    words = vocabulary()
    tok = tiny_tokenizer(words)
    for word in words:
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("a red circle on a blue background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 7 + 2
    assert tok.model_max_length == 16


def test_pipeline_round_trip(tiny_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    original = build_tiny_pipeline(vocabulary(), seed=0)
    pipe = load_pipeline(tiny_dir)
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0, "output_type": "pt"}
    a = pipe(["a red circle on a blue background"], generator=torch.Generator().manual_seed(1), **kwargs).images
    original.set_progress_bar_config(disable=True)
    b = original(["a red circle on a blue background"], generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == (1, 3, 16, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_load_pipeline_missing_dir_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(SoupsError, match="cannot load the diffusers pipeline .*nowhere"):
        load_pipeline(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------
# Trainables
# ----------------------------------------------------------------------------------------------------------


def test_unknown_trainable_lists_valid_names(tiny_dir: Path) -> None:
    unet = load_pipeline(tiny_dir).unet
    with pytest.raises(UnknownNameError, match="unknown trainable 'full'; valid names: difffit, lora"):
        add_trainable(unet, "full")


def test_lora_expert_loads_with_load_lora_weights(tiny_dir: Path, tmp_path: Path) -> None:
    """The saved LoRA expert, loaded by diffusers, computes W0 + (alpha/r)·B·A from the saved tensors."""
    unet = load_pipeline(tiny_dir).unet
    names = add_trainable(unet, "lora", rank=4, alpha=8.0)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    with torch.no_grad():  # B starts at zero; make the adapter non-trivial
        g = torch.Generator().manual_seed(3)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    expert = save_expert(unet, tmp_path / "expert", "lora", base=str(tiny_dir))
    info = json.loads((expert / "soups_expert.json").read_text())
    assert info == {"base": str(tiny_dir), "trainable": "lora", "kind": "diffusers_lora", "rank": 4, "alpha": 8.0,
                    "target_modules": sorted(LORA_TARGETS)}  # fmt: skip
    saved = load_file(str(expert / "pytorch_lora_weights.safetensors"))

    base = load_pipeline(tiny_dir)
    w0 = {k: v.clone() for k, v in base.unet.state_dict().items()}
    pipe = load_pipeline(tiny_dir)
    pipe.load_lora_weights(expert)
    modules = dict(pipe.unet.named_modules())
    checked = 0
    for key in saved:
        if not key.endswith("lora_A.weight"):
            continue
        layer = key.removeprefix("unet.").removesuffix(".lora_A.weight")
        a, b = saved[key], saved[f"unet.{layer}.lora_B.weight"]
        weight = w0[f"{layer}.weight"] + (8.0 / 4) * b @ a
        bias = w0.get(f"{layer}.bias")
        x = torch.randn(3, a.shape[1], generator=torch.Generator().manual_seed(checked))
        want = torch.nn.functional.linear(x, weight, bias)
        with torch.no_grad():
            got = modules[layer](x)
            plain = torch.nn.functional.linear(x, w0[f"{layer}.weight"], bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, plain, atol=1e-4)  # the adapter is active, not silently dropped
        checked += 1
    n_attn = sum(type(m).__name__ == "Attention" for m in base.unet.modules())
    assert checked == 4 * n_attn  # to_q, to_k, to_v, to_out.0 of every attention


def _count(unet: torch.nn.Module, names: list[str]) -> tuple[int, int]:
    params = dict(unet.named_parameters())
    trainable = sum(params[n].numel() for n in names)
    base = sum(p.numel() for n, p in params.items() if not n.endswith(DIFFFIT_GAMMA))
    return trainable, base


def test_difffit_fraction_tiny(tiny_dir: Path) -> None:
    unet = load_pipeline(tiny_dir).unet
    names = add_trainable(unet, "difffit")
    trainable, total = _count(unet, names)
    assert 0 < trainable / total <= 0.10
    assert any(n.endswith(DIFFFIT_GAMMA) for n in names) and any(n.endswith(".bias") for n in names)
    assert any(".norm" in n and n.endswith(".weight") for n in names)
    modules = dict(unet.named_modules())
    weights = {n for n in names if n.endswith(".weight")}
    assert all(isinstance(modules[n.removesuffix(".weight")], torch.nn.GroupNorm | torch.nn.LayerNorm)
               for n in weights)  # fmt: skip


def test_difffit_fraction_sd15_unet() -> None:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMS
    names = add_trainable(unet, "difffit")
    trainable, total = _count(unet, names)
    assert total == SD15_UNET_PARAMS
    assert 0 < trainable / total <= 0.10


def test_difffit_starts_as_identity_and_folds_exactly(tiny_dir: Path, tmp_path: Path) -> None:
    """γ = 1 changes nothing; with random γ and biases, the saved (folded) UNet loaded by diffusers computes what
    the hooked UNet computes."""
    from diffusers import UNet2DConditionModel

    unet = load_pipeline(tiny_dir).unet
    inputs = _unet_inputs(unet)
    with torch.no_grad():
        before = unet(**inputs).sample
        add_trainable(unet, "difffit")
        torch.testing.assert_close(unet(**inputs).sample, before, rtol=0, atol=0)
        g = torch.Generator().manual_seed(5)
        for name, p in unet.named_parameters():
            if name.endswith(DIFFFIT_GAMMA):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        hooked = unet(**inputs).sample
    assert not torch.allclose(hooked, before, atol=1e-3)
    expert = save_expert(unet, tmp_path / "expert", "difffit", base="base-id")
    assert json.loads((expert / "soups_expert.json").read_text()) == {
        "base": "base-id", "trainable": "difffit", "kind": "diffusers_unet"}  # fmt: skip
    loaded = UNet2DConditionModel.from_pretrained(expert, subfolder="unet")
    assert set(loaded.state_dict()) == {k for k in unet.state_dict() if not k.endswith(DIFFFIT_GAMMA)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, hooked, rtol=1e-5, atol=1e-5)
    # fold_difffit by hand on one layer: γ ⊙ (W x + b)
    state = unet.state_dict()
    layer = next(k for k in state if k.endswith(DIFFFIT_GAMMA)).removesuffix("." + DIFFFIT_GAMMA)
    folded = fold_difffit(state)
    gamma = state[f"{layer}.{DIFFFIT_GAMMA}"]
    shape = (-1,) + (1,) * (state[f"{layer}.weight"].dim() - 1)
    torch.testing.assert_close(folded[f"{layer}.weight"], state[f"{layer}.weight"] * gamma.view(shape))
    torch.testing.assert_close(folded[f"{layer}.bias"], state[f"{layer}.bias"] * gamma)


@pytest.mark.parametrize("trainable", ["lora", "difffit"])
def test_training_only_the_trainables_keeps_the_base(tiny_dir: Path, trainable: str) -> None:
    unet = load_pipeline(tiny_dir).unet
    names = add_trainable(unet, trainable)
    params = dict(unet.named_parameters())
    start = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-2)
    unet.train()
    for step in range(2):
        inputs = _unet_inputs(unet, seed=step)
        loss = (unet(**inputs).sample - torch.randn_like(inputs["sample"])).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    frozen = [k for k in params if k not in names]
    assert frozen and all(torch.equal(params[k], start[k]) for k in frozen)
    changed = [k for k in names if not torch.equal(params[k], start[k])]
    assert len(changed) > len(names) // 2  # LoRA: the A's move on step 1 only after the B's leave zero


def test_save_expert_refuses_nan(tiny_dir: Path, tmp_path: Path) -> None:
    unet = load_pipeline(tiny_dir).unet
    add_trainable(unet, "difffit")
    name = next(n for n, _ in unet.named_parameters() if n.endswith(DIFFFIT_GAMMA))
    with torch.no_grad():
        dict(unet.named_parameters())[name][0] = float("nan")
    with pytest.raises(SoupsError, match=f"tensor {name.removesuffix('.' + DIFFFIT_GAMMA)}.weight has non-finite"):
        save_expert(unet, tmp_path / "expert", "difffit", base="b")
    assert not (tmp_path / "expert").exists()


# ----------------------------------------------------------------------------------------------------------
# The shared init
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_init(tmp_path_factory.mktemp("init") / "init", INIT_SMOKE)


def test_smoke_init_builds_a_pipeline_dir(smoke_init: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(smoke_init)
    assert isinstance(pipe, StableDiffusionPipeline)
    for name in INIT_FILES:
        assert (smoke_init / name).is_file(), name
    info = json.loads((smoke_init / "init_settings.json").read_text())
    assert info["settings"] == {**INIT_DEFAULTS, **INIT_SMOKE}
    # (a) set the latents' scale: 1 / std of the trained VAE's latents, saved in the VAE's config
    assert pipe.vae.config.scaling_factor == pytest.approx(info["vae"]["scaling_factor"])
    assert pipe.vae.config.scaling_factor != 1.0
    check = json.loads((smoke_init / "init_check.json").read_text())
    assert check["prompts"] == INIT_SMOKE["check_prompts"] == len(check["per_prompt"])
    assert check["accuracy_of_true_scenes"] == {"shape_colour": 1.0, "background": 1.0, "both": 1.0}
    assert 0 <= check["accuracy"]["shape_colour"] <= 1 and check["guidance_scale"] == INIT_SMOKE["guidance_scale"]
    # every trained component moved away from the random pipeline
    random = build_tiny_pipeline(vocabulary(), seed=0, vae_width=INIT_SMOKE["vae_width"],
                                 vae_attention=INIT_SMOKE["vae_attention"])  # fmt: skip
    for name in ("unet", "vae", "text_encoder"):
        trained = getattr(pipe, name).state_dict()
        assert any(not torch.equal(v, trained[k]) for k, v in getattr(random, name).state_dict().items()), name


def test_init_is_reused_when_settings_match(smoke_init: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in smoke_init.rglob("*") if p.is_file()}
    assert ensure_init(smoke_init, dict(INIT_SMOKE)) == smoke_init
    assert {p.name: p.stat().st_mtime_ns for p in smoke_init.rglob("*") if p.is_file()} == before


def test_init_with_other_settings_is_refused(smoke_init: Path) -> None:
    with pytest.raises(SoupsError, match=r"was built with other settings .*'unet_steps': \(10, 11\)"):
        ensure_init(smoke_init, {**INIT_SMOKE, "unet_steps": 11})


def test_bad_init_settings_are_one_error(tmp_path: Path) -> None:
    with pytest.raises(SoupsError, match="unknown init setting.s. unet_stepz; valid: seed, image_size"):
        ensure_init(tmp_path / "init", {"unet_stepz": 3})
    with pytest.raises(SoupsError, match="init setting unet_steps='3' must be a int"):
        ensure_init(tmp_path / "init", {"unet_steps": "3"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(SoupsError, match="is not a diffusion init"):
        ensure_init(tmp_path / "other", INIT_SMOKE)
    assert not (tmp_path / "init").exists()


def test_colour_classifier_on_true_scenes_and_noise() -> None:
    """The init check's classifier reads the true scenes right and is at chance on noise."""
    from rl.diffusion.task import generate_scenes

    scenes = generate_scenes(300, seed=123)
    acc = colour_accuracy(np.stack([s["image"] for s in scenes]), [s["prompt"] for s in scenes])
    assert acc["shape_colour"] >= 0.97 and acc["background"] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    acc = colour_accuracy(noise, [s["prompt"] for s in scenes])
    assert acc["shape_colour"] < 0.25 and acc["background"] < 0.25


@pytest.mark.slow
def test_init_is_deterministic_and_rebuilds(smoke_init: Path, tmp_path: Path) -> None:
    other = ensure_init(tmp_path / "init", INIT_SMOKE)
    a, b = load_pipeline(smoke_init), load_pipeline(other)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    ensure_init(other, {**INIT_SMOKE, "unet_steps": 5}, rebuild=True)
    assert json.loads((other / "init_settings.json").read_text())["settings"]["unet_steps"] == 5


@pytest.mark.slow
def test_full_init_is_recognisable(tmp_path: Path) -> None:
    """The quickstart's init: shape and background colours far above chance (1/10) on held-out prompts."""
    directory = ensure_init(tmp_path / "init", INIT_DEFAULTS)
    acc = json.loads((directory / "init_check.json").read_text())["accuracy"]
    assert acc["background"] >= 0.6 and acc["shape_colour"] >= 0.4
