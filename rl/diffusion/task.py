"""Prompts and images of the embedded diffusion task: procedural scenes of one coloured shape on a background.

A scene is one shape (circle, square, triangle) of one colour, at a position and size, on a plain background of
another colour, rendered at `size`×`size` (16 by default, the tiny UNet's resolution) with 4× supersampling so
edges are anti-aliased. Its caption is "a red circle on a blue background". The palette mixes vivid colours
(red, green, blue, yellow, purple, orange) with dull ones (white, grey, black, brown): a prompt asking for a grey
square on a white background is one where prompt fidelity and colourfulness genuinely disagree, which is what makes
the two embedded rewards conflict (`rl.diffusion.rewards`).

Everything is a pure function of a seed. Prompt files (`load_prompts`) are plain text, one prompt per line, for
the Stable Diffusion presets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evals.errors import SoupsError

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "SHAPES",
    "Scene",
    "caption",
    "generate_scenes",
    "load_prompts",
    "render",
    "sample_scene",
    "scene_prompts",
    "vocabulary",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 50, 190),
    "orange": (240, 130, 20),
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
    "brown": (120, 80, 45),
}
BACKGROUNDS: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
_TEMPLATE = "a {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class Scene:
    """One procedural scene.

    Attributes:
        shape: One of `SHAPES`.
        colour: The shape's colour, a key of `COLOURS`.
        background: The background's colour, a key of `COLOURS` (never `colour`).
        cx: The shape's centre, x, as a fraction of the width in [0.3, 0.7].
        cy: The shape's centre, y, as a fraction of the height in [0.3, 0.7].
        radius: Half the shape's extent, as a fraction of the width in [0.2, 0.32].
    """

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float


def caption(scene: Scene) -> str:
    """The scene's prompt, e.g. "a red circle on a blue background"."""
    return _TEMPLATE.format(colour=scene.colour, shape=scene.shape, background=scene.background)


def sample_scene(rng: random.Random) -> Scene:
    """Draws a scene: uniform shape, colour, and background among the other colours; jittered position and size."""
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in BACKGROUNDS if c != colour])
    return Scene(
        shape=rng.choice(SHAPES),
        colour=colour,
        background=background,
        cx=rng.uniform(0.3, 0.7),
        cy=rng.uniform(0.3, 0.7),
        radius=rng.uniform(0.2, 0.32),
    )


def render(scene: Scene, size: int = 16, supersample: int = 4) -> np.ndarray:
    """Renders a scene.

    Args:
        scene: What to draw.
        size: The image side in pixels.
        supersample: Drawn at `size * supersample` and box-filtered down, so edges are anti-aliased.

    Returns:
        uint8 array of shape [size, size, 3].
    """
    n = size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    x, y = np.meshgrid(coords, coords)  # [n, n] each; y grows downwards
    dx, dy, r = x - scene.cx, y - scene.cy, scene.radius
    if scene.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif scene.shape == "square":
        mask = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif scene.shape == "triangle":
        # Upward triangle with its base at cy + r and apex at cy - r: inside when |dx| <= r * (dy + r) / (2r).
        mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise SoupsError(f"unknown shape {scene.shape!r}; valid shapes: {', '.join(SHAPES)}")
    image = np.empty((n, n, 3), dtype=np.float64)
    image[:] = COLOURS[scene.background]
    image[mask] = COLOURS[scene.colour]
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate_scenes(n: int, seed: int, size: int = 16) -> list[dict]:
    """`n` captioned scenes, a pure function of `seed`.

    Returns:
        Dicts with `image` (uint8 [size, size, 3]), `prompt` (str) and `scene` (`Scene`).
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append({"image": render(scene, size), "prompt": caption(scene), "scene": scene})
    return out


def scene_prompts(n: int, seed: int) -> list[str]:
    """`n` prompts of the embedded task (the captions of `n` scenes drawn from `seed`), e.g. the RWR prompts."""
    rng = random.Random(seed)
    return [caption(sample_scene(rng)) for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word of every embedded caption, sorted (the tiny tokenizer's words)."""
    words = set(_TEMPLATE.format(colour="", shape="", background="").split())
    words |= set(COLOURS) | set(SHAPES)
    return sorted(words)


def load_prompts(path: str | Path) -> list[str]:
    """Reads a prompt file: one prompt per line, blank lines and lines starting with `#` skipped.

    Raises:
        SoupsError: the file is missing, unreadable, or holds no prompt (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise SoupsError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SoupsError(f"prompt file {path} cannot be read: {err}") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise SoupsError(f"prompt file {path} is empty: it needs one prompt per line")
    return prompts
