"""Contact sheets: a grid of small images (one row per model or λ, one column per prompt and seed), labelled.

`contact_sheet` tiles uint8 images into one array (pure numpy, exact geometry); `save_contact_sheet` writes it as
a PNG with row and column labels (matplotlib, so labels such as λ render). Used by the front's `lambda_grid.png`
(`rl.diffusion.evaluator`) and the init's `init_samples.png` (`rl.diffusion.models`); it imports neither.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from soups.utils import SoupsError

__all__ = ["contact_sheet", "save_contact_sheet"]


# ---------------------------------------------------------------------------------------------------------------


def contact_sheet(images: np.ndarray, *, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tiles a grid of images into one picture, each image upscaled by `scale` (nearest) and framed by `pad` white
    pixels.

    Args:
        images: uint8, shape [R, C, H, W, 3]: row r, column c.
        scale: Integer upscaling of every image (tiny 16×16 images are unreadable at 1×).
        pad: White pixels between cells and around the sheet.

    Returns:
        uint8, shape [R·(H·scale + pad) + pad, C·(W·scale + pad) + pad, 3]; cell (r, c) starts at
        (pad + r·(H·scale + pad), pad + c·(W·scale + pad)).

    Raises:
        SoupsError: `images` is not a uint8 array of that shape, or scale < 1 or pad < 0.
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise SoupsError(f"contact sheet: images must be uint8 [rows, cols, H, W, 3], got {images.dtype} "
                         f"{list(images.shape)}")  # fmt: skip
    if scale < 1 or pad < 0:
        raise SoupsError(f"contact sheet: scale={scale} must be ≥ 1 and pad={pad} ≥ 0")
    rows, cols, height, width, _ = images.shape
    cell_h, cell_w = height * scale + pad, width * scale + pad
    sheet = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, dtype=np.uint8)
    big = images.repeat(scale, axis=2).repeat(scale, axis=3)  # [R, C, H·s, W·s, 3]
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * cell_h, pad + c * cell_w
            sheet[top : top + height * scale, left : left + width * scale] = big[r, c]
    return sheet


def save_contact_sheet(
    path: str | Path,
    images: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    scale: int = 4,
    pad: int = 2,
    title: str | None = None,
) -> np.ndarray:
    """Writes `contact_sheet(images)` as a PNG with a label left of every row and above every column.

    Args:
        path: The PNG to write.
        images: uint8, shape [R, C, H, W, 3].
        row_labels: R labels (e.g. "λ=0.30,0.70").
        col_labels: C labels (e.g. the prompt and the seed).
        scale: See `contact_sheet`.
        pad: See `contact_sheet`.
        title: A line above the sheet.

    Returns:
        The sheet's pixels (without labels), shape as `contact_sheet`'s.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sheet = contact_sheet(images, scale=scale, pad=pad)
    rows, cols, height, width, _ = np.asarray(images).shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise SoupsError(f"contact sheet: {len(row_labels)} row labels and {len(col_labels)} column labels for a "
                         f"{rows}×{cols} grid")  # fmt: skip
    dpi = 100
    longest = max((len(line) for label in row_labels for line in str(label).split("\n")), default=0)
    left_px = 16 + int(5.5 * longest)  # room for the row labels (7 pt ≈ 5.5 px per character at 100 dpi)
    top_px = 60 + (20 if title else 0)  # room for the column labels and the title
    fig_w, fig_h = (sheet.shape[1] + left_px + 10) / dpi, (sheet.shape[0] + top_px + 10) / dpi
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((left_px / dpi / fig_w, 10 / dpi / fig_h, sheet.shape[1] / dpi / fig_w,
                       sheet.shape[0] / dpi / fig_h))  # fmt: skip
    ax.imshow(sheet, interpolation="nearest")
    cell_h, cell_w = height * scale + pad, width * scale + pad
    ax.set_yticks([pad + r * cell_h + height * scale / 2 for r in range(rows)], list(row_labels), fontsize=7)
    ax.set_xticks([pad + c * cell_w + width * scale / 2 for c in range(cols)],
                  ["\n".join(textwrap.wrap(label, 14)) for label in col_labels], fontsize=5)  # fmt: skip
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 4 / dpi / fig_h, va="top")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return sheet
