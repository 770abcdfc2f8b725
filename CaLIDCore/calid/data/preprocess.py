"""In-plane preprocessing for the networks, with its inverse.

Forward (:func:`preprocess`): resample every slice to a target in-plane
spacing, normalise intensities robustly to [-1, 1] (percentiles of the whole
cine), then crop or pad to a fixed size around a centre (image centre, a
physical point, or the centroid of a label). The slice axis and the frames
are untouched, so a preprocessed stack can be upsampled and then mapped back.

Inverse (:func:`undo_preprocess`): paste into the resampled field of view,
undo the intensity mapping (clipped to the input's range), resample back to
the input's in-plane grid. :class:`PreprocessParams` holds everything the
inverse needs and serialises to JSON (checkpoints store it).

Resampling keeps the outer edges of the field of view: with input spacing s
and output spacing s', output pixel i samples input coordinate
(i + 0.5) * s'/s - 0.5, and the origin moves by (s' - s)/2 along each axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from calid.data.stack import CineStack
from calid.errors import InputError


@dataclass(frozen=True)
class PreprocessConfig:
    """How slices are prepared for the networks.

    Args:
        target_spacing_mm: in-plane pixel size after resampling; None keeps the input's.
        crop_size: ``(rows, columns)`` of the network input; None keeps the whole field of view.
        percentiles: input intensities at these percentiles map to -1 and +1.
        clip: clip normalised intensities to [-1, 1].
    """

    target_spacing_mm: float | None = 1.8
    crop_size: tuple[int, int] | None = (128, 128)
    percentiles: tuple[float, float] = (0.5, 99.5)
    clip: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessConfig:
        crop = values.get("crop_size")
        return cls(
            target_spacing_mm=values.get("target_spacing_mm"),
            crop_size=None if crop is None else (int(crop[0]), int(crop[1])),
            percentiles=(float(values["percentiles"][0]), float(values["percentiles"][1])),
            clip=bool(values.get("clip", True)),
        )


@dataclass(frozen=True)
class PreprocessParams:
    """What :func:`preprocess` did to one stack, so that :func:`undo_preprocess` can undo it."""

    source_shape_yx: tuple[int, int]
    source_spacing_xy: tuple[float, float]
    resampled_shape_yx: tuple[int, int]
    resampled_spacing_xy: tuple[float, float]
    crop_start_yx: tuple[int, int]
    crop_size_yx: tuple[int, int]
    intensity_low: float
    intensity_high: float
    source_min: float
    source_max: float
    source_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessParams:
        pair = lambda key, kind: tuple(kind(v) for v in values[key])  # noqa: E731
        return cls(
            source_shape_yx=pair("source_shape_yx", int),
            source_spacing_xy=pair("source_spacing_xy", float),
            resampled_shape_yx=pair("resampled_shape_yx", int),
            resampled_spacing_xy=pair("resampled_spacing_xy", float),
            crop_start_yx=pair("crop_start_yx", int),
            crop_size_yx=pair("crop_size_yx", int),
            intensity_low=float(values["intensity_low"]),
            intensity_high=float(values["intensity_high"]),
            source_min=float(values["source_min"]),
            source_max=float(values["source_max"]),
            source_dtype=str(values["source_dtype"]),
        )

    def normalise(self, data: np.ndarray, clip: bool = True) -> np.ndarray:
        """Input intensities -> [-1, 1]."""
        scale = 2.0 / (self.intensity_high - self.intensity_low)
        out = (np.asarray(data, dtype=np.float32) - np.float32(self.intensity_low)) * np.float32(scale) - np.float32(1.0)
        return np.clip(out, -1.0, 1.0) if clip else out

    def denormalise(self, data: np.ndarray) -> np.ndarray:
        """[-1, 1] -> input intensities, clipped to the input's range."""
        half = (self.intensity_high - self.intensity_low) / 2.0
        out = (np.asarray(data, dtype=np.float32) + np.float32(1.0)) * np.float32(half) + np.float32(self.intensity_low)
        return np.clip(out, self.source_min, self.source_max).astype(np.float32)

    def crop_mask(self) -> np.ndarray:
        """Boolean (Y, X) mask of the input pixels that :func:`undo_preprocess` restores from
        the crop alone (the window, resampled back exactly as the data are, minus every
        pixel that interpolation or anti-aliasing mixed with the padding)."""
        window = np.zeros(self.resampled_shape_yx, dtype=np.float32)
        y0, x0 = self.crop_start_yx
        h, w = self.crop_size_yx
        window[max(0, y0) : max(0, y0 + h), max(0, x0) : max(0, x0 + w)] = 1.0
        back = resample_in_plane(window, self.resampled_spacing_xy, self.source_spacing_xy, self.source_shape_yx)
        return np.asarray(back >= 1.0 - 1e-6)


def resample_in_plane(data: np.ndarray, source_spacing_xy: tuple[float, float], target_spacing_xy: tuple[float, float], shape_yx: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resample the last two axes of ``(..., Y, X)`` data from one pixel size to another.

    Edge-aligned grids (see the module docstring); Gaussian anti-aliasing when
    the pixels grow by more than 10 %.
    """
    ratio_y = target_spacing_xy[1] / source_spacing_xy[1]
    ratio_x = target_spacing_xy[0] / source_spacing_xy[0]
    lead = data.shape[:-2]
    flat = np.asarray(data, dtype=np.float32).reshape((-1,) + data.shape[-2:])
    if order > 0 and (ratio_y > 1.1 or ratio_x > 1.1):
        sigma = (0.0, max(0.0, (ratio_y - 1.0) / 2.0), max(0.0, (ratio_x - 1.0) / 2.0))
        flat = ndimage.gaussian_filter(flat, sigma=sigma, mode="nearest")
    if np.isclose(ratio_y, 1.0) and np.isclose(ratio_x, 1.0) and flat.shape[-2:] == tuple(shape_yx):
        return flat.reshape(lead + tuple(shape_yx)).copy()
    out = ndimage.affine_transform(
        flat,
        matrix=np.array([1.0, ratio_y, ratio_x]),
        offset=np.array([0.0, 0.5 * ratio_y - 0.5, 0.5 * ratio_x - 0.5]),
        output_shape=(flat.shape[0],) + tuple(shape_yx),
        order=order,
        mode="nearest",
        prefilter=False,
    )
    return out.reshape(lead + tuple(shape_yx))


def _resampled_geometry(stack: CineStack, target_spacing_mm: float | None) -> tuple[tuple[float, float], tuple[int, int], np.ndarray]:
    sx, sy = stack.in_plane_spacing
    if target_spacing_mm is None:
        return (sx, sy), (stack.shape[2], stack.shape[3]), np.asarray(stack.origin)
    if not target_spacing_mm > 0:
        raise InputError(stack.source, f"target spacing must be positive, got {target_spacing_mm}")
    tx = ty = float(target_spacing_mm)
    shape = (max(1, int(round(stack.shape[2] * sy / ty))), max(1, int(round(stack.shape[3] * sx / tx))))
    origin = np.asarray(stack.origin) + stack.direction[:, 0] * (tx - sx) / 2.0 + stack.direction[:, 1] * (ty - sy) / 2.0
    return (tx, ty), shape, origin


def label_centre_lps(labels: CineStack, values: tuple[int, ...] | None = None) -> np.ndarray:
    """Physical (LPS) centroid of the labelled voxels (any nonzero label, or the given ones)."""
    mask = labels.data > 0.5 if values is None else np.isin(np.rint(labels.data), values)
    if not mask.any():
        raise InputError(labels.source, "the label image has no labelled voxels to centre the crop on")
    _, z, y, x = np.nonzero(mask)
    return labels.index_to_physical([x.mean(), y.mean(), z.mean()])


def preprocess(stack: CineStack, config: PreprocessConfig = PreprocessConfig(), centre_lps: np.ndarray | Sequence[float] | None = None) -> tuple[CineStack, PreprocessParams]:
    """Resample, normalise and crop every slice of every frame.

    Args:
        centre_lps: physical point to centre the crop on (e.g. from a label with
            :func:`label_centre_lps`, or a point the user placed); default: the
            centre of the field of view.

    Returns:
        The preprocessed stack (values in [-1, 1], geometry of the crop grid) and
        the parameters that :func:`undo_preprocess` needs.
    """
    low, high = (float(v) for v in np.percentile(stack.data, config.percentiles))
    if not high > low:
        raise InputError(stack.source, "the image has (almost) constant intensity; it cannot be normalised")
    spacing, shape, origin = _resampled_geometry(stack, config.target_spacing_mm)
    resampled = resample_in_plane(stack.data, stack.in_plane_spacing, spacing, shape)
    crop = config.crop_size if config.crop_size is not None else shape
    if centre_lps is None:
        centre_yx = ((shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0)
    else:
        offset = np.asarray(centre_lps, dtype=np.float64) - origin
        centre_yx = (float(offset @ stack.direction[:, 1]) / spacing[1], float(offset @ stack.direction[:, 0]) / spacing[0])
    start = (int(np.floor(centre_yx[0] - (crop[0] - 1) / 2.0 + 0.5)), int(np.floor(centre_yx[1] - (crop[1] - 1) / 2.0 + 0.5)))
    params = PreprocessParams(
        source_shape_yx=(stack.shape[2], stack.shape[3]),
        source_spacing_xy=stack.in_plane_spacing,
        resampled_shape_yx=shape,
        resampled_spacing_xy=spacing,
        crop_start_yx=start,
        crop_size_yx=(int(crop[0]), int(crop[1])),
        intensity_low=low,
        intensity_high=high,
        source_min=float(stack.data.min()),
        source_max=float(stack.data.max()),
        source_dtype=str(stack.metadata.get("source_dtype", "float32")),
    )
    normalised = params.normalise(resampled, clip=config.clip)
    cropped = _take_window(normalised, start, params.crop_size_yx, fill=-1.0)
    crop_origin = origin + stack.direction[:, 0] * start[1] * spacing[0] + stack.direction[:, 1] * start[0] * spacing[1]
    out = stack.with_data(
        cropped,
        spacing=(spacing[0], spacing[1], stack.slice_spacing),
        origin=tuple(crop_origin),
    )
    out.metadata["preprocess"] = params.to_dict()
    return out, params


def undo_preprocess(processed: CineStack, params: PreprocessParams) -> CineStack:
    """Map a preprocessed stack (any number of frames and slices) back to the input's in-plane grid.

    Outside the crop window the result holds the lowest normalised intensity
    mapped back (background); use :meth:`PreprocessParams.crop_mask` to blend
    with other data there.
    """
    if processed.shape[2:] != params.crop_size_yx:
        raise InputError(processed.source, f"in-plane size {processed.shape[2:]} does not match the crop size {params.crop_size_yx}")
    canvas_start = (-params.crop_start_yx[0], -params.crop_start_yx[1])
    canvas = _take_window(processed.data, canvas_start, params.resampled_shape_yx, fill=-1.0)
    intensities = params.denormalise(canvas)
    restored = resample_in_plane(intensities, params.resampled_spacing_xy, params.source_spacing_xy, params.source_shape_yx)
    restored = np.clip(restored, params.source_min, params.source_max)
    direction = processed.direction
    resampled_origin = (
        np.asarray(processed.origin)
        - direction[:, 0] * params.crop_start_yx[1] * params.resampled_spacing_xy[0]
        - direction[:, 1] * params.crop_start_yx[0] * params.resampled_spacing_xy[1]
    )
    sx, sy = params.source_spacing_xy
    tx, ty = params.resampled_spacing_xy
    origin = resampled_origin - direction[:, 0] * (tx - sx) / 2.0 - direction[:, 1] * (ty - sy) / 2.0
    out = processed.with_data(restored, spacing=(sx, sy, processed.slice_spacing), origin=tuple(origin))
    out.metadata.pop("preprocess", None)
    out.metadata["source_dtype"] = params.source_dtype
    return out


def _take_window(data: np.ndarray, start_yx: tuple[int, int], size_yx: tuple[int, int], fill: float) -> np.ndarray:
    """``data[..., y0:y0+h, x0:x0+w]`` where the window may reach outside: padded with ``fill``."""
    out = np.full(data.shape[:-2] + tuple(size_yx), fill, dtype=np.float32)
    y0, x0 = start_yx
    h, w = size_yx
    src_y = slice(max(0, y0), min(data.shape[-2], y0 + h))
    src_x = slice(max(0, x0), min(data.shape[-1], x0 + w))
    if src_y.start < src_y.stop and src_x.start < src_x.stop:
        dst_y = slice(src_y.start - y0, src_y.stop - y0)
        dst_x = slice(src_x.start - x0, src_x.stop - x0)
        out[..., dst_y, dst_x] = data[..., src_y, src_x]
    return out
