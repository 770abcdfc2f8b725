"""Evaluation metrics against values known from their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calid.evaluation.metrics import PSNR_CAP_DB, frechet_distance, psnr, segmentation_scores, ssim


def test_psnr_and_ssim_of_identical_and_noisy_images():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, size=(4, 64, 64))
    assert np.all(psnr(images, images) == PSNR_CAP_DB)
    np.testing.assert_allclose(ssim(images, images), 1.0, atol=1e-6)
    sigma = 0.05
    noisy = images + rng.normal(0, sigma, size=images.shape)
    np.testing.assert_allclose(psnr(noisy, images), 10 * np.log10(1 / sigma**2), atol=0.15)  # 26.02 dB
    # Independent noise on an i.i.d. image (variance 0.6^2 / 12): SSIM -> (2 v + C2) / (2 v + sigma^2 + C2), C2 = 0.03^2.
    v, c2 = 0.6**2 / 12, 0.03**2
    np.testing.assert_allclose(ssim(noisy, images), (2 * v + c2) / (2 * v + sigma**2 + c2), atol=0.01)
    much_noisier = images + rng.normal(0, 4 * sigma, images.shape)
    np.testing.assert_allclose(ssim(much_noisier, images), (2 * v + c2) / (2 * v + 16 * sigma**2 + c2), atol=0.02)


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, size=(4000, 3))
    b = rng.normal(0, 1, size=(4000, 3)) + np.array([2.0, 0, 0])
    # Same covariance: the distance is the squared distance of the means (4), up to sampling error.
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_frechet_distance_from_fewer_samples_than_features_is_finite_and_silent(recwarn):
    """An evaluation of a few slices (fewer than AlexNet's 256 features) has singular covariances:
    a finite distance, and no bare SciPy warning that does not say where it came from."""
    rng = np.random.default_rng(2)
    # Rectified features, some never active (as AlexNet's conv5 on a few slices): exactly singular.
    a, b = (np.maximum(rng.normal(size=(n, 256)), 0) * (rng.random(256) > 0.5) for n in (10, 12))
    distance = frechet_distance(a, b)
    assert np.isfinite(distance) and distance > 0
    assert not [w for w in recwarn if "singular" in str(w.message).lower()]


@pytest.mark.parametrize("axis, spacing_yx", [(1, (2.0, 0.5)), (0, (2.0, 0.5)), (1, (1.0, 1.0))])
def test_surface_distances_of_a_shifted_square_are_in_millimetres(axis, spacing_yx):
    truth = np.zeros((40, 40), dtype=np.uint8)
    truth[10:30, 10:30] = 3
    shifted = np.roll(truth, 3, axis=axis)  # 3 pixels along y (axis 0) or x (axis 1)
    scores = segmentation_scores(shifted, truth, spacing_yx, values=(3,))[3]
    step_mm = 3 * spacing_yx[axis]
    assert scores["dice"] == pytest.approx(2 * 17 * 20 / (2 * 400))
    assert scores["hd95_mm"] == pytest.approx(step_mm, rel=1e-6)  # the leading and trailing edges
    assert 0 < scores["asd_mm"] < step_mm and 0 < scores["assd_mm"] < step_mm
    same = segmentation_scores(truth, truth, spacing_yx, values=(3,))[3]
    assert same["dice"] == 1.0 and same["hd95_mm"] == 0.0 and same["assd_mm"] == 0.0
    missing = segmentation_scores(np.zeros_like(truth), truth, spacing_yx, values=(1, 3))
    assert missing[3]["dice"] == 0.0 and np.isnan(missing[3]["hd95_mm"]) and np.isnan(missing[1]["dice"])


def test_alexnet_features_for_the_frechet_distance():
    from conftest import shared_file

    from calid.evaluation.lpips import LPIPS

    model = LPIPS(shared_file("..", "weights", "lpips_alexnet_features.pth"))
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    features = model.pooled_features(x)
    assert features.shape == (3, 256) and torch.isfinite(features).all()
