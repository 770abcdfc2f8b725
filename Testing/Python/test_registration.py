"""Registration-based interpolation (no model): the morph itself, the engine mode, the command line
and its quality on real held-out ACDC cines."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage

from calid.cli import main as cli_main
from calid.data.io import read_stack, write_stack
from calid.data.stack import CineStack
from calid.errors import Cancelled, InputError
from calid.evaluation.harness import every_other_slice_predicted
from calid.evaluation.metrics import psnr, ssim
from calid.inference import load_pipeline, upsample_linear
from calid.inference import registration
from calid.inference.registration import RegistrationSettings, midpoints, morph, upsample_registration

from conftest import oblique_stack, shared_file

PIXEL_MM = 1.5


def disk(centre_yx: tuple[float, float], radius_mm: float, size: int = 64) -> np.ndarray:
    """A bright, slightly blurred disk on a dark background (mm coordinates, 1.5 mm pixels)."""
    yy, xx = np.mgrid[0:size, 0:size] * PIXEL_MM
    inside = (yy - centre_yx[0]) ** 2 + (xx - centre_yx[1]) ** 2 <= radius_mm**2
    return ndimage.gaussian_filter(inside.astype(np.float32) * 100.0, 1.0)


def centroid_mm(image: np.ndarray) -> np.ndarray:
    weights = np.clip(image, 0, None)
    return np.asarray(ndimage.center_of_mass(weights)) * PIXEL_MM


def area_mm2(image: np.ndarray) -> float:
    return float((image > 50.0).sum()) * PIXEL_MM**2


def test_a_moving_structure_moves_instead_of_fading():
    """A disk 9 mm further right in the next slice is found, sharp, t of the way along."""
    first, second = disk((48, 36), 12), disk((48, 45), 12)
    quarter, middle = morph(first, second, [0.25, 0.5], (PIXEL_MM, PIXEL_MM))
    for t, image in ((0.25, quarter), (0.5, middle)):
        truth = disk((48, 36 + 9 * t), 12)
        np.testing.assert_allclose(centroid_mm(image), [48, 36 + 9 * t], atol=0.6)
        linear = (1 - t) * first + t * second
        # Linear interpolation shows two half-bright disks; the morph one disk, close to the truth.
        assert psnr(image[None] / 100, truth[None] / 100)[0] > psnr(linear[None] / 100, truth[None] / 100)[0] + 6
        assert abs(area_mm2(image) - area_mm2(truth)) < 0.1 * area_mm2(truth)


def test_a_shrinking_structure_takes_the_intermediate_size():
    """Towards the apex the ventricle shrinks: the middle slice has the middle radius."""
    first, second = disk((48, 48), 18), disk((48, 48), 10)
    (middle,) = morph(first, second, [0.5], (PIXEL_MM, PIXEL_MM))
    assert area_mm2(middle) == pytest.approx(np.pi * 14**2, rel=0.12)
    # Linear interpolation gives a half-bright ring between the two outlines instead of one edge.
    truth = disk((48, 48), 14)
    assert psnr(middle[None] / 100, truth[None] / 100)[0] > psnr(0.5 * (first + second)[None] / 100, truth[None] / 100)[0] + 3


def test_the_result_does_not_depend_on_which_neighbour_comes_first():
    rng = np.random.default_rng(0)
    first = disk((40, 44), 14) + rng.normal(0, 2, (64, 64)).astype(np.float32)
    second = disk((50, 40), 11) + rng.normal(0, 2, (64, 64)).astype(np.float32)
    forward = morph(first, second, [0.25, 0.5], (PIXEL_MM, PIXEL_MM))
    backward = morph(second, first, [0.75, 0.5], (PIXEL_MM, PIXEL_MM))
    np.testing.assert_allclose(forward[0], backward[0], atol=1e-3)
    np.testing.assert_allclose(forward[1], backward[1], atol=1e-3)


def test_identical_neighbours_give_the_same_slice_and_bad_arguments_are_refused():
    image = disk((48, 48), 15)
    np.testing.assert_allclose(morph(image, image, [0.5], (PIXEL_MM, PIXEL_MM))[0], image, atol=1e-3)
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        morph(image, image, [1.0])
    with pytest.raises(InputError, match="same shape"):
        morph(image, image[:10], [0.5])
    with pytest.raises(InputError, match="at least 1"):
        RegistrationSettings(iterations=0)
    with pytest.raises(InputError, match="same shape"):
        midpoints(image[None], image[None, :10], 1.8)


@pytest.mark.parametrize("frames", [1, 3])
def test_engine_geometry_bit_exact_slices_and_one_registration_for_every_factor(frames):
    stack = oblique_stack(frames=frames, slices=4, rows=40, columns=36)
    before = stack.data.copy()
    pipeline = load_pipeline("registration")
    x2 = pipeline.upsample(stack, 2)
    x4 = pipeline.upsample(stack, 4)
    assert x4.metadata["upsampling"]["mode"] == "registration" and x4.shape == (frames, 13, 40, 36)
    linear = upsample_linear(stack, 4)
    for field in ("spacing", "origin"):
        np.testing.assert_allclose(getattr(x4, field), getattr(linear, field), atol=1e-12)
    np.testing.assert_allclose(x4.direction, stack.direction, atol=1e-12)
    np.testing.assert_allclose(x4.frame_times_ms, stack.frame_times_ms)
    assert np.array_equal(x4.data[:, ::4], stack.data) and np.array_equal(stack.data, before)
    # The x4 middle slices are the x2 ones: each gap is registered once, for every fraction.
    np.testing.assert_array_equal(x4.data[:, 2::4], x2.data[:, 1::2])
    # Blends of the neighbours, moved: never outside their range.
    assert x4.data.min() >= stack.data.min() and x4.data.max() <= stack.data.max()
    # The gaps run in parallel; the result does not depend on how many at once.
    one_at_a_time = upsample_registration(stack, 4, workers=1)
    np.testing.assert_array_equal(upsample_registration(stack, 4, workers=3).data, one_at_a_time.data)
    np.testing.assert_array_equal(one_at_a_time.data, x4.data)


def test_engine_progress_cancel_and_temporal_refusal(monkeypatch):
    stack = oblique_stack(frames=3, slices=4, rows=24, columns=24)
    pipeline = load_pipeline("linear")  # a model-less pipeline runs every model-less mode
    seen: list[tuple[float, float, str]] = []
    pipeline.upsample(stack, 4, mode="registration", progress=lambda done, total, message: seen.append((done, total, message)))
    # One report per gap of 3 new slices each (9 gaps), then the final one.
    assert [done for done, _, _ in seen[:-1]] == [3.0 * k for k in range(1, 10)] and seen[-1][:2] == (27.0, 27.0)
    assert {total for _, total, _ in seen} == {27.0} and "9 of 9 gaps done" in seen[-2][2]
    # The count rises in order; the gap named is the latest to finish (threads finish in any order).
    assert [int(message.split()[1]) for _, _, message in seen[:-1]] == list(range(1, 10))
    # A selection of frames: the messages name each frame by its number in the whole cine.
    seen.clear()
    pipeline.upsample(stack, 2, mode="registration", frames=[2], progress=lambda done, total, message: seen.append((done, total, message)))
    assert all("(latest: frame 2, between slices" in message for _, _, message in seen[:-1]) and len(seen) == 4
    registered = []
    real_morph = registration.morph

    def counted_morph(*args, **kwargs):
        registered.append(1)
        return real_morph(*args, **kwargs)

    monkeypatch.setattr(registration, "morph", counted_morph)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        pipeline.upsample(stack, 4, mode="registration", cancel=cancel)
    # Stopped after the second gap: the gaps not yet started never run (at most one per worker was under way).
    assert len(calls) == 3 and len(registered) <= 2 + registration._cores() < 9
    with pytest.raises(InputError, match="interpolates each frame on its own"):
        pipeline.upsample(stack, 2, mode="registration", temporal=True)


def test_anisotropic_pixels_on_both_sides_of_the_working_grid():
    """Pixels finer than the 1.8 mm working grid along one axis only: the structure still lands halfway, in mm."""
    for spacing_yx in ((1.0, 2.0), (2.0, 1.2), (1.5, 1.8)):
        yy, xx = np.mgrid[0:60, 0:70] * np.asarray(spacing_yx)[:, None, None]
        first, second = (ndimage.gaussian_filter((((yy - 40) ** 2 + (xx - x0) ** 2) < 15**2).astype(np.float32) * 100, 0.7) for x0 in (50, 58))
        (middle,) = morph(first, second, [0.5], spacing_yx)
        weights = np.clip(middle, 0, None)
        centre = [float((grid * weights).sum() / weights.sum()) for grid in (yy, xx)]
        np.testing.assert_allclose(centre, [40, 54], atol=0.5)
    data = np.stack([disk((30, 30), 10)] * 3)[None]
    assert load_pipeline("registration").upsample(CineStack(data=data, spacing=(1.9, 1.5, 10.0)), 2).n_slices == 5


def test_a_stack_without_geometry_is_registered_at_the_assumed_pixel_size():
    """The smoothing is in mm: a file saved with 1 mm placeholders is registered at the size given, and warned about."""
    data = np.stack([disk((48, 30 + 6 * k), 12) for k in range(3)])[None]
    stack = CineStack(data=data, spacing=(1.0, 1.0, 1.0))
    assumed = load_pipeline("registration").upsample(stack, 2, assumed_pixel_mm=PIXEL_MM)
    stored = load_pipeline("registration").upsample(stack, 2)
    # Exactly the result for the same pixels stored at 1.5 mm, with the stored 1 mm geometry kept.
    at_true_size = load_pipeline("registration").upsample(CineStack(data=data, spacing=(PIXEL_MM, PIXEL_MM, 1.0)), 2)
    np.testing.assert_array_equal(assumed.data, at_true_size.data)
    assert assumed.spacing == (1.0, 1.0, 0.5) and assumed.metadata["upsampling"]["assumed_pixel_mm"] == PIXEL_MM
    assert "taken as 1.5 mm" in assumed.metadata["upsampling"]["warning"]
    assert "assumed_pixel_mm" not in stored.metadata["upsampling"] and "the registration was given 1 mm pixels" in stored.metadata["upsampling"]["warning"]
    assert not np.array_equal(assumed.data, stored.data)
    assert "warning" not in at_true_size.metadata["upsampling"]


def test_cli_upsample_and_demo_in_registration_mode_with_no_model_installed(tmp_path, capsys):
    stack = oblique_stack(frames=2, slices=4, rows=32, columns=32)
    source = write_stack(stack, tmp_path / "cine.nii.gz")
    assert cli_main(["upsample", str(source), str(tmp_path / "dense.nii.gz"), "--mode", "registration", "--factor", "4", "--quiet", "--centre-ras", "0,0,0"]) == 0
    printed = capsys.readouterr()
    assert "mode registration" in printed.out and "steps" not in printed.out and "no effect on mode registration" in printed.err
    dense = read_stack(tmp_path / "dense.nii.gz")
    assert dense.n_slices == 13 and dense.metadata["upsampling"]["mode"] == "registration"
    np.testing.assert_allclose(dense.data[:, ::4], read_stack(source).data, atol=1e-4)
    # Without a trained model installed, the demo uses registration (with one, CaLID).
    from calid.models.registry import default_model

    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--factor", "2", "--phantom-frames", "2", "--frames", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "UNTRAINED" not in printed
    if default_model() is None:
        assert "registration-based interpolation" in printed
        assert (out / "phantom_registration_x2.nii.gz").is_file() and (out / "phantom_linear_x2.nii.gz").is_file()
        # A model mode with no model is refused with the way out, not run on random weights.
        assert cli_main(["demo", "--out", str(tmp_path / "demo2"), "--mode", "calid", "--factor", "2", "--phantom-frames", "2", "--quiet"]) == 2
        assert "--mode registration" in capsys.readouterr().err
    else:
        assert (out / "phantom_calid_x2.nii.gz").is_file()
    # A model given with a model-free mode loads no network, and nothing is called untrained.
    assert cli_main(["demo", "--out", str(tmp_path / "demo3"), "--mode", "registration", "--model", "untrained:tiny", "--factor", "2",
                     "--phantom-frames", "2", "--frames", "0", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "UNTRAINED" not in printed.out and "--model is not used" in printed.err


@pytest.mark.parametrize("subject", ["patient061", "patient067"])
def test_registration_beats_linear_interpolation_on_held_out_acdc_cines(subject):
    """Each interior slice of the ED frame rebuilt from its neighbours (10 mm away), scored on the whole image."""
    stack = read_stack(shared_file("acdc_cine", f"{subject}_4d.nii.gz")).select_frames([0])
    low, high = np.percentile(stack.data, (0.5, 99.5))

    def unit(images: np.ndarray) -> np.ndarray:
        return np.clip((images - low) / (high - low), 0, 1)

    interior = list(range(1, stack.n_slices - 1))
    truth = unit(stack.data[0, interior])
    predicted = every_other_slice_predicted(load_pipeline("registration"), stack, "registration", None, 0, 1)
    registered = unit(np.stack([predicted[n][0] for n in interior]))
    linear = unit(0.5 * (stack.data[0, [n - 1 for n in interior]] + stack.data[0, [n + 1 for n in interior]]))
    assert psnr(registered, truth).mean() > psnr(linear, truth).mean() + 0.5
    assert ssim(registered, truth).mean() > ssim(linear, truth).mean() + 0.04


def test_registration_threads_follow_the_cpu_thread_limit():
    """--threads (torch.set_num_threads) also limits the registration's threads: on a shared machine
    one thread per core would stall as the networks' threads would."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert registration._cores() == 1
        torch.set_num_threads(64)
        assert 1 <= registration._cores() <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
