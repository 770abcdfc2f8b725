"""The shipped CaLID model: found by default, checked, and better than the baselines on subjects it never saw."""

from __future__ import annotations

import numpy as np
import pytest

import calid
from calid.data.io import read_stack
from calid.data.preprocess import preprocess
from calid.evaluation.metrics import psnr, ssim
from calid.models.registry import default_model, verify

from conftest import shared_file


@pytest.fixture(scope="module")
def shipped():
    entry = default_model("calid")
    if entry is None:
        pytest.skip("no CaLID model is installed in Resources/Models")
    verify(entry)
    return entry, calid.load_pipeline(device="cpu")


def test_shipped_model_is_the_default_and_describes_itself(shipped):
    entry, pipeline = shipped
    assert pipeline.name == entry.name and pipeline.sha256 == entry.sha256 and not pipeline.untrained
    assert entry.card is not None and entry.card.is_file() and entry.path.stat().st_size < 40e6
    info = pipeline.model.info["info"]
    assert info["stored_as"] == "float16" and "CC BY-NC-SA" in info["licence"]
    held_out, trained = info["training_data"]["validation_subjects"], info["training_data"]["train_subjects"]
    assert held_out and set(held_out).isdisjoint(trained)
    assert 1 <= pipeline.default_steps <= 8


def test_shipped_model_beats_both_baselines_on_held_out_subjects(shipped):
    """Every interior slice of the ED and a mid-systolic frame of three held-out cines, from its two
    neighbours (10 mm apart), at the model's default steps: CaLID and CaLID+ above pixel-linear and
    latent-linear interpolation in PSNR and SSIM (the full numbers are in the model card's report)."""
    _, pipeline = shipped
    held_out = [s for s in pipeline.model.info["info"]["training_data"]["validation_subjects"] if s >= "patient061"][:3]
    previous, following, truth = [], [], []
    for subject in held_out:
        stack = read_stack(shared_file("acdc_cine", f"{subject}_4d.nii.gz"))
        cropped, _ = preprocess(stack, pipeline.config.preprocess)
        for frame in (0, stack.n_frames // 3):
            for n in range(1, stack.n_slices - 1):
                previous.append(cropped.data[frame, n - 1])
                following.append(cropped.data[frame, n + 1])
                truth.append(cropped.data[frame, n])
    previous_a, following_a, truth_a = (np.asarray(a, np.float32) for a in (previous, following, truth))

    def scores(mode: str) -> tuple[float, float]:
        predicted = pipeline.interpolate_slices(previous_a, following_a, mode, batch_size=16)
        unit = lambda a: (a + 1.0) / 2.0  # noqa: E731 - crops are in [-1, 1]
        return float(np.mean(psnr(unit(predicted), unit(truth_a)))), float(np.mean(ssim(unit(predicted), unit(truth_a))))

    linear, latent_linear = scores("linear"), scores("latent-linear")
    for mode in ("calid", "calid+"):
        model_psnr, model_ssim = scores(mode)
        assert model_psnr > max(linear[0], latent_linear[0]) + 0.3, (mode, model_psnr, linear, latent_linear)
        assert model_ssim > max(linear[1], latent_linear[1]), (mode, model_ssim, linear, latent_linear)
