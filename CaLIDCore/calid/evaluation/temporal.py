"""Temporal coherence of a generated slice over the cardiac cycle (the 2D+T comparison)."""

from __future__ import annotations

import numpy as np


def frame_to_frame_change(clip: np.ndarray) -> float:
    """Mean absolute change between consecutive frames of a (T, Y, X) clip, cyclic (a cine is one cycle).

    A slice generated frame by frame flickers: its change exceeds that of the true
    slice. The comparison is ``|change(generated) - change(truth)|``.
    """
    clip = np.asarray(clip, dtype=np.float64)
    if clip.ndim != 3 or clip.shape[0] < 2:
        raise ValueError(f"needs a (T, Y, X) clip of at least 2 frames, got shape {clip.shape}")
    return float(np.abs(np.roll(clip, -1, axis=0) - clip).mean())


def xt_cuts(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The x–t (centre row over time) and y–t (centre column over time) images of a (T, Y, X) clip."""
    clip = np.asarray(clip)
    return clip[:, clip.shape[1] // 2, :], clip[:, :, clip.shape[2] // 2]
