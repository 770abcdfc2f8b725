"""The upsampling engine and the `calid upsample / demo / info` commands, with real `tiny` networks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import calid
from calid.cli import main as cli_main
from calid.data.io import read_stack, write_stack
from calid.data.phantom import PhantomConfig, make_phantom
from calid.data.preprocess import preprocess
from calid.data.stack import CineStack
from calid.errors import Cancelled, InputError
from calid.inference import load_pipeline, parse_frames, upsample_linear
from calid.inference.pipeline import turn_plane, untrained_model
from calid.models.checkpoint import save_model
from calid.models.registry import MODEL_DIR_ENV, sha256_of

from conftest import oblique_stack, reliable_acdc_subjects, shared_file


def run_calid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "calid", *args], capture_output=True, text=True, timeout=600, env=env)


def run_main(*args: str, capsys) -> tuple[int, str]:
    code = cli_main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    """A real model file of the tiny configuration (random weights, seeded)."""
    model = untrained_model("tiny", seed=7)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    return save_model(path, model.config, model.vae, model.net, latent_scale=1.3, info={"training_data": "none (test)"})


@pytest.fixture(scope="module")
def pipeline(tiny_model_file):
    return load_pipeline(tiny_model_file, device="cpu")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(5, PhantomConfig(n_frames=3, matrix=64, pixel_spacing_mm=3.0, n_slices=5))


# ---------------------------------------------------------------- geometry and bit-exactness
@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("mode", ["calid", "calid+", "latent-linear", "linear", "registration"])
def test_output_geometry_and_acquired_slices(pipeline, frames, mode):
    stack = oblique_stack(frames=frames, slices=4, rows=40, columns=36)
    before = stack.data.copy()
    dense = pipeline.upsample(stack, factor=4, mode=mode, steps=2)
    assert dense.shape == (frames, 13, 40, 36)
    assert dense.slice_spacing == pytest.approx(stack.slice_spacing / 4)
    assert dense.in_plane_spacing == stack.in_plane_spacing
    np.testing.assert_allclose(dense.origin, stack.origin, atol=1e-12)
    np.testing.assert_allclose(dense.direction, stack.direction, atol=1e-12)
    np.testing.assert_allclose(dense.frame_times_ms, stack.frame_times_ms)
    # Old slices sit where they were; new ones evenly between them, along the same normal.
    np.testing.assert_allclose(dense.slice_positions()[::4], stack.slice_positions(), atol=1e-9)
    np.testing.assert_allclose(np.diff(dense.slice_positions()), stack.slice_spacing / 4, atol=1e-9)
    corner = dense.index_to_physical([35, 39, 6])
    np.testing.assert_allclose(corner, stack.index_to_physical([35, 39, 1.5]), atol=1e-9)
    assert np.array_equal(dense.data[:, ::4], stack.data), "acquired slices must pass through bit for bit"
    assert np.array_equal(stack.data, before), "the input must not be modified"
    assert dense.data.min() >= stack.data.min() and dense.data.max() <= stack.data.max()
    info = dense.metadata["upsampling"]
    assert info["mode"] == mode and info["acquired_slice_indices"] == [0, 4, 8, 12]


@pytest.mark.parametrize("mode", ["calid", "registration", "linear"])
def test_upsampling_an_upsampled_stack_keeps_the_acquired_slices_and_warns(pipeline, mode):
    """x2 of a x2 output: the record keeps the first acquisition (its slices and their spacing) and
    says that generated slices served as neighbours; the acquired slices still pass through bit for bit."""
    stack = oblique_stack(frames=2, slices=3, rows=40, columns=36)
    once = pipeline.upsample(stack, factor=2, mode="registration")
    assert "warning" not in once.metadata["upsampling"]
    twice = pipeline.upsample(once, factor=2, mode=mode, steps=2)
    info = twice.metadata["upsampling"]
    assert info["acquired_slice_indices"] == [0, 4, 8] and np.array_equal(twice.data[:, ::4], stack.data)
    assert info["acquired_slice_spacing_mm"] == pytest.approx(stack.slice_spacing)
    assert info["input_slice_spacing_mm"] == pytest.approx(stack.slice_spacing / 2)
    assert info["earlier_upsampling"] == [{"mode": "registration", "factor": 2}]
    assert "was itself upsampled (registration x2)" in info["warning"] and "x4 in one run" in info["warning"]


@pytest.mark.parametrize("mode", ["calid", "linear"])
def test_a_label_map_upsampled_from_python_is_flagged_in_the_record(pipeline, mode):
    """Python callers (the Slicer module, scripts) get the warning the command line prints: the
    average of RV cavity 1 and LV cavity 3 is myocardium 2."""
    image = oblique_stack(frames=1, slices=3, rows=40, columns=36)
    labels = image.with_data(np.digitize(image.data, np.quantile(image.data, [0.4, 0.6, 0.8])).astype(np.float32))
    info = pipeline.upsample(labels, factor=2, mode=mode, steps=1).metadata["upsampling"]
    assert "holds only the values 0-3: is it a label map" in info["warning"]
    assert "warning" not in pipeline.upsample(image, factor=2, mode=mode, steps=1).metadata["upsampling"]


def test_factor_mode_steps_and_stack_validation(pipeline, phantom):
    for factor in (3, 6, 0, 1, 2.0):
        with pytest.raises(InputError, match="2, 4, 8, 16"):
            pipeline.upsample(phantom.sparse, factor=factor)
    with pytest.raises(InputError, match="unknown mode 'bilinear'"):
        pipeline.upsample(phantom.sparse, mode="bilinear")
    with pytest.raises(TypeError, match="stack must be a CineStack"):
        pipeline.upsample("cine.nii.gz", factor=2)  # a path: read_stack(path) first
    with pytest.raises(InputError, match="DDIM steps"):
        pipeline.upsample(phantom.sparse, steps=0)
    single = phantom.sparse.with_data(phantom.sparse.data[:, :1])
    with pytest.raises(InputError, match="at least 2 slices"):
        pipeline.upsample(single, factor=2)
    with pytest.raises(InputError, match="needs a model"):
        load_pipeline("linear").upsample(phantom.sparse, mode="calid")
    for bad in ("abc", 0, -2, 2.5, True, "1.5"):
        with pytest.raises(InputError, match="batch_size"):
            pipeline.upsample(phantom.sparse, factor=2, frames=[0], batch_size=bad)
    assert pipeline.upsample(phantom.sparse, factor=2, frames=[0], steps=1, batch_size="3").n_slices == 2 * phantom.sparse.n_slices - 1
    with pytest.raises(InputError, match="mode 'linear' interpolates each frame"):
        pipeline.upsample(phantom.sparse, mode="linear", temporal=True)
    crops = np.zeros((2, pipeline.config.image_size, pipeline.config.image_size), np.float32)
    for steps in (0, 1001, 2.0):
        with pytest.raises(InputError, match="DDIM steps"):
            pipeline.interpolate_slices(crops, crops, "calid", steps)
    with pytest.raises(InputError, match="batch_size"):
        pipeline.interpolate_slices(crops, crops, "calid", 1, batch_size="many")


def test_all_factors_nest(pipeline, phantom):
    """Bisection: the x2 result's slices reappear in the x4 result (same seed), every 2nd slice."""
    x2 = pipeline.upsample(phantom.sparse, 2, mode="latent-linear", frames=[0])
    x4 = pipeline.upsample(phantom.sparse, 4, mode="latent-linear", frames=[0])
    np.testing.assert_allclose(x4.data[:, ::2], x2.data, atol=1e-4)
    x16 = pipeline.upsample(phantom.sparse, 16, mode="latent-linear", frames=[0], steps=1)
    assert x16.n_slices == (phantom.sparse.n_slices - 1) * 16 + 1


# ---------------------------------------------------------------- determinism, batching, frames
def test_same_seed_same_result_other_seed_other_result(pipeline, phantom):
    first = pipeline.upsample(phantom.sparse, 2, mode="calid", steps=3, seed=11)
    again = pipeline.upsample(phantom.sparse, 2, mode="calid", steps=3, seed=11)
    other = pipeline.upsample(phantom.sparse, 2, mode="calid", steps=3, seed=12)
    assert np.array_equal(first.data, again.data)
    assert not np.allclose(first.data[:, 1::2], other.data[:, 1::2])


@pytest.mark.parametrize("mode", ["calid", "calid+"])
def test_result_does_not_depend_on_batch_size_or_frame_selection(pipeline, phantom, mode):
    whole = pipeline.upsample(phantom.sparse, 4, mode=mode, steps=2, seed=3, batch_size=64)
    one_by_one = pipeline.upsample(phantom.sparse, 4, mode=mode, steps=2, seed=3, batch_size=1)
    scale = float(phantom.sparse.data.max() - phantom.sparse.data.min())
    np.testing.assert_allclose(one_by_one.data, whole.data, atol=2e-3 * scale)
    last = pipeline.upsample(phantom.sparse, 4, mode=mode, steps=2, seed=3, frames="2")
    assert last.n_frames == 1 and last.metadata["upsampling"]["frames"] == [2]
    np.testing.assert_allclose(last.data[0], whole.data[2], atol=2e-3 * scale)
    np.testing.assert_allclose(last.frame_times_ms, phantom.sparse.frame_times_ms[[2]])


def test_frame_selection_text():
    assert parse_frames("0,5-7", 10) == [0, 5, 6, 7]
    assert parse_frames("all", 10) is None and parse_frames(None, 10) is None
    assert parse_frames("-1", 10) == [9] and parse_frames([3, 1, 3], 10) == [1, 3]
    for bad in ("x", "0,,1"):
        with pytest.raises(InputError, match="frame selection"):
            parse_frames(bad, 10)
    with pytest.raises(InputError, match="the range 5-2 runs backwards; write 2-5, or 5-9,0-2 for the frames across the end of the cycle"):
        parse_frames("5-2", 10)
    assert parse_frames("8-9,0-1", 10) == [0, 1, 8, 9]
    assert parse_frames("9,0,0", 10, as_given=True) == [9, 0, 0] and parse_frames("9,0,0", 10) == [0, 9]
    with pytest.raises(InputError, match="frame 10 does not exist.*10 frame"):
        parse_frames("10", 10)
    assert parse_frames(np.int64(-2), 10) == [8] and parse_frames(np.array([4, 0]), 10) == [0, 4]
    for odd in ([1.9], True, [0, True], 2.0, [0.5, 2.7], object()):  # never truncated to a frame
        with pytest.raises(InputError, match="whole numbers"):
            parse_frames(odd, 10)


def test_seeds_outside_the_noise_generator_range_are_refused(phantom):
    pipeline = load_pipeline("untrained:tiny", device="cpu")
    for seed in (-1, 2**32, True, 1.5):  # -1 and 2**32 would repeat the results of 2**32 - 1 and 0
        with pytest.raises(InputError, match="seed.*0 to 4294967295"):
            pipeline.upsample(phantom.sparse, 2, mode="calid", steps=1, seed=seed, frames=[0])
    largest = pipeline.upsample(phantom.sparse, 2, mode="calid", steps=1, seed=2**32 - 1, frames=[0])
    assert not np.array_equal(largest.data, pipeline.upsample(phantom.sparse, 2, mode="calid", steps=1, seed=0, frames=[0]).data)


# ---------------------------------------------------------------- crop, paste back, seam
def test_new_slices_are_generated_around_the_given_centre_and_linear_elsewhere(pipeline, phantom):
    stack = phantom.sparse
    centre_index = (20.0, 40.0, 2.0)  # x, y, z
    centre = stack.index_to_physical(centre_index)
    dense = pipeline.upsample(stack, 2, mode="calid", steps=2, centre_lps=centre)
    linear = upsample_linear(stack, 2)
    changed = np.abs(dense.data[:, 1::2] - linear.data[:, 1::2]).max(axis=(0, 1)) > 0  # (Y, X)
    ys, xs = np.nonzero(changed)
    assert abs(xs.mean() - centre_index[0]) < 1.5 and abs(ys.mean() - centre_index[1]) < 1.5
    # The crop is 32 px of 1.8 mm = 57.6 mm wide: about 19 pixels of 3 mm, never more.
    assert xs.max() - xs.min() + 1 <= 20 and ys.max() - ys.min() + 1 <= 20
    assert "linearly interpolated" in dense.metadata["upsampling"]["generated_region"]
    _, params = preprocess(stack, pipeline.config.preprocess, centre)
    outside = ~params.crop_mask()
    assert not changed[outside].any()
    assert "warning" not in dense.metadata["upsampling"] or "outside the image" not in dense.metadata["upsampling"]["warning"]
    far = stack.index_to_physical((500.0, 500.0, 2.0))  # a centre point far off the image
    missed = pipeline.upsample(stack, 2, mode="calid", steps=1, frames=[0], centre_lps=far)
    np.testing.assert_array_equal(missed.data, linear.data[[0]])
    assert "lies outside the image" in missed.metadata["upsampling"]["warning"]


# ---------------------------------------------------------------- test-time augmentation
@pytest.mark.parametrize("mode", ["calid", "calid+"])
def test_test_time_augmentation_is_exactly_equivariant_to_turns_and_mirrors(pipeline, phantom, mode):
    """Turning both neighbour images turns the averaged middle latent the same way; one network pass does not."""
    from calid.inference.pipeline import _Tracker

    cropped, _ = preprocess(phantom.sparse, pipeline.config.preprocess)
    previous, following = (torch.from_numpy(cropped.data[0, z : z + 2]) for z in (0, 2))
    with torch.no_grad():

        def generate(turns, flip, tta):
            tracker = _Tracker(total=2.0, progress=None, cancel=None)
            a, b = turn_plane(previous, turns, flip), turn_plane(following, turns, flip)
            condition = torch.stack([a, b], dim=1)
            z_prev, z_next = pipeline._encode(a[:, None]), pipeline._encode(b[:, None])
            return pipeline._generate(mode, condition, z_prev, z_next, 2, [(0, 0, 1), (0, 0, 3)], tracker, "", tta)[1]

        averaged, single = generate(0, False, True), generate(0, False, False)
        for turns, flip in [(1, False), (2, True)]:
            torch.testing.assert_close(generate(turns, flip, True), turn_plane(averaged, turns, flip), atol=1e-4, rtol=1e-4)
            assert (generate(turns, flip, False) - turn_plane(single, turns, flip)).abs().max() > 1e-3
    assert (averaged - single).abs().max() > 1e-3


def test_test_time_augmentation_through_the_engine(pipeline, phantom):
    calls: list[tuple[float, float, str]] = []
    dense = pipeline.upsample(phantom.sparse, 4, mode="calid", steps=2, tta=True, progress=lambda d, t, m: calls.append((d, t, m)))
    plain = pipeline.upsample(phantom.sparse, 4, mode="calid", steps=2)
    np.testing.assert_array_equal(dense.data[:, ::4], phantom.sparse.data)
    assert dense.metadata["upsampling"]["tta"] is True and plain.metadata["upsampling"]["tta"] is False
    assert np.abs(dense.data - plain.data).max() > 1e-3
    np.testing.assert_allclose(dense.origin, phantom.sparse.origin, atol=1e-12)
    np.testing.assert_allclose(dense.direction, phantom.sparse.direction, atol=1e-12)
    assert dense.slice_spacing == pytest.approx(phantom.sparse.slice_spacing / 4)
    # Progress counts each member's share: it reaches the total only at the end.
    total = phantom.sparse.n_frames * (phantom.sparse.n_slices - 1) * 3
    done = [d for d, _, _ in calls[:-1]]  # the last call is the final "done" message
    assert done == sorted(done) and done[-1] == pytest.approx(total)
    assert done[len(done) // 2] < 0.75 * total
    assert pipeline.upsample(phantom.sparse, 2, mode="latent-linear", tta=True).metadata["upsampling"]["tta"] is False


# ---------------------------------------------------------------- progress and cancel
def test_progress_is_monotonic_and_reaches_the_total(pipeline, phantom):
    calls: list[tuple[float, float, str]] = []
    pipeline.upsample(phantom.sparse, 4, mode="calid+", steps=2, progress=lambda d, t, m: calls.append((d, t, m)))
    total = phantom.sparse.n_frames * (phantom.sparse.n_slices - 1) * 3
    assert all(t == total for _, t, _ in calls)
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == total and len(calls) > 4
    assert "level 2/2" in " ".join(m for _, _, m in calls)


def test_cancel_stops_at_the_next_network_call(pipeline, phantom):
    calls: list[float] = []
    network_calls = 0

    def count(*_: object) -> None:
        nonlocal network_calls
        network_calls += 1

    hook = pipeline.model.net.register_forward_hook(count)
    try:
        with pytest.raises(Cancelled):
            pipeline.upsample(phantom.sparse, 8, mode="calid+", steps=8, progress=lambda d, t, m: calls.append(d), cancel=lambda: len(calls) >= 1)
        cancelled_calls = network_calls
        network_calls = 0
        pipeline.upsample(phantom.sparse, 8, mode="calid+", steps=8, frames=[0])
        whole_frame_calls = network_calls
    finally:
        hook.remove()
    assert len(calls) == 1
    # Stopped within one level's batch of the first progress report: a fraction of one frame's work.
    assert 0 < cancelled_calls < whole_frame_calls / 3


# ---------------------------------------------------------------- models by name, cards, errors
def test_models_by_name_with_checksum_and_default(tmp_path, tiny_model_file, monkeypatch, phantom):
    folder = tmp_path / "models"
    folder.mkdir()
    target = folder / "calid-test.safetensors"
    target.write_bytes(tiny_model_file.read_bytes())
    (folder / "calid-test.md").write_text("# calid-test\nA card for the test model.\n")
    registry = {"models": [{"name": "calid-test", "file": target.name, "sha256": sha256_of(target), "card": "calid-test.md", "default": True, "description": "test"}]}
    (folder / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setenv(MODEL_DIR_ENV, str(folder))
    by_default = calid.load_pipeline()
    assert by_default.name == "calid-test" and by_default.sha256 == sha256_of(target)
    out = by_default.upsample(phantom.sparse, 2, steps=1, frames=[0])
    assert out.metadata["upsampling"]["model"] == "calid-test"
    card = run_calid("info", "calid-test", env={**os.environ, MODEL_DIR_ENV: str(folder)})
    assert card.returncode == 0, card.stderr
    assert "configuration   tiny" in card.stdout and "A card for the test model." in card.stdout and "none (test)" in card.stdout
    listing = run_calid("info", env={**os.environ, MODEL_DIR_ENV: str(folder)})
    assert "calid-test (default): test [" in listing.stdout
    registry["models"][0]["description"] = ""  # installed without one: said, not an empty field
    (folder / "registry.json").write_text(json.dumps(registry))
    listing = run_calid("info", env={**os.environ, MODEL_DIR_ENV: str(folder)})
    assert "calid-test (default) (CaLID model, installed without a description) [" in listing.stdout
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(InputError, match="damaged"):
        load_pipeline("calid-test")
    with pytest.raises(InputError, match="neither a model file nor a known CaLID model name \\(known: [^)]*calid-test") as unknown:
        load_pipeline("no-such-model")
    assert "calid-seg-acdc" not in str(unknown.value)  # segmentation models are not offered for upsampling
    # A path that does not exist is a missing file, not an unknown name.
    with pytest.raises(InputError, match=r"model\.safetensors: model file not found \(no such file in .*\); installed CaLID models: calid-test"):
        load_pipeline(str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"model file not found \(the folder .*runs.* does not exist\)"):
        load_pipeline(str(tmp_path / "runs" / "best"))
    with pytest.raises(InputError, match=r"models: is a folder; give the model file in it \(calid-test\.safetensors\)"):
        load_pipeline(str(folder))


def test_no_installed_model_gives_a_clear_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    from calid.models.registry import default_model

    if default_model() is not None:
        pytest.skip("a default model is installed in this source tree")
    with pytest.raises(InputError, match=r"no trained CaLID model is installed.*registration or linear: --mode of calid upsample and of the batch script, the Slicer panel's method, --methods of calid evaluate, load_pipeline\('registration'\)"):
        load_pipeline()
    # calid info says what works without one.
    assert cli_main(["info"]) == 0
    assert "no CaLID interpolation model is installed: --mode registration" in capsys.readouterr().out


def test_vae_only_file_cannot_generate(tmp_path, phantom):
    model = untrained_model("tiny")
    path = save_model(tmp_path / "vae.safetensors", model.config, model.vae)
    vae_only = load_pipeline(path)
    with pytest.raises(InputError, match="autoencoder only"):
        vae_only.upsample(phantom.sparse, 2, mode="calid")
    assert vae_only.upsample(phantom.sparse, 2, mode="latent-linear", frames=[0]).n_slices == 9
    crops = np.zeros((2, model.config.image_size, model.config.image_size), np.float32)
    with pytest.raises(InputError, match="autoencoder only"):
        vae_only.interpolate_slices(crops, crops, "calid", 1)
    assert vae_only.interpolate_slices(crops, crops, "latent-linear", 1).shape == crops.shape


# ---------------------------------------------------------------- the command line
def test_cli_upsample_phantom_file_end_to_end(tmp_path, tiny_model_file, phantom):
    source = write_stack(phantom.sparse, tmp_path / "sparse.nii.gz", dtype="int16")
    original = read_stack(source)
    before = source.read_bytes()
    centre_ras = original.index_to_physical([30, 34, 2]) * [-1, -1, 1]
    result = run_calid(
        "upsample", str(source), str(tmp_path / "dense.seq.nrrd"), "--factor", "4", "--mode", "calid+", "--steps", "2",
        "--model", str(tiny_model_file), "--device", "cpu", "--frames", "0,2", "--seed", "5",
        "--centre-ras", ",".join(f"{v:.3f}" for v in centre_ras),  # may start with a minus sign
    )
    assert result.returncode == 0, result.stderr
    assert "5 -> 17 slices" in result.stdout and "2 frame(s)" in result.stdout and "cpu" in result.stdout
    assert "slice" in result.stderr  # the progress bar
    dense = read_stack(tmp_path / "dense.seq.nrrd")
    assert dense.shape == (2, 17) + original.shape[2:]
    assert dense.metadata["source_dtype"] == "int16"
    np.testing.assert_array_equal(dense.data[:, ::4], original.data[[0, 2]])
    np.testing.assert_allclose(dense.origin, original.origin, atol=1e-4)
    assert dense.slice_spacing == pytest.approx(original.slice_spacing / 4, rel=1e-5)
    assert source.read_bytes() == before
    machine = run_calid("upsample", str(source), str(tmp_path / "json.nii.gz"), "--factor", "2", "--model", str(tiny_model_file), "--steps", "2", "--frames", "1", "--progress", "json")
    assert machine.returncode == 0, machine.stderr
    updates = [json.loads(line) for line in machine.stdout.splitlines()]  # every line of stdout is JSON
    assert len(updates) > 2 and updates[-1]["done"] == updates[-1]["total"] == (original.n_slices - 1)
    again = run_calid("upsample", str(source), str(tmp_path / "dense.seq.nrrd"), "--mode", "linear")
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize(
    "options, option",
    [(["--batch-size", "0"], "--batch-size"), (["--batch-size", "-3"], "--batch-size"), (["--steps", "0"], "--steps"), (["--steps", "two"], "--steps")],
)
def test_cli_upsample_checks_counts_before_loading_anything(tmp_path, phantom, capsys, options, option):
    from calid.data.io import write_stack

    source = write_stack(phantom.sparse, tmp_path / "cine.nii.gz")
    with pytest.raises(SystemExit) as stopped:
        cli_main(["upsample", str(source), str(tmp_path / "out.nii.gz"), "--mode", "linear", "--quiet", *options])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}" in error and "at least 1" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cine.nii.gz"]


def test_cli_upsample_real_acdc_cine(tmp_path, tiny_model_file):
    subjects = reliable_acdc_subjects()
    source = shared_file("acdc_cine", subjects[0] if subjects else "patient001_4d.nii.gz")
    original = read_stack(source)
    result = run_calid("upsample", str(source), str(tmp_path / "dense.nii.gz"), "--factor", "2", "--model", str(tiny_model_file), "--steps", "2", "--frames", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    dense = read_stack(tmp_path / "dense.nii.gz")
    assert dense.shape == (1, 2 * original.n_slices - 1) + original.shape[2:]
    np.testing.assert_array_equal(dense.data[0, ::2], original.data[0])
    assert dense.slice_spacing == pytest.approx(original.slice_spacing / 2, rel=1e-5)
    reference = nib.load(str(source)).affine
    written = nib.load(str(tmp_path / "dense.nii.gz")).affine
    np.testing.assert_allclose(written[:3, :2], reference[:3, :2], atol=1e-4)  # in-plane axes unchanged
    np.testing.assert_allclose(written[:3, 2], reference[:3, 2] / 2, atol=1e-4)  # half the slice step
    np.testing.assert_allclose(written[:3, 3], reference[:3, 3], atol=1e-3)


def test_cli_bad_inputs_leave_no_partial_file(tmp_path, tiny_model_file, capsys):
    """In-process through the command's own main() (a subprocess per case would only add start-up time)."""
    model = ["--model", str(tiny_model_file), "--steps", "1"]
    two_d = tmp_path / "slice2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), dtype=np.int16), np.eye(4)), str(two_d))
    one_slice = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 1, 3), dtype=np.int16), np.eye(4)), str(one_slice))
    nan = tmp_path / "nan.nii.gz"
    values = np.ones((8, 8, 3), dtype=np.float32)
    values[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(nan))
    uneven = write_stack(oblique_stack(frames=1, slices=4), tmp_path / "dicom")
    for path in uneven.glob("IM_0001_*.dcm"):
        path.unlink()
    cases = [(two_d, "slice2d.nii.gz.*axes"), (one_slice, "one.nii.gz.*1 slice"), (nan, "nan.nii.gz.*NaN"), (uneven, "not evenly spaced")]
    for source, message in cases:
        code, stderr = run_main("upsample", str(source), str(tmp_path / "out.nii.gz"), *model, capsys=capsys)
        assert code == 2, (source, stderr)
        assert re.search(message, stderr), stderr
    good = write_stack(oblique_stack(frames=1, slices=3), tmp_path / "good.nii.gz")
    code, stderr = run_main("upsample", str(good), str(tmp_path / "no" / "such" / "out.nii.gz"), *model, capsys=capsys)
    assert code == 2 and "does not exist" in stderr
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anywhere: then only the other cases apply
            code, stderr = run_main("upsample", str(good), str(locked / "out.nii.gz"), *model, capsys=capsys)
            assert code == 2 and "locked" in stderr
            assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.startswith("out"))
    assert leftovers == []


def test_cli_interrupt_writes_nothing(tmp_path, tiny_model_file):
    source = write_stack(make_phantom(2, PhantomConfig(n_frames=6, matrix=64, pixel_spacing_mm=3.0)).sparse, tmp_path / "cine.nii.gz")
    target = tmp_path / "dense.nii.gz"
    process = subprocess.Popen(
        [sys.executable, "-m", "calid", "upsample", str(source), str(target), "--factor", "16", "--mode", "calid+", "--model", str(tiny_model_file), "--steps", "16"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = threading.Event()
    output = bytearray()

    def read() -> None:
        assert process.stderr is not None
        while chunk := process.stderr.read1(256):  # type: ignore[attr-defined]
            output.extend(chunk)
            if b"slice" in output:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(120), "the progress bar never appeared: " + output.decode(errors="replace")
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=60)
    reader.join(5)
    assert code == 130
    assert b"no output was written" in output or b"no partial output" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cine.nii.gz"]


def test_cli_demo_untrained_labels_itself_and_writes_everything(tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "none"))
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "none")}
    result = run_calid("demo", "--out", str(tmp_path / "demo"), "--model", "untrained:tiny", "--factor", "2", "--phantom-frames", "3", "--steps", "2", env=env)
    assert result.returncode == 0, result.stderr
    # The network's random weights are named in the output (and the figure titles).
    assert "UNTRAINED" in result.stdout
    demo = tmp_path / "demo"
    sparse = read_stack(demo / "phantom_sparse.nii.gz")
    for name in ("phantom_calid_x2.nii.gz", "phantom_linear_x2.nii.gz", "phantom_truth_x2.nii.gz"):
        dense = read_stack(demo / name)
        assert dense.n_slices == 2 * sparse.n_slices - 1 and dense.n_frames == sparse.n_frames
        assert dense.slice_spacing == pytest.approx(sparse.slice_spacing / 2)
        np.testing.assert_allclose(dense.origin, sparse.origin, atol=1e-6)
    np.testing.assert_array_equal(read_stack(demo / "phantom_calid_x2.nii.gz").data[:, ::2], sparse.data)
    for figure in ("phantom_long_axis.png", "phantom_before_after.png"):
        assert (demo / figure).read_bytes().startswith(b"\x89PNG")
        assert str(demo / figure) in result.stdout
    assert "PSNR" in result.stdout and "linear" in result.stdout


def test_cli_demo_with_test_time_augmentation_names_and_records_it(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli_main(["demo", "--out", str(out), "--model", "untrained:tiny", "--factor", "2", "--phantom-frames", "2", "--frames", "0", "--steps", "1", "--tta", "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "averaged over 8 turns/mirrors" in printed.out
    dense = read_stack(out / "phantom_calid_tta_x2.nii.gz")
    assert dense.metadata["upsampling"]["tta"] is True
    np.testing.assert_array_equal(dense.data[:, ::2], read_stack(out / "phantom_sparse.nii.gz").data)
    assert not (out / "phantom_calid_x2.nii.gz").exists()
    # A linear demo says that --tta does nothing there, and does not name its file tta.
    assert cli_main(["demo", "--out", str(out), "--mode", "linear", "--factor", "2", "--phantom-frames", "2", "--frames", "0", "--tta", "--quiet"]) == 0
    assert "no effect on mode linear" in capsys.readouterr().err
    assert (out / "phantom_linear_x2.nii.gz").is_file() and not (out / "phantom_linear_tta_x2.nii.gz").exists()


def test_install_a_trained_model_and_use_it_by_name(tmp_path, tiny_model_file, phantom, capsys, monkeypatch):
    folder = tmp_path / "models"
    card = tmp_path / "card.md"
    card.write_text("# my model\nTrained on nothing.\n")
    code = cli_main(["install", str(tiny_model_file), "--name", "my-model", "--folder", str(folder), "--default", "--card", str(card), "--description", "a test"])
    assert code == 0, capsys.readouterr().err
    registry = json.loads((folder / "registry.json").read_text())["models"]
    assert registry[0]["name"] == "my-model" and registry[0]["default"] and registry[0]["kind"] == "calid"
    assert (folder / "my-model.json").is_file() and (folder / "my-model.md").is_file()
    assert (folder / "my-model.safetensors").stat().st_size < 0.6 * tiny_model_file.stat().st_size  # float16
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "my-model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file
    original = load_pipeline(tiny_model_file)
    monkeypatch.setenv(MODEL_DIR_ENV, str(folder))
    installed = load_pipeline()
    assert installed.name == "my-model"
    a = original.upsample(phantom.sparse, 2, steps=2, frames=[0])
    b = installed.upsample(phantom.sparse, 2, steps=2, frames=[0])
    scale = float(phantom.sparse.data.max() - phantom.sparse.data.min())
    np.testing.assert_allclose(b.data, a.data, atol=0.02 * scale)  # float16 weights: close, not equal
    code = cli_main(["install", str(tiny_model_file), "--name", "second", "--folder", str(folder), "--default"])
    assert code == 0 and load_pipeline().name == "second"  # only one default per kind
    assert cli_main(["install", str(tiny_model_file), "--name", "bad/name", "--folder", str(folder)]) == 2


def test_model_default_steps_are_used_when_none_are_given(tmp_path, tiny_model_file, phantom, capsys):
    """``calid install --default-steps`` stores the validated step count in the file; the
    engine, the CLI and the Slicer command line use it whenever no count is given."""
    folder = tmp_path / "models"
    code = cli_main(["install", str(tiny_model_file), "--name", "three-steps", "--folder", str(folder), "--default-steps", "3", "--keep-precision"])
    assert code == 0, capsys.readouterr().err
    installed = load_pipeline(folder / "three-steps.safetensors", device="cpu")
    original = load_pipeline(tiny_model_file, device="cpu")
    assert installed.default_steps == 3 and original.default_steps == 8
    chosen = installed.upsample(phantom.sparse, 2, frames=[0])
    assert chosen.metadata["upsampling"]["steps"] == 3
    np.testing.assert_array_equal(chosen.data, original.upsample(phantom.sparse, 2, steps=3, frames=[0]).data)
    assert not np.array_equal(chosen.data, original.upsample(phantom.sparse, 2, frames=[0]).data)
    explicit = installed.upsample(phantom.sparse, 2, steps=1, frames=[0])
    assert explicit.metadata["upsampling"]["steps"] == 1
    source = tmp_path / "sparse.nii.gz"
    write_stack(phantom.sparse.select_frames([0]), source)
    code = cli_main(["upsample", str(source), str(tmp_path / "dense.nii.gz"), "--factor", "2", "--model", str(folder / "three-steps.safetensors"), "--device", "cpu", "--quiet"])
    assert code == 0 and "3 steps" in capsys.readouterr().out
    assert cli_main(["install", str(tiny_model_file), "--name", "bad-steps", "--folder", str(folder), "--default-steps", "0"]) == 2
    assert "default_steps must be an integer from 1" in capsys.readouterr().err
    assert not (folder / "bad-steps.safetensors").exists()
    card = run_calid("info", str(folder / "three-steps.safetensors"))
    assert "3 DDIM step(s) by default" in card.stdout, card.stderr


def test_install_adds_info_and_cuts_training_machine_paths(tmp_path, capsys):
    model = untrained_model("tiny", seed=3)
    recorded = {"training_data": {"inputs": ["/home/someone/data/acdc_cine"]}, "train_config": {"data": ["/home/someone/data/acdc_cine"], "out_dir": "/scratch/runs/ldm", "vae_model": "/scratch/runs/vae/best.safetensors", "steps": 10}}
    source = save_model(tmp_path / "trained.safetensors", model.config, model.vae, model.net, latent_scale=1.0, info=recorded)
    extra = tmp_path / "info.json"
    extra.write_text(json.dumps({"hardware": "2-core CPU", "reproduce": "calid train ldm ...", "licence": "CC BY-NC-SA 4.0"}))
    folder = tmp_path / "models"
    assert cli_main(["install", str(source), "--name", "shared", "--folder", str(folder), "--info", str(extra)]) == 0, capsys.readouterr().err
    info = json.loads((folder / "shared.json").read_text())["info"]
    assert info["hardware"] == "2-core CPU" and info["reproduce"] == "calid train ldm ..."
    from calid.models.card import model_card_text

    card = model_card_text(folder / "shared.safetensors")
    assert "2-core CPU" in card and "CC BY-NC-SA 4.0" in card  # the British spelling is shown too
    assert info["training_data"]["inputs"] == ["acdc_cine"] and info["train_config"]["data"] == ["acdc_cine"]
    assert info["train_config"]["out_dir"] == "ldm" and info["train_config"]["vae_model"] == "best.safetensors" and info["train_config"]["steps"] == 10
    assert "/home/someone" not in (folder / "shared.safetensors").read_bytes().decode("latin-1")
    assert load_pipeline(folder / "shared.safetensors", device="cpu").model is not None
    extra.write_text("[1, 2]")
    assert cli_main(["install", str(source), "--name", "other", "--folder", str(folder), "--info", str(extra)]) == 2
    assert "info.json" in capsys.readouterr().err


def test_an_input_without_geometry_is_flagged(pipeline, phantom, tmp_path, capsys):
    from dataclasses import replace

    bare = replace(phantom.sparse.select_frames([0]), spacing=(1.0, 1.0, 1.0))
    warned = pipeline.upsample(bare, 2, steps=1)
    assert "carries no geometry" in warned.metadata["upsampling"]["warning"]
    assert "warning" not in pipeline.upsample(phantom.sparse.select_frames([0]), 2, steps=1).metadata["upsampling"]
    source = write_stack(bare, tmp_path / "bare.nii.gz")
    assert cli_main(["upsample", str(source), str(tmp_path / "out.nii.gz"), "--factor", "2", "--steps", "1", "--model", str(pipeline.model.path), "--quiet"]) == 0
    assert "carries no geometry" in capsys.readouterr().err


def test_stack_without_geometry_is_shown_to_the_model_at_its_assumed_pixel_size(tmp_path, capsys):
    """A cine saved at NIfTI's default 1 x 1 x 1 mm reaches the network at the pixel size the
    model's training assumed for such files, exactly as the same cine with that geometry would;
    the output keeps the stored geometry and says what was assumed."""
    from dataclasses import replace

    phantom = make_phantom(3, PhantomConfig(n_frames=2, matrix=48, pixel_spacing_mm=1.5))
    real = replace(phantom.sparse.select_frames([0]), spacing=(1.5, 1.5, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    placeholder = replace(real, spacing=(1.0, 1.0, 1.0), source="no-geometry.nii.gz")
    assert placeholder.has_placeholder_spacing and not real.has_placeholder_spacing
    model = untrained_model("tiny")
    assumed = {"note": "no geometry", "assumed_mm": 1.5, "subjects": ["x"]}
    model_file = save_model(tmp_path / "m.safetensors", model.config, model.vae, model.net, 1.0, {"training_data": {"placeholder_spacing": assumed}})
    pipeline = load_pipeline(str(model_file))
    assert pipeline.placeholder_spacing_mm == 1.5
    assert (pipeline.assumed_pixel_mm_for("model"), pipeline.assumed_pixel_mm_for(None), pipeline.assumed_pixel_mm_for("keep"), pipeline.assumed_pixel_mm_for("2")) == (1.5, 1.5, None, 2.0)
    from calid.models.card import model_card_text

    assert "shown to it at 1.5 mm pixels" in model_card_text(model_file)  # calid info
    assert "no geometry" not in model_card_text(save_model(tmp_path / "plain.safetensors", model.config, model.vae, model.net, 1.0, {}))
    options = dict(factor=2, mode="calid", steps=2, seed=4)

    as_real = pipeline.upsample(real, **options)
    as_assumed = pipeline.upsample(placeholder, assumed_pixel_mm=1.5, **options)
    as_stored = pipeline.upsample(placeholder, **options)
    np.testing.assert_array_equal(as_assumed.data, as_real.data)  # the network saw the same thing
    assert not np.array_equal(as_stored.data, as_real.data)  # at 1 mm it does not
    for dense in (as_assumed, as_stored):
        np.testing.assert_array_equal(dense.data[:, ::2], placeholder.data)  # acquired slices bit-exact
        assert dense.spacing == (1.0, 1.0, 0.5)  # the stored geometry, not the assumed one
    assert as_assumed.metadata["upsampling"]["assumed_pixel_mm"] == 1.5 and "taken as 1.5 mm" in as_assumed.metadata["upsampling"]["warning"]
    assert "assumed_pixel_mm" not in as_stored.metadata["upsampling"] and "given 1 mm pixels" in as_stored.metadata["upsampling"]["warning"]
    # a crop centre keeps its pixel position: the same pixel in both geometries gives the same result
    pixel = np.array([20.0, 17.0, 1.0])
    np.testing.assert_array_equal(
        pipeline.upsample(placeholder, assumed_pixel_mm=1.5, centre_lps=placeholder.index_to_physical(pixel), **options).data,
        pipeline.upsample(real, centre_lps=real.index_to_physical(pixel), **options).data,
    )
    # a stack with a real geometry is never rescaled
    np.testing.assert_array_equal(pipeline.upsample(real, assumed_pixel_mm=2.0, **options).data, as_real.data)
    with pytest.raises(InputError, match="not plausible"):
        pipeline.upsample(placeholder, assumed_pixel_mm=50, **options)

    # the command line: the model's assumption by default, keep, a size, or a clear error
    source = write_stack(placeholder, tmp_path / "no-geometry.nii.gz")
    common = ["upsample", str(source), "--model", str(model_file), "--factor", "2", "--steps", "2", "--seed", "4", "--quiet"]
    assert cli_main([*common[:2], str(tmp_path / "model.nii.gz"), *common[2:]]) == 0
    assert "taken as 1.5 mm" in capsys.readouterr().err
    assert cli_main([*common[:2], str(tmp_path / "keep.nii.gz"), *common[2:], "--placeholder-spacing", "keep"]) == 0
    assert "given 1 mm pixels" in capsys.readouterr().err
    assert cli_main([*common[:2], str(tmp_path / "bad.nii.gz"), *common[2:], "--placeholder-spacing", "huge"]) == 2
    assert "--placeholder-spacing" in capsys.readouterr().err and not (tmp_path / "bad.nii.gz").exists()
    np.testing.assert_allclose(read_stack(tmp_path / "model.nii.gz").data, as_assumed.data, atol=1e-3 * np.abs(as_assumed.data).max())


def test_recorded_placeholder_spacing_reads_only_a_real_record():
    from calid.models.checkpoint import recorded_placeholder_spacing

    assert recorded_placeholder_spacing({"info": {"training_data": {"placeholder_spacing": {"assumed_mm": 1.43}}}}) == 1.43
    assert recorded_placeholder_spacing({"info": {"training_data": {"placeholder_spacing": {"assumed_mm": [1.2, 1.4, 1.5]}}}}) == 1.4
    for header in ({}, {"info": "untrained: no training data"}, {"info": {"training_data": "ACDC"}}, {"info": {"training_data": {"placeholder_spacing": {"assumed_mm": True}}}}):
        assert recorded_placeholder_spacing(header) is None
    assert untrained_model("tiny") is not None and load_pipeline("untrained:tiny").placeholder_spacing_mm is None


def test_the_default_mode_follows_the_pipeline(phantom, pipeline):
    """load_pipeline("linear").upsample(stack, f) interpolates linearly; a model's pipeline runs CaLID."""
    from calid.inference.baselines import upsample_linear

    linear = load_pipeline("linear").upsample(phantom.sparse, 2, frames=[0])
    np.testing.assert_array_equal(linear.data, upsample_linear(phantom.sparse.select_frames([0]), 2).data)
    assert pipeline.upsample(phantom.sparse, 2, steps=1, frames=[0]).metadata["upsampling"]["mode"] == "calid"


# ---------------------------------------------------------------- voxel types float32 would round
@pytest.mark.parametrize(
    ("suffix", "dtype", "values"),
    [
        (".nii.gz", np.float64, lambda rng, shape: rng.uniform(0, 1, shape) / 3.0),  # thirds: not float32 numbers
        (".nrrd", np.int32, lambda rng, shape: rng.integers(2**24, 2**24 + 999, shape)),  # odd integers above 2**24
    ],
)
@pytest.mark.parametrize("mode", ["calid", "registration", "linear"])
def test_acquired_slices_of_wide_voxel_types_are_written_back_bit_for_bit(pipeline, tmp_path, suffix, dtype, values, mode):
    reference = oblique_stack(frames=2, slices=3, rows=40, columns=36)
    rng = np.random.default_rng(3)
    voxels = values(rng, reference.shape).astype(dtype)
    assert not np.array_equal(voxels.astype(np.float32).astype(dtype), voxels)  # float32 would round them
    source = write_stack(reference.with_data(voxels, metadata={"source_dtype": np.dtype(dtype).name}), tmp_path / f"wide{suffix}")
    written = source.read_bytes()

    stack = read_stack(source)
    dense = pipeline.upsample(stack, factor=2, mode=mode, steps=1)
    back = read_stack(write_stack(dense, tmp_path / f"dense{suffix}"))

    assert source.read_bytes() == written  # the input is never modified
    assert back.metadata["source_dtype"] == np.dtype(dtype).name
    np.testing.assert_array_equal(back.data[:, ::2].astype(dtype), voxels)
    assert back.same_geometry(dense)
    assert np.all(np.isfinite(back.data[:, 1::2]))


def test_scanner_voxel_types_are_held_in_float32():
    """8- and 16-bit integers are exact in float32: holding them in float64 would double the memory for nothing."""
    for dtype in (np.uint8, np.int16, np.uint16, np.float16, np.float32, bool):
        assert CineStack(np.zeros((1, 2, 3, 3), dtype=dtype)).data.dtype == np.float32
    for dtype in (np.float64, np.int32, np.uint32, np.int64):
        assert CineStack(np.zeros((1, 2, 3, 3), dtype=dtype)).data.dtype == np.float64
