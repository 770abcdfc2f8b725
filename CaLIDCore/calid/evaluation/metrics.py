"""Image and segmentation metrics of the evaluation (the paper's Tables I and II).

Image metrics compare slices on the normalised [0, 1] scale (the same for
every method): PSNR, SSIM (MONAI, 11 x 11 Gaussian window), LPIPS-alex, and
the Fréchet distance between two sets of AlexNet conv5 features (named as
such: it is not Inception FID). Segmentation metrics are per structure, in
millimetres with the image's (possibly anisotropic) pixel spacing: Dice,
Hausdorff distance (95th percentile), average surface distance (ASD, from the
prediction to the truth) and its symmetric version (ASSD), from MONAI.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import SSIMMetric, compute_average_surface_distance, compute_hausdorff_distance
from monai.metrics.fid import get_fid_score

#: PSNR of identical images is infinite; it is reported as this cap (dB) so that means stay finite.
PSNR_CAP_DB = 100.0


def psnr(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """PSNR (dB) per image of (N, H, W) or (N, 1, H, W) batches, capped at :data:`PSNR_CAP_DB`."""
    a, b = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (prediction, truth))
    mse = (a - b).pow(2).reshape(a.shape[0], -1).mean(dim=1)
    values = 10.0 * torch.log10(data_range**2 / mse.clamp(min=1e-30))
    return values.clamp(max=PSNR_CAP_DB).numpy()


def ssim(prediction: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """SSIM per image (MONAI, Gaussian 11 x 11 window, sigma 1.5)."""
    a, b = (_as_batch(v) for v in (prediction, truth))
    return np.asarray(SSIMMetric(spatial_dims=2, data_range=data_range)(a, b)).reshape(-1)


def _as_batch(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    return tensor[:, None] if tensor.dim() == 3 else tensor


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between two feature sets (N, D) modelled as Gaussians."""
    a, b = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (features_a, features_b))
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    with warnings.catch_warnings():
        # With fewer samples than feature dimensions the covariances are singular by construction, and
        # SciPy's matrix square root warns so without saying where; `calid evaluate` notes that case in its report.
        warnings.filterwarnings("ignore", message=".*singular.*")
        return float(get_fid_score(a, b))


def _one_hot(labels: np.ndarray, value: int) -> torch.Tensor:
    return torch.as_tensor(np.rint(labels) == value)[None, None].float()


def segmentation_scores(prediction: np.ndarray, truth: np.ndarray, spacing_yx: Sequence[float], values: Sequence[int] = (1, 2, 3)) -> dict[int, dict[str, float]]:
    """Dice, HD95, ASD and ASSD (mm) per label value of one 2D label image (Y, X).

    Distances are NaN when the structure is missing from either image (Dice then is
    0 when only one image has it, NaN when neither does).
    """
    out: dict[int, dict[str, float]] = {}
    for value in values:
        p, t = _one_hot(prediction, value), _one_hot(truth, value)
        total = float(p.sum() + t.sum())
        dice = float(2.0 * (p * t).sum() / total) if total else float("nan")
        if p.sum() == 0 or t.sum() == 0:
            out[value] = {"dice": dice, "hd95_mm": float("nan"), "asd_mm": float("nan"), "assd_mm": float("nan")}
            continue
        spacing = [float(s) for s in spacing_yx]
        out[value] = {
            "dice": dice,
            "hd95_mm": float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)),
            "asd_mm": float(compute_average_surface_distance(p, t, include_background=True, symmetric=False, spacing=spacing)),
            "assd_mm": float(compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=spacing)),
        }
    return out
