"""Pixel-space baselines of through-plane upsampling (also the fallback without a model)."""

from __future__ import annotations

import numpy as np

from calid.data.stack import CineStack
from calid.errors import InputError

VALID_FACTORS = (2, 4, 8, 16, 32)


def check_factor(factor: int, source: str = "factor") -> int:
    """Upsampling works by bisection: only powers of two are valid."""
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or int(factor) not in VALID_FACTORS:
        valid = ", ".join(str(f) for f in VALID_FACTORS)
        raise InputError(source, f"upsampling factor {factor!r} is not valid; bisection gives {valid}")
    return int(factor)


def upsample_linear(stack: CineStack, factor: int) -> CineStack:
    """Linear interpolation along the slice axis; the acquired slices are copied bit for bit.

    The output spans the same first and last slice centres with ``(Z - 1) * factor + 1``
    slices at spacing ``slice_spacing / factor``; origin and direction are unchanged.
    """
    factor = check_factor(factor, stack.source)
    if stack.n_slices < 2:
        raise InputError(stack.source, "needs at least 2 slices to interpolate between")
    t, z, y, x = stack.shape
    out = np.empty((t, (z - 1) * factor + 1, y, x), dtype=stack.data.dtype)
    out[:, ::factor] = stack.data
    lower, upper = stack.data[:, :-1], stack.data[:, 1:]
    for step in range(1, factor):
        weight = stack.data.dtype.type(step / factor)
        out[:, step::factor] = lower + weight * (upper - lower)
    return dense_stack(stack, out, factor, "linear")


def dense_stack(stack: CineStack, out: np.ndarray, factor: int, mode: str, **record: object) -> CineStack:
    """The upsampled stack around ``out`` (T, (Z - 1) * factor + 1, Y, X): the input's geometry with
    the slice spacing divided by ``factor``, and how it was made in ``metadata["upsampling"]``."""
    result = stack.with_data(out, spacing=(stack.spacing[0], stack.spacing[1], stack.slice_spacing / factor))
    result.metadata["upsampling"] = {
        "factor": factor,
        "mode": mode,
        "acquired_slice_indices": list(range(0, out.shape[1], factor)),
        "input_slice_spacing_mm": stack.slice_spacing,
        **record,
    }
    return result
