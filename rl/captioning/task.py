"""Caption data: the embedded procedural scenes (offline, deterministic) and the Karpathy split of COCO.

**Procedural scenes** (`task=scenes`, the default): 63×63 RGB images with 1 to `max_shapes` coloured shapes
(square, circle, triangle) in cells of a 3×3 grid, each with 5 reference captions of mixed lengths, as COCO's
references are: the first is short ("red box"), the others medium ("a red square on the left"), long ("there is a
small red block at the left side in the picture") or very long ("the image shows a small red square to the left
on a white background"), with weighted synonyms ("square" / "box" / "block") and paraphrases ("on the left" /
"at the left side"). The metrics then prefer different captions, as on COCO: BLEU-1 (clipped precision with a
brevity penalty against the closest reference length) short captions of safe words, METEOR (recall-weighted)
long ones, ROUGE-L, BLEU-4 (exact 4-grams) and CIDEr-D (tf-idf consensus over all references, length penalty)
medium ones with or without the optional words. Captions are lower-case words without punctuation, so the
pure-Python tokenizer gives what the PTB tokenizer would (the reward then needs no JVM per step).

**Karpathy split** (`task=karpathy`): `dataset_coco.json` (Karpathy & Fei-Fei's split file: images with
`filepath`, `filename`, `split` in train/restval/val/test, `sentences[].raw`) plus the COCO images directory;
`restval` joins train, as in the captioning literature.

A sample is a dict: `id` (int or str), `refs` (list of reference captions), and either `image` (uint8 [H, W, 3])
or `path` (an image file, read when a batch needs it); a scene also lists its `objects` as (shape, colour,
(row, column) phrase key) tuples, left to right.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soups.utils import SoupsError

__all__ = [
    "CAPTIONS_VERSION",
    "CaptionTask",
    "ScenesConfig",
    "build_caption_task",
    "generate_scenes",
    "load_images",
    "load_karpathy",
    "scene_words",
]

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190)}  # fmt: skip
SHAPES = ("square", "circle", "triangle")
# Each shape's names with their weights in the references: a common word and rarer synonyms.
SHAPE_SYNONYMS = {"square": (("square", 5), ("box", 3), ("block", 2)),
                  "circle": (("circle", 5), ("disc", 3), ("ball", 2)),
                  "triangle": (("triangle", 6), ("wedge", 4))}  # fmt: skip
# Cells of the 3×3 grid (row, column) and their phrases (three paraphrases each, drawn uniformly).
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")
PLACE_PHRASES = {
    ("middle", "left"): ("on the left", "at the left side", "to the left"),
    ("middle", "right"): ("on the right", "at the right side", "to the right"),
    ("middle", "centre"): ("in the middle", "at the centre", "in the centre"),
    ("top", "centre"): ("at the top", "near the top", "up at the top"),
    ("bottom", "centre"): ("at the bottom", "near the bottom", "down at the bottom"),
    ("top", "left"): ("in the top left", "at the top left", "up on the left"),
    ("top", "right"): ("in the top right", "at the top right", "up on the right"),
    ("bottom", "left"): ("in the bottom left", "at the bottom left", "down on the left"),
    ("bottom", "right"): ("in the bottom right", "at the bottom right", "down on the right"),
}
# Reference templates after the first (always short) one, with their weights: short "red box", medium
# "a red box on the left", long "there is a small red box on the left in the picture", very long "the image
# shows a small red box on the left on a white background".
TEMPLATES = (("short", 10), ("medium", 40), ("long", 30), ("very_long", 20))
# Bumped whenever the captions a seed gives change: part of the cached XE init's settings, so an init built on
# other references is refused.
CAPTIONS_VERSION = 2


def scene_words() -> list[str]:
    """Every word a scene caption can use (the embedded tokenizer's vocabulary), sorted."""
    words = {"a", "an", "and", "there", "is", "the", "image", "shows", "picture", "of", "with", "shapes", "are",
             "two", "three", "here", "we", "see", "in", "next", "to", "small", "coloured", "on", "white",
             "background"}  # fmt: skip
    words.update(COLOURS)
    for names in SHAPE_SYNONYMS.values():
        words.update(name for name, _ in names)
    for phrases in PLACE_PHRASES.values():
        for phrase in phrases:
            words.update(phrase.split())
    return sorted(words)


@dataclass(frozen=True)
class ScenesConfig:
    """The procedural scenes.

    Attributes:
        seed: Seed of every split (each split has its own stream).
        n_train: Training images.
        n_val: Validation images (λ selection, early checks).
        n_test: Test images (the reported numbers).
        max_shapes: 1 to 3 shapes per image.
        image_size: Side of the square image in pixels (a multiple of 3 is not needed).
        n_refs: Reference captions per image.
    """

    seed: int = 0
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    max_shapes: int = 2
    image_size: int = 63
    n_refs: int = 5

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test", "n_refs"):
            if int(getattr(self, name)) < 1:
                raise SoupsError(f"task.{name}={getattr(self, name)} must be >= 1")
        if not 1 <= int(self.max_shapes) <= 3:
            raise SoupsError(f"task.max_shapes={self.max_shapes} must be 1, 2 or 3")
        if int(self.image_size) < 16:
            raise SoupsError(f"task.image_size={self.image_size} must be >= 16")


def _draw(image: np.ndarray, shape: str, colour: tuple[int, int, int], row: int, col: int, rng: random.Random) -> None:
    size = image.shape[0]
    cell = size / 3
    radius = cell * rng.uniform(0.28, 0.42)
    cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
    cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        mask = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
    elif shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:  # an upward triangle: inside when below the two slanted sides and above the base
        top, base = cy - radius, cy + radius
        half = (yy - top) / (2 * radius) * radius
        mask = (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)
    image[mask] = colour


def _shape_name(shape: str, rng: random.Random) -> str:
    names, weights = zip(*SHAPE_SYNONYMS[shape])
    return rng.choices(names, weights)[0]


def _caption(objects: Sequence[tuple[str, str, tuple[str, str]]], template: str, rng: random.Random) -> str:
    """One reference of a scene in one template (objects described left to right, joined by "and")."""
    if template == "short":
        return " and ".join(f"{colour} {_shape_name(shape, rng)}" for shape, colour, _ in objects)
    size = "" if template == "medium" else "small "
    body = " and ".join(f"a {size}{colour} {_shape_name(shape, rng)} {rng.choice(PLACE_PHRASES[place])}"
                        for shape, colour, place in objects)  # fmt: skip
    if template == "long":
        return f"there is {body} in the picture"
    if template == "very_long":
        return f"the image shows {body} on a white background"
    return body


def _captions(objects: Sequence[tuple[str, str, tuple[str, str]]], n: int, rng: random.Random) -> list[str]:
    """`n` different reference captions of one scene: a short one ("red box"), then templates of every length.

    The metrics' best captions then differ, as on COCO: BLEU-1 (clipped precision, brevity penalty against the
    closest reference length) is highest for short captions of safe words; METEOR (recall-weighted, α = 0.9)
    for long ones; ROUGE-L (LCS F-measure, β = 1.2), BLEU-4 (exact 4-grams) and CIDEr-D (tf-idf consensus over
    all references, length penalty) for medium ones with or without the frequent optional words.
    """
    names, weights = zip(*TEMPLATES)
    out: list[str] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        template = "short" if not out else rng.choices(names, weights)[0]
        text = _caption(objects, template, rng)
        if text not in out:
            out.append(text)
    return out


def generate_scenes(cfg: ScenesConfig, split: str) -> list[dict[str, Any]]:
    """The samples of one split (`train`, `val` or `test`), a pure function of (cfg, split)."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    if split not in sizes:
        raise SoupsError(f"unknown split {split!r}; valid: train, val, test")
    rng = random.Random(f"scenes-{cfg.seed}-{split}")
    cells = [(r, c) for r in range(3) for c in range(3)]
    samples = []
    for i in range(sizes[split]):
        n = rng.randint(1, cfg.max_shapes)
        places = rng.sample(cells, n)
        places.sort(key=lambda rc: (rc[1], rc[0]))  # described left to right
        image = np.full((cfg.image_size, cfg.image_size, 3), 245, dtype=np.uint8)
        objects = []
        for row, col in places:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            _draw(image, shape, COLOURS[colour], row, col, rng)
            objects.append((shape, colour, (_ROWS[row], _COLS[col])))
        samples.append({"id": f"{split}-{i}", "image": image, "refs": _captions(objects, cfg.n_refs, rng),
                        "objects": objects})
    return samples


# ----------------------------------------------------------------------------------------------------------
# Karpathy split
# ----------------------------------------------------------------------------------------------------------


def load_karpathy(
    json_path: str | Path, images_dir: str | Path, split: str, limit: int | None = None
) -> list[dict[str, Any]]:
    """The images of one split of `dataset_coco.json` (train includes restval), as samples with `path`.

    Raises:
        SoupsError: the JSON or the images directory is missing, or the JSON is not a Karpathy split file.
    """
    json_path, images_dir = Path(json_path), Path(images_dir)
    if not json_path.is_file():
        raise SoupsError(f"Karpathy split file {json_path} not found: download dataset_coco.json (Karpathy's "
                         "caption_datasets.zip) and set task.karpathy_json=<path>")
    if not images_dir.is_dir():
        raise SoupsError(f"COCO images directory {images_dir} not found; set task.images_dir=<dir holding "
                         "train2014/ and val2014/>")
    try:
        images = json.loads(json_path.read_text())["images"]
    except (ValueError, KeyError, TypeError) as err:
        raise SoupsError(f"{json_path} is not a Karpathy split file (no 'images' list): {err}") from err
    wanted = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}.get(split)
    if wanted is None:
        raise SoupsError(f"unknown split {split!r}; valid: train, val, test")
    out = []
    for entry in images:
        if entry.get("split") not in wanted:
            continue
        refs = [s["raw"] for s in entry.get("sentences", [])]
        key = entry.get("cocoid", entry.get("imgid", entry.get("filename")))
        if not refs:
            raise SoupsError(f"{json_path}: image {key} has no reference captions")
        out.append({"id": key, "path": str(images_dir / entry.get("filepath", "") / entry["filename"]),
                    "refs": refs})  # fmt: skip
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise SoupsError(f"{json_path} has no image in split {split!r}")
    return out


def load_images(samples: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
    """uint8 [H, W, 3] arrays of samples (in memory, or read from `path` with PIL)."""
    out = []
    for s in samples:
        if "image" in s:
            out.append(np.asarray(s["image"]))
            continue
        from PIL import Image

        try:
            with Image.open(s["path"]) as im:
                out.append(np.asarray(im.convert("RGB")))
        except OSError as err:
            raise SoupsError(f"cannot read image {s['path']}: {err}") from err
    return out


# ----------------------------------------------------------------------------------------------------------
# The task object
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CaptionTask:
    """The splits of a captioning task (lists of samples) and its name."""

    name: str
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]

    def split(self, name: str) -> list[dict[str, Any]]:
        """One split by name."""
        if name not in ("train", "val", "test"):
            raise SoupsError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, name)


def build_caption_task(cfg: Mapping[str, Any] | Any) -> CaptionTask:
    """The task of a `task` config node: `name: scenes` (ScenesConfig fields) or `name: karpathy`
    (`karpathy_json`, `images_dir`, optional `limit_train`/`limit_eval`)."""
    data = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    name = str(data.pop("name", "scenes"))
    if name == "scenes":
        known = set(ScenesConfig.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SoupsError(f"task=scenes: unknown key(s) {unknown}; valid: {', '.join(sorted(known))}")
        sc = ScenesConfig(**{k: int(v) for k, v in data.items()})
        return CaptionTask(name, *(generate_scenes(sc, s) for s in ("train", "val", "test")))
    if name == "karpathy":
        for key in ("karpathy_json", "images_dir"):
            if not data.get(key):
                raise SoupsError(f"task=karpathy needs task.{key}")
        lt, le = data.get("limit_train"), data.get("limit_eval")
        splits = [load_karpathy(data["karpathy_json"], data["images_dir"], s, lt if s == "train" else le)
                  for s in ("train", "val", "test")]  # fmt: skip
        return CaptionTask(name, *splits)
    raise SoupsError(f"unknown task name {name!r}; valid: karpathy, scenes")
