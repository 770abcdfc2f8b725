"""What the `calid` command says when something is off: one line naming the input, the right exit
status, and no silent fallback (a wrong file read, a result dropped, a success that wrote nothing)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from calid.cli import main as cli_main
from calid.data.io import read_stack, write_stack
from calid.data.phantom import PhantomConfig, make_phantom
from calid.errors import InputError

from conftest import oblique_stack


def run_calid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "calid", *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def labels():
    return make_phantom(3, PhantomConfig(n_frames=2, matrix=48)).sparse_labels


def test_naming_an_unreadable_dicom_file_does_not_read_its_folder_instead(tmp_path):
    folder = write_stack(oblique_stack(frames=1, slices=3), tmp_path / "series")
    (folder / "mine.dcm").write_text("not dicom")
    with pytest.raises(InputError, match=r"mine\.dcm.*not a readable DICOM image"):
        read_stack(folder / "mine.dcm")
    assert read_stack(folder).n_slices == 3  # the folder itself, named, is still read
    nifti = write_stack(oblique_stack(frames=1, slices=3), tmp_path / "one.nii.gz")
    with pytest.raises(InputError, match=r"--series.*one\.nii\.gz is a NIfTI file"):
        read_stack(nifti, series="7")


def test_volumes_of_two_label_files_with_one_name_keeps_both(tmp_path, labels):
    for folder in ("sparse", "dense"):
        (tmp_path / folder).mkdir()
        write_stack(labels, tmp_path / folder / "labels.nii.gz", dtype="uint8")
    code = cli_main(["volumes", str(tmp_path / "sparse" / "labels.nii.gz"), str(tmp_path / "dense" / "labels.nii.gz"), "--out", str(tmp_path / "out")])
    assert code == 0
    with (tmp_path / "out" / "volumes.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    methods = {value for row in rows for value in row.values() if value in ("sparse/labels", "dense/labels")}
    assert methods == {"sparse/labels", "dense/labels"}, rows[:2]
    # names with dots of their own stay apart; a file without a folder of its own is named by its folder
    write_stack(labels, tmp_path / "P001.ed.nii.gz", dtype="uint8")
    write_stack(labels, tmp_path / "P001.es.nii.gz", dtype="uint8")
    assert cli_main(["volumes", str(tmp_path / "P001.ed.nii.gz"), str(tmp_path / "P001.es.nii.gz"), "--out", str(tmp_path / "dots")]) == 0
    table = (tmp_path / "dots" / "volumes.csv").read_text()
    assert "P001.ed," in table and "P001.es," in table


def test_surfaces_of_labels_without_a_heart_fail_instead_of_claiming_success(tmp_path, labels, capsys):
    empty = write_stack(labels.with_data(np.zeros_like(labels.data)), tmp_path / "empty.nii.gz", dtype="uint8")
    assert cli_main(["surfaces", str(empty), "--out", str(tmp_path / "surfaces")]) == 2
    assert "no surface written" in capsys.readouterr().err and not (tmp_path / "surfaces").exists()
    assert cli_main(["surfaces", str(write_stack(labels, tmp_path / "heart.nii.gz", dtype="uint8")), "--out", str(tmp_path / "heart"), "--frames", "0"]) == 0
    assert len(list((tmp_path / "heart").glob("frame000_*.vtp"))) == 3


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["phantom", "{tmp}/p", "--seed", "-1"], "--seed: expects a whole number from 0 to 4294967295"),
        (["info", "untrained:foo"], "untrained:foo: unknown configuration"),
        (["train", "vae", "--data", "phantom:2", "--out", "{tmp}/t", "--config", "default"], "--config: 'default' names the segmenter's size"),
        (["train", "vae", "--data", "phantom:2", "--out", "{tmp}/t", "--config", "tiny", "--gaps", "a"], "--gaps: expected comma-separated integers"),
        (["train", "vae", "--data", "phantom:2", "--out", "{tmp}/t", "--config", "tiny", "--gaps", "0,1"], "--gaps: neighbour distances"),
        (["upsample", "{tmp}/in.nii.gz", "{tmp}/o.nii.gz", "--mode", "linear", "--stop-file", "{tmp}/missing/stop"], "--stop-file: the folder"),
        (["lax", "{tmp}/in.nii.gz", "--out", "{tmp}/o.nii.gz", "--spacing", "0"], "--spacing: the reslice pixel size"),
        (["lax", "{tmp}/in.nii.gz", "--out", "{tmp}/o.nii.gz", "--points-ras", "1,2,3;4,5,6"], "--points-ras: give exactly three points"),
        (["phantom", "{tmp}/o.nii.gz", "--frames", "0"], "--frames: expects a whole number of at least 1"),
        (["upsample", "{tmp}/in.nii.gz", "{tmp}/in.nii.gz/o.nii.gz", "--mode", "linear"], "in.nii.gz is a file, not a folder"),
        (["upsample", "{tmp}/in.nii.gz", "{tmp}/missing/o.nii.gz", "--mode", "linear"], "missing does not exist"),
        (["upsample", "{tmp}/in.nii.gz", "{tmp}/o.nii.gz", "--frames", "5-2", "--mode", "linear"], "the range 5-2 runs backwards"),
    ],
)
def test_bad_options_get_one_line_and_exit_status_2(tmp_path, capsys, arguments, message):
    write_stack(oblique_stack(frames=1, slices=3), tmp_path / "in.nii.gz")
    try:
        code = cli_main([argument.replace("{tmp}", str(tmp_path)) for argument in arguments])
    except SystemExit as stop:  # argparse's own checks
        code = stop.code
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "o.nii.gz").exists()  # no output, not even an empty output folder


def test_warnings_are_one_line_without_source_paths(tmp_path):
    cine = write_stack(oblique_stack(frames=2, slices=3), tmp_path / "cine.nii.gz")
    result = run_calid("convert", str(cine), str(tmp_path / "cine.nrrd"))  # a cine as plain .nrrd: Slicer shows a vector volume
    assert result.returncode == 0, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert warning_lines and warning_lines[0].startswith("calid convert: warning: ") and "cine.nrrd" in warning_lines[0]
    assert ".py:" not in result.stderr and "write_stack(" not in result.stderr


def test_pack_suggests_a_training_command_that_fits_the_packed_file(tmp_path):
    code_and_output = run_calid("pack", "--data", "phantom:2", "--config", "tiny", "--out", str(tmp_path / "packed.npz"))
    assert code_and_output.returncode == 0, code_and_output.stderr
    hint = next(line for line in code_and_output.stdout.splitlines() if line.startswith("train on it with"))
    assert "--config tiny" in hint


def test_a_failed_install_leaves_the_installed_model_working(tmp_path):
    from calid.models import build_vae, named_config, save_model

    model = save_model(tmp_path / "vae.safetensors", named_config("tiny"), build_vae(named_config("tiny")))
    folder = tmp_path / "models"
    assert cli_main(["install", str(model), "--name", "mine", "--folder", str(folder)]) == 0
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert cli_main(["install", str(model), "--name", "mine", "--folder", str(folder), "--card", str(tmp_path / "typo.md"), "--keep-precision"]) == 2
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # nothing replaced
    env = {**os.environ, "CALID_MODEL_DIR": str(folder)}
    assert run_calid("info", "mine", env=env).returncode == 0


def test_info_says_when_the_model_folder_variable_names_no_folder(tmp_path):
    result = run_calid("info", env={**os.environ, "CALID_MODEL_DIR": str(tmp_path / "no-such-folder")})
    assert result.returncode == 0 and f"$CALID_MODEL_DIR names folder(s) that do not exist: {tmp_path / 'no-such-folder'}" in result.stdout


def test_info_names_the_training_step_of_the_shipped_weights_not_a_training_length(capsys):
    """The segmenter was trained for 3000 steps and ships its best validation step: the card must not
    say it was trained for that many steps."""
    assert cli_main(["info", "calid-seg-acdc"]) == 0
    printed = capsys.readouterr().out
    assert "weights         from training step 2750" in printed
    assert "2750 steps" not in printed


def test_a_label_map_given_as_the_image_is_flagged(tmp_path, labels):
    """Interpolating labels linearly turns RV (1) beside LV (3) into myocardium (2): say what was probably meant."""
    source = write_stack(labels, tmp_path / "seg.nii.gz", dtype="uint8")
    result = run_calid("upsample", str(source), str(tmp_path / "x2.nii.gz"), "--mode", "linear", "--factor", "2", "--quiet")
    assert result.returncode == 0 and "holds only the values 0-3: is it a label map" in result.stderr
    assert result.stderr.count("is it a label map") == 1  # said before the run (minutes with a model), not again after it
    image = write_stack(oblique_stack(frames=1), tmp_path / "image.nii.gz")
    fine = run_calid("upsample", str(image), str(tmp_path / "image_x2.nii.gz"), "--mode", "linear", "--factor", "2", "--quiet")
    assert fine.returncode == 0 and "label map" not in fine.stderr


def test_a_folder_of_nifti_files_given_as_the_input_says_to_give_one_file(tmp_path):
    folder = tmp_path / "cines"
    folder.mkdir()
    write_stack(oblique_stack(frames=1), folder / "patient001_4d.nii.gz")
    result = run_calid("upsample", str(folder), str(tmp_path / "x2.nii.gz"), "--mode", "linear")
    assert result.returncode == 2 and "holds 1 NIfTI / NRRD image(s) (patient001_4d.nii.gz, ...): give one of them, not the folder" in result.stderr


def test_surfaces_again_into_the_same_folder_replace_the_earlier_run_only_when_asked(tmp_path, labels):
    source = write_stack(labels, tmp_path / "labels.nii.gz", dtype="uint8")
    out = tmp_path / "surfaces"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    assert run_calid("surfaces", str(source), "--out", str(out), "--frames", "0,1", "--format", "stl").returncode == 0
    again = run_calid("surfaces", str(source), "--out", str(out), "--frames", "1", "--format", "stl")
    assert again.returncode == 2 and "exists from an earlier run" in again.stderr and "--overwrite" in again.stderr
    replaced = run_calid("surfaces", str(source), "--out", str(out), "--frames", "1", "--format", "stl", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "notes.txt" in names and not any(name.startswith("frame000") for name in names) and any(name.startswith("frame001") for name in names)


def test_lax_overwrite_never_removes_its_own_input_or_other_files(tmp_path):
    from calid.data.phantom import PhantomConfig, make_phantom

    phantom = make_phantom(4, PhantomConfig(n_frames=1, matrix=48))
    out = tmp_path / "views"
    out.mkdir()
    cine = write_stack(phantom.sparse, out / "short-axis.seq.nrrd")  # named like a view, and inside --out
    labels = write_stack(phantom.sparse_labels, out / "labels.nii.gz", dtype="uint8")
    (out / "user.json").write_text("{}")
    for _ in range(2):
        done = run_calid("lax", str(cine), "--labels", str(labels), "--out", str(out), "--overwrite")
        assert done.returncode == 0, done.stderr
    assert cine.is_file() and labels.is_file() and (out / "user.json").is_file() and (out / "short-axis.png").is_file()
