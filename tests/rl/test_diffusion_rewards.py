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
    with pytest.raises(SoupsError, match=r"unknown option\(s\) \['gamma'\]; valid: scale"):
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
