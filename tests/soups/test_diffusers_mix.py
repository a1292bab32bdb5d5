"""Diffusers experts in the engine (soups.diffusers_lora): the exact LoRA mix in three formats, soups.mix outputs,
the resident Soup of soups.pareto, the strict key check, and the refusals.

One tiny random pipeline (rl.diffusion.models.build_tiny_pipeline) is saved once per module; the LoRA experts are
made with peft on its UNet, with different ranks, alphas and target modules and random non-zero B. The expected
mixes are computed here from the peft models in memory (peft's own `scaling`), independently of the engine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

from soups.utils import SoupsError  # noqa: E402

TARGETS_A = ["to_q", "to_k", "to_v", "to_out.0"]
TARGETS_B = ["to_q", "to_v", "to_out.0"]  # b leaves to_k alone: the mix covers the union of the targets
LAMBDA = [0.3, 0.7]
PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]


def _tree_hash(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _make_lora(base: Path, r: int, alpha: float, targets: list[str], seed: int) -> Any:
    """The base UNet with a peft LoRA (r, alpha) whose B is random and non-zero."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return unet, config


def _save_formats(unet: Any, config: Any, root: Path, name: str, base: Path) -> dict[str, Path]:
    """The same LoRA in the diffusers format (with metadata), the peft format and kohya's naming."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    layers = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    out = {"diffusers": root / f"{name}_diffusers", "peft": root / f"{name}_peft", "kohya": root / f"{name}_kohya"}
    StableDiffusionPipeline.save_lora_weights(out["diffusers"], unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=metadata)  # fmt: skip
    (out["diffusers"] / "soups_expert.json").write_text(json.dumps({"kind": "diffusers_lora", "base": str(base)}))
    out["peft"].mkdir()
    config.save_pretrained(out["peft"])
    save_file({f"base_model.model.{k}": v for k, v in layers.items()}, str(out["peft"] / "adapter_model.safetensors"))
    kohya = {}
    for key, tensor in layers.items():
        module, _, factor = key.rpartition(".lora_")
        flat = "lora_unet_" + module.replace(".", "_")
        kohya[f"{flat}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{flat}.alpha"] = torch.tensor(float(config.lora_alpha))
    out["kohya"].mkdir()
    save_file(kohya, str(out["kohya"] / "lora.safetensors"))
    out["kohya"] = out["kohya"] / "lora.safetensors"
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The base pipeline, two LoRA experts (r=2 α=4 on 4 projections; r=4 α=2 on 3) in three formats, and the
    independent expected deltas."""
    from rl.diffusion.models import build_tiny_pipeline
    from rl.diffusion.task import vocabulary

    root = tmp_path_factory.mktemp("diffusers_mix")
    build_tiny_pipeline(vocabulary(), seed=0).save_pretrained(root / "base")
    experts, deltas = {}, []
    for name, (r, alpha, targets, seed) in {"a": (2, 4.0, TARGETS_A, 1), "b": (4, 2.0, TARGETS_B, 2)}.items():
        unet, config = _make_lora(root / "base", r, alpha, targets, seed)
        experts[name] = _save_formats(unet, config, root, name, root / "base")
        delta = {}  # base weight key -> s·B·A in float64, from peft's own modules
        for module_name, module in unet.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a = module.lora_A["default"].weight.double()
                b = module.lora_B["default"].weight.double()
                delta[f"{module_name}.weight"] = module.scaling["default"] * (b @ a)
        deltas.append(delta)
        if name == "a":
            experts["a_unet"] = unet  # for the unprefixed save_lora_adapter file
    return {"root": root, "base": root / "base", "experts": experts, "deltas": deltas}


def _base_unet_state(base: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))


def test_merged_unet_is_w0_plus_weighted_deltas_with_each_experts_rank_and_alpha(world: dict[str, Any],
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    from diffusers import UNet2DConditionModel

    from soups.merge import mix

    paths = [world["experts"]["a"]["diffusers"], world["experts"]["b"]["diffusers"]]
    before = {**_tree_hash(paths[0]), **_tree_hash(paths[1]), **_tree_hash(world["base"])}
    summary = mix([str(p) for p in paths], LAMBDA, tmp_path / "soup", progress=False)
    assert {**_tree_hash(paths[0]), **_tree_hash(paths[1]), **_tree_hash(world["base"])} == before  # untouched
    merged = UNet2DConditionModel.from_pretrained(summary.output, subfolder="unet").state_dict()
    base = _base_unet_state(world["base"])
    touched = set(world["deltas"][0]) | set(world["deltas"][1])
    assert (len(world["deltas"][0]), len(world["deltas"][1]), len(touched)) == (56, 42, 56)  # 14 attentions
    for key, w0 in base.items():
        expected = w0.double() + sum(lam * d.get(key, 0.0) for lam, d in zip(LAMBDA, world["deltas"]))
        if key in touched:
            torch.testing.assert_close(merged[key].double(), expected, atol=2e-6, rtol=0)
            assert not torch.equal(merged[key], w0)
        else:
            assert torch.equal(merged[key], w0), key  # bit for bit
    record = json.loads((summary.output / "soup.json").read_text())
    assert record["weights"] == LAMBDA and record["mode"] == "diffusers-lora-delta-merged"
    assert [i["ranks"] for i in record["ingredients"]] == [[2], [4]]
    assert all(len(f["sha256"]) == 64 for i in record["ingredients"] for f in i["files"])
    assert "unet/config.json" in record["linked_files"] + record["copied_files"]
    assert not any(f.startswith("unet/diffusion") for f in record["linked_files"] + record["copied_files"])
    assert not (summary.output / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()


def test_three_formats_and_the_unprefixed_file_read_as_the_same_factors(world: dict[str, Any],
                                                                         tmp_path: Path) -> None:  # fmt: skip
    from soups.diffusers_lora import read_expert

    unet = world["experts"]["a_unet"]
    unet.save_lora_adapter(tmp_path / "unprefixed")  # unprefixed keys + unprefixed metadata
    reads = {fmt: read_expert(world["experts"]["a"][fmt], world["base"]) for fmt in ("diffusers", "peft", "kohya")}
    reads["unprefixed"] = read_expert(tmp_path / "unprefixed", world["base"])
    assert [r.fmt for r in reads.values()] == ["diffusers", "peft", "kohya", "diffusers-unprefixed"]
    reference = reads["diffusers"].factors()
    assert len(reference) == 56 and {f.scale for f in reference.values()} == {2.0}  # α / r = 4 / 2
    for fmt, expert in reads.items():
        factors = expert.factors()
        assert set(factors) == set(reference), fmt
        for key, f in factors.items():
            assert torch.equal(f.a, reference[key].a) and torch.equal(f.b, reference[key].b), (fmt, key)
            assert f.scale == reference[key].scale, (fmt, key)


def test_formats_mix_alike_and_kohya_agrees_with_diffusers_loader(world: dict[str, Any], tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from soups.merge import mix

    outputs = {}
    for fmt in ("kohya", "peft"):
        paths = [str(world["experts"]["a"][fmt]), str(world["experts"]["b"][fmt])]
        outputs[fmt] = mix(paths, LAMBDA, tmp_path / fmt, base=str(world["base"]), progress=False).output
    first = UNet2DConditionModel.from_pretrained(outputs["kohya"], subfolder="unet").state_dict()
    second = UNet2DConditionModel.from_pretrained(outputs["peft"], subfolder="unet").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # diffusers' own kohya converter on the same file plus conv LoRA (a 1×1 proj_in, a 3×3 resnet conv1: kohya's
    # LoCon): load, fuse at scale 1, compare with our single-expert mix
    from safetensors.torch import load_file, save_file

    kohya = load_file(str(world["experts"]["a"]["kohya"]))
    generator = torch.Generator().manual_seed(5)
    for flat, kernel in (("down_blocks_0_attentions_0_proj_in", 1), ("down_blocks_0_resnets_0_conv1", 3)):
        kohya[f"lora_unet_{flat}.lora_down.weight"] = torch.randn(2, 32, kernel, kernel, generator=generator)
        kohya[f"lora_unet_{flat}.lora_up.weight"] = 0.1 * torch.randn(32, 2, 1, 1, generator=generator)
        kohya[f"lora_unet_{flat}.alpha"] = torch.tensor(1.0)
    (tmp_path / "conv").mkdir()
    save_file(kohya, str(tmp_path / "conv" / "lora.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(world["base"])
    pipe.load_lora_weights(str(tmp_path / "conv"), weight_name="lora.safetensors")
    pipe.fuse_lora(components=["unet"])
    ours = mix([str(tmp_path / "conv" / "lora.safetensors")], [1.0], tmp_path / "one", base=str(world["base"]),
               progress=False).output  # fmt: skip
    mine = UNet2DConditionModel.from_pretrained(ours, subfolder="unet").state_dict()
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert set(fused) == set(mine)
    for key, value in mine.items():
        torch.testing.assert_close(fused[key], value, atol=1e-6, rtol=0)
    base = _base_unet_state(world["base"])
    for key in ("down_blocks.0.attentions.0.proj_in.weight", "down_blocks.0.resnets.0.conv1.weight"):
        assert (mine[key] - base[key]).abs().max() > 1e-3, key  # the conv LoRA did change it


def _images(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=3, generator=generator, guidance_scale=3.0, output_type="pt",
                    height=16, width=16).images  # fmt: skip


def test_merged_and_adapter_soups_generate_the_resident_soups_images(world: dict[str, Any], tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from soups.front import open_soup
    from soups.merge import mix

    paths = [str(world["experts"]["a"]["diffusers"]), str(world["experts"]["b"]["diffusers"])]
    merged = mix(paths, LAMBDA, tmp_path / "merged", progress=False).output
    adapter = mix(paths, LAMBDA, tmp_path / "adapter", lora_output="adapter", progress=False).output
    assert json.loads((adapter / "soups_expert.json").read_text())["kind"] == "diffusers_lora"

    soup = open_soup(paths, base_model=None, device=torch.device("cpu"), dtype=torch.float32)
    assert type(soup.model).__name__ == "UNet2DConditionModel"
    soup.set_weights([1.0, 0.0])
    soup.set_weights(LAMBDA)  # switching back and forth does not drift
    resident = DiffusionPipeline.from_pretrained(world["base"])
    resident.unet = soup.model
    from_merged = DiffusionPipeline.from_pretrained(merged)
    with_adapter = DiffusionPipeline.from_pretrained(world["base"])
    with_adapter.load_lora_weights(str(adapter))
    images = _images(resident)
    assert (images - _images(from_merged)).abs().max() <= 1e-5
    assert (images - _images(with_adapter)).abs().max() <= 1e-5
    assert (images - _images(DiffusionPipeline.from_pretrained(world["base"]))).abs().max() > 1e-2  # LoRA matters
    merged_state = from_merged.unet.state_dict()
    assert all(torch.equal(v, merged_state[k]) for k, v in soup.model.state_dict().items())  # bit for bit


def test_equal_rank_factors_are_never_averaged_and_ab_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    from soups.diffusers_lora import merged_weight, read_expert
    from soups.merge import mix

    a = read_expert(world["experts"]["a"]["diffusers"]).factors()
    (key, fa), = [(k, f) for k, f in a.items() if k[1].endswith("attn1.to_q.weight")][:1]
    fb = type(fa)(a=torch.randn_like(fa.a), b=torch.randn_like(fa.b), alpha=fa.alpha, scale=fa.scale)  # equal rank
    w0 = torch.zeros(fa.b.shape[0], fa.a.shape[1])
    exact = merged_weight(w0, [fa, fb], [0.5, 0.5])
    averaged = fa.scale * (0.5 * (fa.b + fb.b)) @ (0.5 * (fa.a + fb.a))
    torch.testing.assert_close(exact, 0.5 * fa.scale * (fa.b @ fa.a + fb.b @ fb.a))
    assert (exact - averaged).abs().max() > 1e-3
    paths = [str(world["experts"]["a"]["diffusers"])] * 2
    with pytest.raises(SoupsError, match="exactly"):
        mix(paths, [0.5, 0.5], tmp_path / "ab", lora_mode="ab", progress=False)
    assert not (tmp_path / "ab").exists()


def test_unet_experts_mix_as_weighted_weights(world: dict[str, Any], tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from soups.front import open_soup
    from soups.merge import mix

    base = _base_unet_state(world["base"])
    config = (world["base"] / "unet" / "config.json").read_text()
    experts, states = [], []
    for i in range(2):
        generator = torch.Generator().manual_seed(10 + i)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        (tmp_path / f"u{i}" / "unet").mkdir(parents=True)
        (tmp_path / f"u{i}" / "unet" / "config.json").write_text(config)
        save_file(state, str(tmp_path / f"u{i}" / "unet" / "diffusion_pytorch_model.safetensors"))
        (tmp_path / f"u{i}" / "soups_expert.json").write_text(json.dumps({"kind": "diffusers_unet",
                                                                           "base": str(world["base"])}))
        experts.append(str(tmp_path / f"u{i}"))
        states.append(state)
    out = mix(experts, LAMBDA, tmp_path / "soup", progress=False).output
    pipe = DiffusionPipeline.from_pretrained(out)
    soup = open_soup(experts, base_model=None, device=torch.device("cpu"), dtype=torch.float32)
    soup.set_weights(LAMBDA)
    resident = soup.model.state_dict()
    for key, value in pipe.unet.state_dict().items():
        expected = LAMBDA[0] * states[0][key].double() + LAMBDA[1] * states[1][key].double()
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(resident[key], value, atol=1e-6, rtol=0)
    assert json.loads((out / "soup.json").read_text())["mode"] == "diffusers-unet-linear"
    # a pipeline dir (the front's init point) is the diffusers_pipeline kind: its own UNet, resident
    from soups.pareto_registry import check_experts

    assert check_experts([str(world["base"])])["kind"] == "diffusers_pipeline"
    init = open_soup([str(world["base"])], base_model=None, device=torch.device("cpu"), dtype=torch.float32)
    assert all(torch.equal(v, base[k]) for k, v in init.set_weights([1.0]).state_dict().items())


def test_save_lora_adapter_file_silently_loads_nothing_in_diffusers_but_not_here(world: dict[str, Any],
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    from diffusers import UNet2DConditionModel

    from soups.diffusers_lora import load_lora_strict

    world["experts"]["a_unet"].save_lora_adapter(tmp_path / "expert")  # keys without the "unet." prefix
    quiet = UNet2DConditionModel.from_pretrained(world["base"], subfolder="unet")
    before = {k: v.clone() for k, v in quiet.state_dict().items()}
    quiet.load_lora_adapter(str(tmp_path / "expert"), weight_name="pytorch_lora_weights.safetensors",
                            prefix="unet")  # diffusers: no error, nothing loaded
    assert not getattr(quiet, "peft_config", {}) and quiet.state_dict().keys() == before.keys()
    strict = UNet2DConditionModel.from_pretrained(world["base"], subfolder="unet")
    with pytest.raises(SoupsError, match=r"pytorch_lora_weights\.safetensors: none of its 112 tensors is under prefix"):
        load_lora_strict(strict, tmp_path / "expert", prefix="unet")
    loaded = load_lora_strict(strict, tmp_path / "expert", prefix=None)
    assert len(loaded) == 112 and "default" in strict.peft_config


def test_different_base_unets_are_refused_by_mix_and_pareto(world: dict[str, Any], tmp_path: Path) -> None:
    from rl.diffusion.models import build_tiny_pipeline
    from rl.diffusion.task import vocabulary
    from soups.merge import mix
    from soups.pareto_registry import check_experts

    a = world["experts"]["a"]["diffusers"]
    other = tmp_path / "other_base"
    build_tiny_pipeline(vocabulary(), seed=1, block_out_channels=(16, 32), text_width=16).save_pretrained(other)
    c = tmp_path / "c"
    c.mkdir()
    for name in ("pytorch_lora_weights.safetensors",):
        (c / name).write_bytes((world["experts"]["b"]["diffusers"] / name).read_bytes())
    (c / "soups_expert.json").write_text(json.dumps({"kind": "diffusers_lora", "base": str(other)}))
    for call in (lambda: mix([str(a), str(c)], [0.5, 0.5], tmp_path / "out", progress=False),
                 lambda: check_experts([str(a), str(c)])):  # fmt: skip
        with pytest.raises(SoupsError, match=rf"experts {a} and {c} have different base pipelines"):
            call()
    # no recorded base, the wrong base given: the shapes name the file and the tensor
    with pytest.raises(SoupsError, match=r"lora\.safetensors: tensor 'lora_unet_.*' .*another base"):
        mix([str(world["experts"]["a"]["kohya"])], [1.0], tmp_path / "out", base=str(other), progress=False)
    assert not (tmp_path / "out").exists()


def test_text_encoder_lora_mixes_on_disk_but_not_in_the_front(world: dict[str, Any], tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file

    from soups.merge import mix
    from soups.pareto_registry import check_experts

    src = load_file(str(world["experts"]["a"]["kohya"]))
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    generator = torch.Generator().manual_seed(3)
    src[f"{te}.lora_down.weight"] = torch.randn(2, 32, generator=generator)
    src[f"{te}.lora_up.weight"] = torch.randn(32, 2, generator=generator)
    src[f"{te}.alpha"] = torch.tensor(1.0)
    (tmp_path / "k").mkdir()
    save_file(src, str(tmp_path / "k" / "lora.safetensors"))
    out = mix([str(tmp_path / "k" / "lora.safetensors")], [1.0], tmp_path / "soup", base=str(world["base"]),
              progress=False).output  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(out)
    base = DiffusionPipeline.from_pretrained(world["base"])
    key = "encoder.layers.0.self_attn.q_proj.weight"  # transformers 5 names CLIPTextModel without `text_model.`
    expected = base.text_encoder.state_dict()[key] + 0.5 * src[f"{te}.lora_up.weight"] @ src[f"{te}.lora_down.weight"]
    torch.testing.assert_close(pipe.text_encoder.state_dict()[key], expected, atol=1e-6, rtol=0)
    # (diffusers 0.42's own kohya text-encoder loading fails on transformers 5 CLIP models: "Could not
    # automatically infer state dict type"; the expected value above is the independent check)
    (tmp_path / "k" / "soups_expert.json").write_text(json.dumps({"kind": "diffusers_lora", "base": str(world["base"]),
                                                                  "weights": "lora.safetensors"}))  # fmt: skip
    with pytest.raises(SoupsError, match=r"adapts the text_encoder \(weight 'encoder\.layers\.0"):
        check_experts([str(tmp_path / "k"), str(tmp_path / "k")])
