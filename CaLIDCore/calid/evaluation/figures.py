"""Figures: long-axis cuts through short-axis stacks, before / after upsampling."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calid.atomic import atomic_path
from calid.data.stack import CineStack


def long_axis_cut(stack: CineStack, frame: int = 0, row: int | None = None, axis: str = "row") -> np.ndarray:
    """A long-axis cut across every slice, resampled to square pixels.

    ``axis="row"``: the (Z, X) image of row ``row`` (default: the middle row);
    ``axis="column"``: the (Z, Y) image of column ``row`` (default: the middle column).
    Each slice is repeated (nearest neighbour) so that one output pixel spans
    the in-plane spacing along z too: the cut has true proportions.
    """
    if axis == "row":
        index = stack.shape[2] // 2 if row is None else row
        cut, pixel = stack.data[frame, :, index, :], stack.spacing[0]  # (Z, X)
    elif axis == "column":
        index = stack.shape[3] // 2 if row is None else row
        cut, pixel = stack.data[frame, :, :, index], stack.spacing[1]  # (Z, Y)
    else:
        raise ValueError(f"axis must be 'row' or 'column', got {axis!r}")
    repeat = max(1, int(round(stack.slice_spacing / pixel)))
    return np.repeat(cut, repeat, axis=0)


def save_comparison(
    stacks: Sequence[tuple[str, CineStack]],
    path: str | os.PathLike[str],
    frame: int = 0,
    row: int | None = None,
    title: str = "",
    axes_shown: Sequence[str] = ("row",),
) -> Path:
    """A PNG of long-axis cuts: one column per stack, one row per cut direction, written atomically.

    ``frame`` may differ per stack only through :meth:`CineStack.select_frames`
    beforehand; every stack is cut at the same frame index, row and column.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = [[(name, long_axis_cut(stack, frame, row, axis)) for name, stack in stacks] for axis in axes_shown]
    values = [c for line in grid for _, c in line]
    low = min(float(np.percentile(c, 0.5)) for c in values)
    high = max(float(np.percentile(c, 99.5)) for c in values)
    figure, axes = plt.subplots(len(grid), len(stacks), figsize=(3.2 * len(stacks), 3.4 * len(grid) + 0.3), squeeze=False)
    for line_axes, line, direction in zip(axes, grid, axes_shown):
        for axis, (name, cut) in zip(line_axes, line):
            axis.imshow(cut, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
            axis.set_title(name if len(grid) == 1 else f"{name}\n({direction} cut)", fontsize=9)
            axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def save_figure(figure: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Lay out, write (PNG, atomically) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")
    plt.close(figure)
    return path
