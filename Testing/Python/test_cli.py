from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from calid.data.io import read_stack, write_stack
from calid.inference.baselines import upsample_linear
from calid.errors import InputError

from conftest import oblique_stack


def run_calid(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "calid", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_linear_upsampling_keeps_acquired_slices_and_geometry():
    stack = oblique_stack(frames=2, slices=4)
    dense = upsample_linear(stack, 4)
    assert dense.n_slices == 13 and dense.slice_spacing == pytest.approx(stack.slice_spacing / 4)
    np.testing.assert_array_equal(dense.data[:, ::4], stack.data)  # bit exact
    np.testing.assert_allclose(dense.data[:, 2], (stack.data[:, 0] + stack.data[:, 1]) / 2, rtol=1e-6)
    for k in range(stack.n_slices):
        np.testing.assert_allclose(dense.slice_origin(4 * k), stack.slice_origin(k), atol=1e-9)
    with pytest.raises(InputError, match="2, 4, 8, 16"):
        upsample_linear(stack, 3)


def test_upsample_command_and_its_errors(tmp_path):
    source = write_stack(oblique_stack(frames=2, slices=3), tmp_path / "in.nii.gz")
    before = source.read_bytes()
    ok = run_calid("upsample", str(source), str(tmp_path / "out.seq.nrrd"), "--factor", "2", "--mode", "linear")
    assert ok.returncode == 0, ok.stderr
    assert read_stack(tmp_path / "out.seq.nrrd").n_slices == 5
    reordered = run_calid("upsample", str(source), str(tmp_path / "reordered.nii.gz"), "--factor", "2", "--mode", "linear", "--frames", "1,0,1")
    assert reordered.returncode == 0 and "--frames 1,0,1: the frames are taken in the cine's order, each once: 0, 1" in reordered.stderr
    bad_factor = run_calid("upsample", str(source), str(tmp_path / "x.nii.gz"), "--factor", "3", "--mode", "linear")
    assert bad_factor.returncode == 2 and "2, 4, 8, 16" in bad_factor.stderr
    same = run_calid("upsample", str(source), str(source))
    assert same.returncode == 2 and "overwrite the input" in same.stderr
    missing = run_calid("upsample", str(tmp_path / "nope.nii.gz"), str(tmp_path / "x.nii.gz"), "--mode", "linear")
    assert missing.returncode == 2 and "nope.nii.gz" in missing.stderr
    assert source.read_bytes() == before
    assert not (tmp_path / "x.nii.gz").exists()


def test_convert_dicom_to_nifti_and_inspect(tmp_path):
    stack = oblique_stack(frames=2, slices=4)
    folder = write_stack(stack, tmp_path / "dicom")
    converted = run_calid("convert", str(folder), str(tmp_path / "cine.nii.gz"))
    assert converted.returncode == 0, converted.stderr
    back = read_stack(tmp_path / "cine.nii.gz")
    np.testing.assert_array_equal(back.data, stack.data)
    np.testing.assert_allclose(back.origin, stack.origin, atol=1e-5)
    info = run_calid("inspect", str(tmp_path / "cine.nii.gz"))
    assert info.returncode == 0 and "8.5 between slices" in info.stdout and "37.5 ms apart" in info.stdout
    assert converted.stdout.strip().endswith("geometry and frame times kept") and "CineStack(" not in converted.stdout


def test_inspect_lists_uneven_frame_times_the_frames_of_a_selection_and_how_a_stack_was_made(tmp_path):
    stack = oblique_stack(frames=12, slices=4)
    ed_es = write_stack(upsample_linear(stack.select_frames([0, 1, 10]), 2), tmp_path / "dense.nii.gz")
    info = run_calid("inspect", str(ed_es))
    assert info.returncode == 0, info.stderr
    assert "12.0, 49.5, 387.0 ms (unevenly spaced)" in info.stdout and "apart)" not in info.stdout.split("frame times")[1].splitlines()[0]
    assert "frames of cine  0, 1, 10 (counted from 0)" in info.stdout
    assert "made by calid   linear x2" in info.stdout and "from slices 8.5 mm apart" in info.stdout
    bare = write_stack(stack.with_data(stack.data, spacing=(1.0, 1.0, 1.0)), tmp_path / "bare.nii.gz")
    assert "probably lost its geometry" in run_calid("inspect", str(bare)).stdout


def test_inspect_names_a_chain_of_upsamplings_a_reslice_label_values_and_a_single_frames_time(tmp_path):
    stack = oblique_stack(frames=3, slices=4)
    twice = write_stack(upsample_linear(upsample_linear(stack, 2), 2), tmp_path / "twice.nii.gz")
    info = run_calid("inspect", str(twice))
    assert info.returncode == 0, info.stderr
    assert "made by calid   linear x2 then linear x2: 1 slice in 4 is acquired, from slices 8.5 mm apart" in info.stdout
    to_ras = np.array([-1.0, -1.0, 1.0])
    centre = stack.index_to_physical([(n - 1) / 2 for n in (stack.shape[3], stack.shape[2], stack.shape[1])]) * to_ras
    normal, along = stack.direction[:, 0] * to_ras, stack.slice_normal * to_ras  # a plane across the slices
    plane_ras = ";".join(",".join(f"{v:.6f}" for v in vector) for vector in (centre, normal, along))
    view = run_calid("lax", str(twice), "--out", str(tmp_path / "lax"), f"--plane-ras={plane_ras}")
    assert view.returncode == 0, view.stderr
    plane = run_calid("inspect", str(tmp_path / "lax" / "user.nii.gz"))
    assert plane.returncode == 0, plane.stderr
    assert "a reslice by calid lax" in plane.stdout and "resliced from a stack made by linear x2 then linear x2" in plane.stdout
    assert "1 slice in" not in plane.stdout and "lost its geometry" not in plane.stdout  # a reslice is written at 1 mm on purpose
    labels = np.zeros(stack.shape, dtype=np.uint8)
    labels[:, :, 2:5, 2:5], labels[:, :, 6:8, 6:8] = 1, 3
    label_file = write_stack(stack.with_data(labels).select_frames([1]), tmp_path / "labels.nii.gz", dtype="uint8")
    described = run_calid("inspect", str(label_file)).stdout
    assert "labels          1, 3 (values 0-3 only: probably labels; calid reads 1 RV cavity" in described and "intensities" not in described
    assert f"frame time      {stack.frame_times_ms[1]:.1f} ms" in described
    assert "labels " not in run_calid("inspect", str(twice)).stdout
    # A record edited by hand or by another tool: described as far as it can be, never a crash.
    odd = upsample_linear(stack, 2)
    odd.metadata["upsampling"].update(earlier_upsampling=3, acquired_slice_spacing_mm=1.0)
    odd.metadata["labels"] = {"\u00b2": "squared", "1": "RV cavity"}
    described = run_calid("inspect", str(write_stack(odd, tmp_path / "odd.nrrd")))
    assert described.returncode == 0, described.stderr
    assert "made by calid   linear x2\n" in described.stdout and "1 slice in" not in described.stdout and "labels          1 RV cavity" in described.stdout


def test_phantom_command_writes_labels_as_integers(tmp_path):
    result = run_calid("phantom", str(tmp_path), "--frames", "2")
    assert result.returncode == 0, result.stderr
    labels = read_stack(tmp_path / "phantom0000_sparse_labels.nii.gz")
    assert labels.metadata["source_dtype"] == "uint8"
    assert set(np.unique(labels.data)) <= {0.0, 1.0, 2.0, 3.0}


def test_segment_and_upsample_stop_at_once_when_the_stop_file_exists(tmp_path):
    """``--stop-file``: a program cancels a background worker by creating the file; exit status 130, no output."""
    from calid.data.phantom import PhantomConfig, make_phantom

    source = write_stack(make_phantom(3, PhantomConfig(n_frames=2, matrix=48, pixel_spacing_mm=3.0)).sparse, tmp_path / "cine.nii.gz")
    stop = tmp_path / "stop"
    stop.touch()
    for command, output in (
        (["segment", str(source), str(tmp_path / "labels.nii.gz")], tmp_path / "labels.nii.gz"),
        (["upsample", str(source), str(tmp_path / "dense.nii.gz"), "--model", "untrained:tiny", "--steps", "1", "--device", "cpu"], tmp_path / "dense.nii.gz"),
    ):
        done = run_calid(*command, "--stop-file", str(stop), "--quiet")
        assert done.returncode == 130, done.stderr
        assert "cancelled; no output was written" in done.stderr and not output.exists()
    linear = run_calid("upsample", str(source), str(tmp_path / "kept.nii.gz"), "--mode", "linear", "--stop-file", str(tmp_path / "never-created"), "--quiet")
    assert linear.returncode == 0, linear.stderr  # a stop file that does not exist changes nothing
    assert (tmp_path / "kept.nii.gz").is_file()


def test_outputs_are_checked_before_any_work_and_never_replaced_silently(tmp_path):
    """A missing folder, an unknown or read-only format and an existing file are refused at once (a
    model run can take hours); segment and convert never replace a file (hand-corrected labels)
    unless --overwrite; a file where an --out folder is expected is an error, not a traceback."""
    source = write_stack(oblique_stack(frames=1, slices=3), tmp_path / "in.nii.gz")
    for output, message in ((tmp_path / "no" / "out.nii.gz", "does not exist"), (tmp_path / "out.txt", "unknown file type"),
                            (tmp_path / "out.nhdr", "read but not written")):
        # untrained:tiny would build a network and run it: the refusal must come first, whatever the mode.
        refused = run_calid("upsample", str(source), str(output), "--mode", "calid", "--model", "untrained:tiny", "--steps", "1")
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
        assert "slices" not in refused.stdout  # nothing was computed
    assert not (tmp_path / "no").exists()

    labels = tmp_path / "labels.nii.gz"
    labels.write_bytes(b"labels corrected by hand")
    for command in (["convert", str(source), str(labels)], ["segment", str(source), str(labels), "--model", "untrained:tiny"]):
        kept = run_calid(*command)
        assert kept.returncode == 2 and "--overwrite" in kept.stderr
        assert labels.read_bytes() == b"labels corrected by hand"
    replaced = run_calid("convert", str(source), str(labels), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert read_stack(labels).shape == read_stack(source).shape
    # DICOM goes into a new or empty folder, never into one with files (--overwrite does not empty it).
    (tmp_path / "empty").mkdir()
    assert run_calid("convert", str(source), str(tmp_path / "empty")).returncode == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    full = run_calid("upsample", str(source), str(tmp_path / "full"), "--mode", "calid", "--model", "untrained:tiny", "--overwrite")
    assert full.returncode == 2 and "not empty" in full.stderr and "slices" not in full.stdout
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    stack = oblique_stack(frames=2, slices=4)
    real_labels = write_stack(stack.with_data((np.arange(stack.data.size) % 4).reshape(stack.shape).astype(np.float32)), tmp_path / "real_gt.nii.gz", dtype="uint8")
    for command in (["demo", "--out", str(a_file), "--mode", "linear", "--phantom-frames", "2"], ["volumes", str(real_labels), "--out", str(a_file)]):
        failed = run_calid(*command)
        assert failed.returncode == 2 and "is not a folder" in failed.stderr and "Traceback" not in failed.stderr


def test_an_intensity_image_is_refused_as_labels(tmp_path):
    """Pixels of value 1, 2 or 3 in an MR image would be measured as heart: refused, naming the file."""
    image = write_stack(oblique_stack(frames=2, slices=4), tmp_path / "image.nii.gz", dtype="int16")
    for command in (["volumes", str(image), "--out", str(tmp_path / "v")], ["surfaces", str(image), "--out", str(tmp_path / "s")]):
        refused = run_calid(*command)
        assert refused.returncode == 2 and "is not a label image" in refused.stderr and "image.nii.gz" in refused.stderr
    assert not (tmp_path / "v").exists() and not (tmp_path / "s").exists()


def test_demo_in_linear_mode_runs_no_network(tmp_path):
    result = run_calid("demo", "--out", str(tmp_path / "demo"), "--mode", "linear", "--factor", "2", "--phantom-frames", "2")
    assert result.returncode == 0, result.stderr
    assert "UNTRAINED" not in result.stdout and "linear interpolation" in result.stdout
    assert sorted(p.name for p in (tmp_path / "demo").glob("*.nii.gz")) == [
        "phantom_linear_x2.nii.gz", "phantom_sparse.nii.gz", "phantom_truth_labels_x2.nii.gz", "phantom_truth_x2.nii.gz"]


def test_demo_at_the_largest_factor_scores_against_a_truth_at_every_new_slice(tmp_path):
    """x16 and x32 are valid factors: the demo's phantom is then made dense enough to have a true slice for each new one."""
    result = run_calid("demo", "--out", str(tmp_path / "demo"), "--mode", "linear", "--factor", "32", "--phantom-frames", "2")
    assert result.returncode == 0, result.stderr
    from calid.data.io import read_stack

    dense, truth = (read_stack(tmp_path / "demo" / f"phantom_{kind}_x32.nii.gz") for kind in ("linear", "truth"))
    assert dense.shape == truth.shape and dense.slice_spacing == pytest.approx(truth.slice_spacing)


def test_an_upsampled_dicom_series_says_how_it_was_made_and_the_command_says_it_is_anonymised(tmp_path):
    import pydicom

    source = write_stack(oblique_stack(frames=1, slices=3), tmp_path / "cine.nii.gz")
    done = run_calid("upsample", str(source), str(tmp_path / "dense_dicom"), "--mode", "linear", "--factor", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "new DICOM study, patient 'Anonymous', ID 'CaLID'" in done.stderr
    first = next((tmp_path / "dense_dicom").iterdir())
    assert pydicom.dcmread(str(first)).SeriesDescription == "CaLID linear x2"
    assert "reverse order" not in done.stderr  # the test stack is right-handed
    left = oblique_stack(frames=1, slices=3)
    left = left.with_data(left.data, direction=left.direction * [1, 1, -1])
    converted = run_calid("convert", str(write_stack(left, tmp_path / "left.nii.gz")), str(tmp_path / "left_dicom"))
    assert converted.returncode == 0 and "stores the slices in reverse order" in converted.stderr


def test_threads_option_sets_the_cpu_threads_the_summary_reports(tmp_path):
    """On a machine shared with other jobs, fewer threads than cores keep CPU work from stalling."""
    source = write_stack(oblique_stack(frames=1, slices=3), tmp_path / "in.nii.gz")
    one = run_calid("upsample", str(source), str(tmp_path / "one.nii.gz"), "--factor", "2", "--mode", "linear", "--device", "cpu", "--threads", "1")
    assert one.returncode == 0 and "on cpu (1 thread):" in one.stdout, one.stdout + one.stderr
    two = run_calid("upsample", str(source), str(tmp_path / "two.nii.gz"), "--factor", "2", "--mode", "linear", "--device", "cpu", "--threads", "2")
    assert two.returncode == 0 and "on cpu (2 threads):" in two.stdout
    none = run_calid("upsample", str(source), str(tmp_path / "none.nii.gz"), "--mode", "linear", "--threads", "0")
    assert none.returncode == 2 and "--threads: must be 1 or more, got 0" in none.stderr
    assert not (tmp_path / "none.nii.gz").exists()
