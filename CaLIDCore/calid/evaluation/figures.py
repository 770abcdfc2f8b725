"""Figures: long-axis cuts through short-axis stacks, before / after upsampling."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from calid.atomic import atomic_path
from calid.data.stack import CineStack


def long_axis_cut(stack: CineStack, frame: int = 0, row: int | None = None) -> np.ndarray:
    """The (Z, X) image of one row of every slice, resampled to square pixels.

    Each slice is repeated (nearest neighbour) so that one output pixel spans
    the in-plane column spacing along z too: the cut has true proportions.
    """
    row = stack.shape[2] // 2 if row is None else row
    cut = stack.data[frame, :, row, :]  # (Z, X)
    repeat = max(1, int(round(stack.slice_spacing / stack.spacing[0])))
    return np.repeat(cut, repeat, axis=0)


def save_comparison(
    stacks: Sequence[tuple[str, CineStack]],
    path: str | os.PathLike[str],
    frame: int = 0,
    row: int | None = None,
    title: str = "",
) -> Path:
    """A PNG with the long-axis cut (row ``row``) of each stack side by side, written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cuts = [(name, long_axis_cut(stack, frame, row)) for name, stack in stacks]
    low = min(float(np.percentile(c, 0.5)) for _, c in cuts)
    high = max(float(np.percentile(c, 99.5)) for _, c in cuts)
    figure, axes = plt.subplots(1, len(cuts), figsize=(3.2 * len(cuts), 3.6), squeeze=False)
    for axis, (name, cut) in zip(axes[0], cuts):
        axis.imshow(cut, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
    return path
