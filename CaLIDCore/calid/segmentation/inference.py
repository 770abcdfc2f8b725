"""Segment every slice of every frame of a CineStack; labels come back on the input's grid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from calid.data.preprocess import resample_in_plane
from calid.data.stack import CineStack
from calid.errors import Cancelled, InputError
from calid.segmentation.model import SegmentationConfig, SegmentationModel


def keep_largest_components(labels: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """Clean-up of a (Z, Y, X) label volume of one frame.

    First the heart as a whole (all labels together) keeps only its largest 3D
    component, which drops detached false positives in other organs; then every
    structure keeps its largest 2D component in each slice. (A 3D component per
    structure would wrongly drop basal RV pieces that do not touch the next
    slice of a 10 mm stack.)
    """
    out = labels.copy()
    heart, count = ndimage.label(out > 0)
    if count > 1:
        sizes = ndimage.sum_labels(np.ones_like(heart), heart, index=np.arange(1, count + 1))
        out[(heart > 0) & (heart != 1 + int(np.argmax(sizes)))] = 0
    for z in range(out.shape[0]):
        for value in values:
            components, count = ndimage.label(out[z] == value)
            if count > 1:
                sizes = ndimage.sum_labels(np.ones_like(components), components, index=np.arange(1, count + 1))
                out[z][(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


def intensity_window(stack: CineStack, config: SegmentationConfig) -> tuple[float, float]:
    """The intensities mapped to -1 and +1 (robust percentiles of the whole stack)."""
    low, high = (float(v) for v in np.percentile(stack.data, config.percentiles))
    if not high > low:
        raise InputError(stack.source, "the image has (almost) constant intensity; it cannot be segmented")
    return low, high


def model_grid_shape(stack: CineStack, config: SegmentationConfig) -> tuple[int, int]:
    """(rows, columns) of the stack's field of view at the model's pixel size."""
    sx, sy = stack.in_plane_spacing
    return (max(1, int(round(stack.shape[2] * sy / config.spacing_mm))), max(1, int(round(stack.shape[3] * sx / config.spacing_mm))))


def to_model_grid(slices: np.ndarray, stack: CineStack, config: SegmentationConfig, low: float, high: float) -> np.ndarray:
    """(Z, Y, X) slices of ``stack`` -> normalised to [-1, 1] and resampled to the model's pixel size."""
    image = (np.asarray(slices, dtype=np.float32) - np.float32(low)) * np.float32(2.0 / (high - low)) - np.float32(1.0)
    spacing = (config.spacing_mm, config.spacing_mm)
    return np.clip(resample_in_plane(image, stack.in_plane_spacing, spacing, model_grid_shape(stack, config)), -1.0, 1.0)


def pad_like_training(batch: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """Slices (N, C, H, W) smaller than the network's patch, padded as its training padded them
    (``SpatialPadd(mode="edge")``, centred): the border values repeated, never a constant the
    network has not seen. Returns the padded batch and the (rows, columns) of the original.

    A short-axis cine's field of view (e.g. ACDC's 100 x 95 pixel crops, 150 mm) is often smaller
    than the patch (128 px, 192 mm). On heart-centred 80-112 pixel crops of the three held-out ACDC
    subjects (ED and ES), edge padding raised the mean Dice from 0.86-0.90 (constant -1) to
    0.90-0.92, the myocardium's by 0.03-0.05.
    """
    height, width = batch.shape[-2:]
    pad_y, pad_x = max(0, patch_size - height), max(0, patch_size - width)
    top, left = pad_y // 2, pad_x // 2
    if pad_y or pad_x:
        batch = torch.nn.functional.pad(batch, (left, pad_x - left, top, pad_y - top), mode="replicate")
    return batch, (slice(top, top + height), slice(left, left + width))


@torch.no_grad()
def segment(
    stack: CineStack,
    model: SegmentationModel,
    batch_size: int = 16,
    largest_component: bool = True,
    progress: Callable[[float, float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> CineStack:
    """A label stack (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity) on the input's grid.

    Slices are resampled to the model's pixel size, segmented with sliding
    windows (so any field of view works), and the class probabilities are
    resampled back before taking the most likely class.
    """
    config = model.config
    device = next(model.network.parameters()).device
    low, high = intensity_window(stack, config)
    sx, sy = stack.in_plane_spacing
    n_frames, n_slices = stack.n_frames, stack.n_slices
    labels = np.zeros(stack.shape, dtype=np.uint8)
    values = tuple(sorted(config.labels))
    total = float(n_frames * n_slices)
    for t in range(n_frames):
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled; nothing was written")
        image = to_model_grid(stack.data[t], stack, config, low, high)
        batch = torch.from_numpy(np.ascontiguousarray(image[:, None])).to(device)
        batch, window = pad_like_training(batch, config.patch_size)
        logits: Any = sliding_window_inference(
            batch, roi_size=(config.patch_size, config.patch_size), sw_batch_size=batch_size, predictor=model.network, overlap=0.25, mode="gaussian"
        )
        logits = logits[(..., *window)]
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()  # (Z, C, h, w)
        back = resample_in_plane(probabilities, (config.spacing_mm, config.spacing_mm), (sx, sy), stack.shape[2:])
        frame = np.argmax(back, axis=1).astype(np.uint8)
        labels[t] = keep_largest_components(frame, values) if largest_component else frame
        if progress is not None:
            progress(float((t + 1) * n_slices), total, f"segmenting frame {t + 1}/{n_frames}")
    out = stack.with_data(labels)
    out.metadata["source_dtype"] = "uint8"
    out.metadata["labels"] = {str(k): v for k, v in config.labels.items()}
    out.metadata["segmentation_model"] = model.path
    return out


def heart_centre_lps(stack: CineStack, model: SegmentationModel | None = None, frame: int = 0) -> np.ndarray:
    """Physical (LPS) centre of the heart, LV and RV, as the segmentation model finds it in one frame.

    What to centre the upsampling model's crop on in a full field-of-view scan: it was
    trained on windows centred on the left ventricle. ``model`` defaults to the
    installed default segmentation model.
    """
    from calid.data.preprocess import label_centre_lps

    if model is None:
        from calid.models.registry import resolve_model
        from calid.segmentation.model import load_segmenter

        model = load_segmenter(resolve_model(None, kind="segmentation"))
    if not 0 <= frame < stack.n_frames:
        raise InputError(stack.source, f"has no frame {frame} to find the heart in (frames 0-{stack.n_frames - 1})")
    labels = segment(stack.select_frames([frame]), model)
    if not np.any(labels.data):
        raise InputError(stack.source, f"the segmentation model found no heart in frame {frame}; give the centre with --centre-ras")
    return label_centre_lps(labels)
