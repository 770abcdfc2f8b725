"""Reslicing a CineStack on any plane, writing the views, and comparing with acquired long-axis images.

A reslice is itself a CineStack with one slice: its x axis is the plane's
``u``, its y axis ``v``, its slice axis the normal, centred on the plane's
centre, so it opens in Slicer / ITK-SNAP exactly where the plane is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from calid.evaluation.figures import save_figure
from calid.data.stack import CineStack
from calid.errors import InputError
from calid.geometry.planes import Plane


#: Outline colours of the label values (RV cavity, LV myocardium, LV cavity).
LABEL_COLOURS = {1: "#e66", 2: "#6c6", 3: "#69f"}


def stack_corners(stack: CineStack) -> np.ndarray:
    """The 8 LPS corner points of the stack's voxel-centre box."""
    t, z, y, x = stack.shape
    corners = np.array([[i, j, k] for i in (0, x - 1) for j in (0, y - 1) for k in (0, z - 1)], dtype=np.float64)
    return stack.index_to_physical(corners)


def plane_grid(stack: CineStack, plane: Plane, spacing_mm: float, size_mm: tuple[float, float] | None) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """Physical points (H, W, 3) of the reslice grid, its shape and its origin (first pixel)."""
    if not spacing_mm > 0:
        raise InputError("spacing", f"the reslice pixel size must be positive, got {spacing_mm}")
    if size_mm is None:
        offsets = stack_corners(stack) - plane.centre
        half_u = float(np.abs(offsets @ plane.u).max())
        half_v = float(np.abs(offsets @ plane.v).max())
        size_mm = (2 * half_v, 2 * half_u)
    rows, columns = (max(2, int(np.ceil(s / spacing_mm)) + 1) for s in size_mm)
    a = (np.arange(columns) - (columns - 1) / 2.0) * spacing_mm
    b = (np.arange(rows) - (rows - 1) / 2.0) * spacing_mm
    points = plane.centre + a[None, :, None] * plane.u + b[:, None, None] * plane.v
    return points, (rows, columns), points[0, 0]


def sample_at(stack: CineStack, points: np.ndarray, order: int = 1, frames: Sequence[int] | None = None, through_plane: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Values of every frame at LPS points ``(..., 3)`` and a mask of the points inside the stack.

    Linear (``order=1``) or nearest (``order=0``, for labels). ``through_plane="nearest"``
    keeps linear in-plane sampling but takes the nearest slice: a sparse stack then
    shows what was acquired (slabs), not an interpolation. Outside the stack: 0.
    """
    index = stack.physical_to_index(points)  # (..., 3) x, y, z
    if through_plane == "nearest":
        index = index.copy()
        index[..., 2] = np.rint(index[..., 2])
    elif through_plane != "linear":
        raise ValueError(f"through_plane must be 'linear' or 'nearest', got {through_plane!r}")
    coordinates = np.stack([index[..., 2], index[..., 1], index[..., 0]])  # z, y, x
    shape = stack.shape[1:]
    inside = np.all([(coordinates[i] >= -0.5) & (coordinates[i] <= shape[i] - 0.5) for i in range(3)], axis=0)
    # A point half a voxel beyond the outer slice centres still belongs to that slice.
    clamped = np.stack([np.clip(coordinates[i], 0, shape[i] - 1) for i in range(3)])
    chosen = range(stack.n_frames) if frames is None else frames
    values = np.stack([ndimage.map_coordinates(stack.data[t], clamped, order=order, mode="nearest") for t in chosen])
    return np.where(inside, values, 0.0).astype(np.float32), inside


#: Below this ratio of the image's median intensity under the labels' LV cavity to that under their
#: myocardium, labels probably belong to another scan. On 20 ACDC ED frames a subject's own labels
#: gave 1.45-3.62 and another subject's 0.31-2.98: the check catches about half of the mismatches
#: and no own labels (Testing/benchmarks/label_fit.py).
BLOOD_TO_MUSCLE_MINIMUM = 1.1


def label_fit(labels: CineStack, label_frame: int, image: CineStack, image_frame: int, max_points: int = 20000) -> tuple[float | None, float | None]:
    """How well a label frame lies on an image frame, on any two grids: the fraction of the labelled
    heart voxels inside the image (None: no heart labelled), and the image's median intensity under
    the LV cavity divided by that under the myocardium (None without both inside the image)."""
    from calid.segmentation.model import LV_CAVITY, LV_MYOCARDIUM, RV_CAVITY  # (PyTorch: not for every reslice)

    data = np.rint(labels.data[label_frame])
    medians: dict[int, float] = {}
    inside_counts, total = 0, 0
    for value in (LV_MYOCARDIUM, LV_CAVITY, RV_CAVITY):
        z, y, x = np.nonzero(data == value)
        stride = max(1, z.size // max_points)  # evenly thinned: enough for a median and a fraction
        points = labels.index_to_physical(np.stack([x[::stride], y[::stride], z[::stride]], axis=-1).astype(np.float64))
        values, inside = sample_at(image, points, order=0, frames=[image_frame])
        inside_counts, total = inside_counts + int(inside.sum()), total + inside.size
        if value != RV_CAVITY and inside.any():
            medians[value] = float(np.median(values[0][inside]))
    fraction = inside_counts / total if total else None
    muscle = medians.get(LV_MYOCARDIUM)
    ratio = medians[LV_CAVITY] / muscle if LV_CAVITY in medians and muscle is not None and muscle > 0 else None
    return fraction, ratio


def resample_onto(stack: CineStack, target: CineStack, order: int = 0) -> CineStack:
    """Every frame of ``stack`` sampled at the pixel centres of ``target`` (a one-slice reslice):
    labels on another grid than the image (a DICOM round trip, a dense image with sparse labels)
    outlined on its long-axis views. Nearest (``order=0``) for labels."""
    rows, columns = target.shape[2:]
    jj, ii = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    points = target.index_to_physical(np.stack([ii, jj, np.zeros_like(ii)], axis=-1).astype(np.float64))
    values, _ = sample_at(stack, points, order)
    return target.with_data(values[:, None], frame_times_ms=None)


def reslice(stack: CineStack, plane: Plane, spacing_mm: float = 1.0, size_mm: tuple[float, float] | None = None, order: int = 1, through_plane: str = "linear") -> CineStack:
    """The stack resampled on the plane, every frame: a (T, 1, H, W) CineStack with the plane's geometry.

    ``size_mm`` (rows, columns) defaults to the stack's extent seen in the plane.
    ``order`` 1 (linear) for images, 0 (nearest) for labels; ``through_plane``
    as in :func:`sample_at`.
    """
    points, _shape, origin = plane_grid(stack, plane, spacing_mm, size_mm)
    values, inside = sample_at(stack, points, order, through_plane=through_plane)
    direction = np.stack([plane.u, plane.v, plane.normal], axis=1)
    out = stack.with_data(values[:, None], spacing=(spacing_mm, spacing_mm, spacing_mm), origin=tuple(origin), direction=direction)
    out.metadata["plane"] = {"name": plane.name, "centre_lps": plane.centre.tolist(), "normal_lps": plane.normal.tolist(), "u_lps": plane.u.tolist()}
    out.metadata["covered_fraction"] = float(inside.mean())
    return out


def save_plane_png(
    views: Sequence[tuple[str, CineStack]],
    path: str | os.PathLike[str],
    frame: int | Sequence[int] = 0,
    title: str = "",
    labels: CineStack | None = None,
    scale_bar_mm: float = 20.0,
) -> Path:
    """A PNG of one or more reslices of the same plane side by side, with a scale bar and the plane name.

    Each view is shown in true proportions (its pixel size); ``labels`` (a
    reslice of a label stack on the same plane, with the first view's frames,
    or one frame: the one to outline) are outlined on every view. ``frame`` is one frame for all views or one per
    view (cines with other frame counts: see :func:`matching_frame`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    frames = [frame] * len(views) if isinstance(frame, (int, np.integer)) else list(frame)
    if len(frames) != len(views):
        raise ValueError(f"{len(frames)} frames given for {len(views)} views")
    images = [(name, view.data[k, 0]) for (name, view), k in zip(views, frames)]
    low = min(float(np.percentile(img, 1)) for _, img in images)
    high = max(float(np.percentile(img, 99.5)) for _, img in images)
    figure, axes = plt.subplots(1, len(images), figsize=(3.4 * len(images), 3.8), squeeze=False)
    for axis, (name, image), (_, view) in zip(axes[0], images, views):
        pixel = view.spacing[0]
        extent = (0, image.shape[1] * pixel, image.shape[0] * pixel, 0)
        axis.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1, extent=extent, interpolation="bilinear")
        if labels is not None:
            outline = np.rint(labels.data[0 if labels.n_frames == 1 else frames[0], 0])
            xs = (np.arange(outline.shape[1]) + 0.5) * labels.spacing[0]
            ys = (np.arange(outline.shape[0]) + 0.5) * labels.spacing[1]
            for value, colour in LABEL_COLOURS.items():
                if (outline == value).any():
                    axis.contour(xs, ys, (outline == value).astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8)
        x0, y0 = 0.06 * image.shape[1] * pixel, 0.94 * image.shape[0] * pixel
        axis.plot([x0, x0 + scale_bar_mm], [y0, y0], color="yellow", linewidth=3)
        axis.text(x0, y0 - 0.03 * image.shape[0] * pixel, f"{scale_bar_mm:g} mm", color="yellow", fontsize=8)
        axis.set_title(name, fontsize=9)
        axis.set_axis_off()
    plane_name = views[0][1].metadata.get("plane", {}).get("name", "")
    figure.suptitle(title or f"{plane_name} view, frame {frames[0]}", fontsize=10)
    return save_figure(figure, path)


def source_frames(stack: CineStack) -> list[int] | None:
    """The frame numbers of the acquired cine that ``stack``'s frames are, when it holds some frames
    only and recorded them (``--frames 0,11`` of calid upsample or segment, kept in calid's files), else None."""
    recorded = stack.recorded_frames()
    if recorded == list(range(stack.n_frames)) and stack.metadata.get("source_frame_count") in (None, stack.n_frames):
        return None  # every frame of its cine, in order: nothing was selected
    return recorded


def _cycle_fractions(stack: CineStack, other: CineStack) -> np.ndarray:
    """Where each frame lies in the cardiac cycle (0 to 1): its number in the cine it was selected
    from over that cine's frame count, or its own index over its count. A record without the count
    (older files) is taken as frames of ``other``, when that is a whole cine."""
    numbers = source_frames(stack)
    if numbers is None:
        return np.arange(stack.n_frames) / stack.n_frames
    count = stack.metadata.get("source_frame_count")
    if not isinstance(count, int) or count <= max(numbers):
        count = other.n_frames if source_frames(other) is None and other.n_frames > max(numbers) else max(numbers) + 1
    return np.asarray(numbers, dtype=np.float64) / count


def frame_matching(stack: CineStack, reference: CineStack) -> str:
    """How :func:`matching_frame` pairs the frames of two cines of the same heart beat."""
    if stack.n_frames == 1:
        return "single frame"
    if stack.frame_times_ms is not None and reference.frame_times_ms is not None:
        return "trigger time"
    if source_frames(stack) is not None or source_frames(reference) is not None:
        return "recorded frame numbers"
    return "index" if stack.n_frames == reference.n_frames else "fraction of the cycle"


def matching_frame(stack: CineStack, reference: CineStack, reference_frame: int) -> int:
    """The frame of ``stack`` at the cardiac phase of ``reference``'s frame ``reference_frame``.

    Long- and short-axis cines of one study are separate acquisitions: their frame
    counts and trigger times differ (e.g. 25 against 30 frames over the same cycle), so
    frame k of one is not frame k of the other. With trigger times on both, the nearest
    trigger time; without, the same fraction of the cycle (frame index / frame count),
    which is the index itself when the counts agree.
    """
    if not 0 <= reference_frame < reference.n_frames:
        raise InputError(reference.source, f"frame {reference_frame} does not exist (the cine has {reference.n_frames} frames)")
    how = frame_matching(stack, reference)
    if how == "single frame":
        return 0
    if how == "trigger time":
        assert stack.frame_times_ms is not None and reference.frame_times_ms is not None
        return int(np.argmin(np.abs(stack.frame_times_ms - reference.frame_times_ms[reference_frame])))
    if how == "recorded frame numbers":
        # A selection of frames (the dense output of --frames 0,11) against its cine, another selection of it,
        # or another cine of the same beat: compared as fractions of the cycle of the cine each came from.
        wanted = _cycle_fractions(reference, stack)[reference_frame]
        distance = np.abs(_cycle_fractions(stack, reference) - wanted)
        return int(np.argmin(np.minimum(distance, 1.0 - distance)))  # the cycle wraps round
    return int(round(reference_frame * stack.n_frames / reference.n_frames)) % stack.n_frames


def compare_with_acquired(dense: CineStack, acquired: CineStack) -> dict[str, Any]:
    """Resample ``dense`` onto an acquired long-axis image's exact plane and compare where the stack reaches.

    ``acquired`` is a single-slice CineStack (the LAX cine); each of its frames
    is compared with the stack's frame of the same cardiac phase
    (:func:`matching_frame`), or, when the stack has fewer frames, each of the
    stack's frames with the acquired frame of its phase. Returns PSNR (dB, peak = the acquired image's
    range), SSIM (on the bounding box of the covered region, both images scaled
    to [0, 1] by the acquired range) and NCC, per frame and as means.
    """
    if acquired.n_slices != 1:
        raise InputError(acquired.source, f"an acquired long-axis image has one slice, this one has {acquired.n_slices}")
    t, _, rows, columns = acquired.shape
    jj, ii = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    points = acquired.index_to_physical(np.stack([ii, jj, np.zeros_like(ii)], axis=-1).astype(np.float64))
    if dense.n_frames < t:
        # Fewer frames in the stack (e.g. only ED and ES upsampled): each is scored against the acquired
        # frame of its phase; the other acquired frames have no counterpart.
        pairs = sorted({(matching_frame(acquired, dense, k), k) for k in range(dense.n_frames)})
    else:
        pairs = [(frame, matching_frame(dense, acquired, frame)) for frame in range(t)]
    predicted, inside = sample_at(dense, points, 1, [k for _, k in pairs])
    if inside.sum() < 16:
        raise InputError(acquired.source, "the short-axis stack does not reach this long-axis plane (fewer than 16 pixels in common)")
    from monai.metrics import SSIMMetric
    import torch

    ys, xs = np.nonzero(inside)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    rows, columns = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
    if min(rows, columns) < 7:  # SSIM's 7-pixel window must fit
        raise InputError(
            acquired.source,
            f"the short-axis stack covers only a {rows} x {columns} pixel band of this long-axis plane: too thin to compare (SSIM needs 7 x 7)",
        )
    per_frame = []
    for index, (frame, dense_frame) in enumerate(pairs):
        truth = acquired.data[frame, 0]
        low, high = float(truth.min()), float(truth.max())
        scale = max(high - low, 1e-6)
        a, b = (truth - low) / scale, (predicted[index] - low) / scale
        mse = float(np.mean((a[inside] - b[inside]) ** 2))
        psnr = 10.0 * np.log10(1.0 / max(mse, 1e-12))
        x, y = a[inside] - a[inside].mean(), b[inside] - b[inside].mean()
        ncc = float((x * y).sum() / max(np.sqrt((x**2).sum() * (y**2).sum()), 1e-12))
        box_a, box_b = np.where(inside[box], a[box], 0.0), np.where(inside[box], b[box], 0.0)
        ssim_value: Any = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7)(torch.from_numpy(box_b[None, None].copy()).float(), torch.from_numpy(box_a[None, None].copy()).float())
        ssim = float(torch.as_tensor(ssim_value).mean())
        per_frame.append({"frame": frame, "stack_frame": dense_frame, "psnr_db": psnr, "ssim": ssim, "ncc": ncc})
    return {
        "covered_pixels": int(inside.sum()),
        "frames_matched_by": frame_matching(acquired, dense) if dense.n_frames < t else frame_matching(dense, acquired),  # as paired above
        "psnr_db": float(np.mean([f["psnr_db"] for f in per_frame])),
        "ssim": float(np.mean([f["ssim"] for f in per_frame])),
        "ncc": float(np.mean([f["ncc"] for f in per_frame])),
        "frames": per_frame,
    }
