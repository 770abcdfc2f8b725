"""Pixel-space baselines of through-plane upsampling (also the fallback without a model)."""

from __future__ import annotations

from typing import Any

import numpy as np

from calid.data.stack import CineStack, describe_upsampling, upsampling_steps
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
    result.metadata["upsampling"] = {**upsampling_record(stack, factor, mode), **record}
    return result


def upsampling_record(stack: CineStack, factor: int, mode: str) -> dict[str, Any]:
    """The start of the record of ``stack`` upsampled by ``factor``: which slices of the output are
    acquired and how far apart they were.

    ``stack`` may itself be an upsampled stack (a x2 output upsampled again): then the acquired
    slices and their spacing stay those of the first acquisition, so that Simpson's end slabs and
    the acquired-slice marks stay true, and ``earlier_upsampling`` lists the earlier steps."""
    n_dense = (stack.n_slices - 1) * factor + 1
    record: dict[str, Any] = {
        "factor": factor,
        "mode": mode,
        "acquired_slice_indices": list(range(0, n_dense, factor)),
        "input_slice_spacing_mm": stack.slice_spacing,
        "acquired_slice_spacing_mm": stack.slice_spacing,
    }
    earlier = stack.metadata.get("upsampling")
    if not upsampling_steps(earlier):
        return record
    assert isinstance(earlier, dict)
    record["acquired_slice_spacing_mm"] = stack.recorded_acquired_spacing() or stack.slice_spacing
    indices = earlier.get("acquired_slice_indices")
    if isinstance(indices, list) and indices and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < stack.n_slices for i in indices):
        record["acquired_slice_indices"] = [i * factor for i in indices]
    # Only each step's mode and factor: nothing else of a record read from a file travels on.
    record["earlier_upsampling"] = upsampling_steps(earlier)
    return record


def acquired_slices(stack: CineStack) -> CineStack:
    """The acquired slices of an upsampled stack (1 in every ``step``, as its record says), at
    their own spacing and without the record: what Simpson's method measures. A stack without
    such a record is returned as it is."""
    step = stack.acquired_slice_step()
    record = stack.metadata.get("upsampling")
    indices = record.get("acquired_slice_indices") if isinstance(record, dict) else None
    if step is None or step == 1 or indices != list(range(0, stack.n_slices, step)):
        return stack
    spacing = (stack.spacing[0], stack.spacing[1], stack.spacing[2] * step)
    sparse = stack.with_data(np.ascontiguousarray(stack.data[:, ::step]), spacing=spacing)
    frames = stack.recorded_frames()  # which frames of the cine: kept when the record goes
    sparse.metadata.pop("upsampling")
    if frames is not None:
        sparse.metadata["source_frames"] = frames
    return sparse


def chained_upsampling_warning(stack: CineStack, factor: int) -> str | None:
    """A warning when ``stack`` is itself an upsampled stack: its generated slices are taken as
    acquired neighbours, which one run over the acquired stack avoids."""
    earlier = stack.metadata.get("upsampling")
    if not upsampling_steps(earlier):
        return None
    step = stack.acquired_slice_step()
    total = step * factor if step is not None else None
    advice = f"; upsampling the acquired stack x{total} in one run keeps every new slice between acquired ones" if total in VALID_FACTORS else ""
    return f"the input was itself upsampled ({describe_upsampling(earlier)}): its generated slices are used as if acquired{advice}"
