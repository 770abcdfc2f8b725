"""Segmentation network (training, resume, inference, clean-up) and the segment / lax / surfaces / volumes commands."""

from __future__ import annotations

import csv
import io

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calid.data.io import read_stack, write_stack
from calid.data.phantom import PhantomConfig, make_phantom
from calid.errors import InputError
from calid.segmentation import keep_largest_components, load_segmenter, segment
from calid.segmentation.model import build_segmenter, named_segmentation_config, save_segmenter
from calid.segmentation.training import SegmentationTrainer, SegTrainConfig, dice_per_structure, find_labelled_pairs
from conftest import REPO_ROOT, shared_file


def run_calid(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "calid", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(6, PhantomConfig(n_frames=4, matrix=64, pixel_spacing_mm=3.0))


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    """Phantom subjects written like ACDC: NAME.nii.gz with NAME_gt.nii.gz beside it."""
    folder = tmp_path_factory.mktemp("labelled")
    for seed in range(4):
        ph = make_phantom(20 + seed, PhantomConfig(n_frames=2, matrix=64, pixel_spacing_mm=3.0))
        for frame in range(2):
            write_stack(ph.sparse.select_frames([frame]), folder / f"subject{seed:02d}_frame{frame:02d}.nii.gz", dtype="int16")
            write_stack(ph.sparse_labels.select_frames([frame]), folder / f"subject{seed:02d}_frame{frame:02d}_gt.nii.gz", dtype="uint8")
    return folder


@pytest.fixture(scope="module")
def tiny_segmenter_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = named_segmentation_config("tiny")
    return save_segmenter(tmp_path_factory.mktemp("seg") / "tiny-seg.safetensors", config, build_segmenter(config), {"training_data": "none (test)"})


def test_training_learns_and_resumes_exactly(labelled_folder, tmp_path):
    assert len(find_labelled_pairs((str(labelled_folder),))) == 8
    config = SegTrainConfig(data=(str(labelled_folder),), out_dir=str(tmp_path / "whole"), model="tiny", steps=6, batch_size=4, validate_every=3, checkpoint_every=3, val_fraction=0.25)
    whole = SegmentationTrainer(config)
    assert set(whole.subjects["validation"]).isdisjoint(whole.subjects["train"]) and len(whole.subjects["validation"]) == 1
    metrics = whole.fit()
    assert {"dice_rv_cavity", "dice_lv_myocardium", "dice_lv_cavity", "dice_mean"} <= set(metrics)
    assert (tmp_path / "whole" / "best.safetensors").is_file() and (tmp_path / "whole" / "validation.csv").read_text().count("\n") == 3
    first = SegmentationTrainer(SegTrainConfig(**{**config.to_dict(), "out_dir": str(tmp_path / "split")}))
    first.fit(until_step=3)  # interrupted half-way
    resumed = SegmentationTrainer(SegTrainConfig(**{**config.to_dict(), "out_dir": str(tmp_path / "split")}), resume=True)
    assert resumed.step == 3
    resumed.fit()
    for key, value in whole.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # Options changed on resume hold from then on: the weight decay of the restored optimiser too.
    changed = SegmentationTrainer(SegTrainConfig(**{**config.to_dict(), "out_dir": str(tmp_path / "split"), "weight_decay": 0.05, "learning_rate": 1e-2}), resume=True)
    assert changed.optimizer.param_groups[0]["weight_decay"] == 0.05 != config.weight_decay
    changed.train_step()
    assert changed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 7 / 100)  # step 6 of the 100-step warm-up, towards the new peak


def test_a_few_hundred_steps_learn_the_phantom(labelled_folder, tmp_path):
    config = SegTrainConfig(data=(str(labelled_folder),), out_dir=str(tmp_path), model="tiny", steps=150, batch_size=8, validate_every=150, checkpoint_every=150, val_fraction=0.25, learning_rate=3e-3)
    metrics = SegmentationTrainer(config).fit()
    assert metrics["dice_lv_cavity"] > 0.4, metrics  # untrained: about 0.1 (see the 6-step run above)


def test_segment_returns_labels_on_the_input_grid(phantom, tiny_segmenter_file):
    model = load_segmenter(tiny_segmenter_file)
    calls = []
    labels = segment(phantom.sparse, model, progress=lambda d, t, m: calls.append((d, t)))
    assert labels.shape == phantom.sparse.shape and labels.same_geometry(phantom.sparse)
    assert labels.metadata["source_dtype"] == "uint8" and set(np.unique(labels.data)) <= {0.0, 1.0, 2.0, 3.0}
    assert calls[-1][0] == calls[-1][1] == phantom.sparse.n_frames * phantom.sparse.n_slices
    with pytest.raises(InputError, match="missing.safetensors: model file not found"):
        load_segmenter(tiny_segmenter_file.parent / "missing.safetensors")
    from calid.inference.pipeline import untrained_model
    from calid.models.checkpoint import save_model

    calid_model = untrained_model("tiny")
    other = save_model(tiny_segmenter_file.parent / "calid.safetensors", calid_model.config, calid_model.vae, calid_model.net)
    with pytest.raises(InputError, match="is a 'calid' model, not a segmentation model"):
        load_segmenter(other)


def test_largest_component_clean_up():
    volume = np.zeros((3, 20, 20), dtype=np.uint8)
    volume[:, 5:12, 5:12] = 3
    volume[1, 14:16, 14:16] = 3  # a second LV piece in one slice: dropped
    volume[0, 0:2, 18:20] = 1  # a detached false positive far from the heart: dropped
    clean = keep_largest_components(volume, (1, 2, 3))
    assert clean[1, 14:16, 14:16].sum() == 0 and clean[0, 0:2, 18:20].sum() == 0
    assert (clean == 3).sum() == 3 * 49


def test_dice_per_structure():
    truth = np.zeros((4, 4), dtype=np.uint8)
    truth[:2] = 3
    predicted = truth.copy()
    predicted[0] = 0
    dice = dice_per_structure(predicted, truth, (1, 3))
    assert dice[3] == pytest.approx(2 * 4 / (4 + 8)) and np.isnan(dice[1])


def test_cli_segment_lax_surfaces_and_volumes(phantom, tiny_segmenter_file, tmp_path):
    image = write_stack(phantom.dense, tmp_path / "dense.nii.gz", dtype="int16")
    sparse = write_stack(phantom.sparse, tmp_path / "sparse.nii.gz", dtype="int16")
    dense_labels = write_stack(phantom.dense_labels, tmp_path / "dense_labels.nii.gz", dtype="uint8")
    sparse_labels = write_stack(phantom.sparse_labels, tmp_path / "sparse_labels.nii.gz", dtype="uint8")

    segmented = run_calid("segment", str(sparse), str(tmp_path / "seg.nii.gz"), "--model", str(tiny_segmenter_file), "--quiet")
    assert segmented.returncode == 0, segmented.stderr
    assert read_stack(tmp_path / "seg.nii.gz").shape == phantom.sparse.shape
    assert "no geometry" not in segmented.stderr
    bare = write_stack(phantom.sparse.with_data(phantom.sparse.data, spacing=(1.0, 1.0, 1.0)), tmp_path / "bare.nii.gz", dtype="int16")
    flagged = run_calid("segment", str(bare), str(tmp_path / "bare_seg.nii.gz"), "--model", str(tiny_segmenter_file), "--quiet")
    assert flagged.returncode == 0 and "calid segment: warning:" in flagged.stderr and "carries no geometry" in flagged.stderr

    lax = run_calid("lax", str(image), "--labels", str(dense_labels), "--compare", str(sparse), "--out", str(tmp_path / "lax"), "--frame", "1")
    assert lax.returncode == 0, lax.stderr
    planes = json.loads((tmp_path / "lax" / "planes.json").read_text())
    assert set(planes["planes"]) == {"4-chamber", "2-chamber", "3-chamber", "short-axis"}
    four = read_stack(tmp_path / "lax" / "4-chamber.nii.gz", min_slices=1)
    np.testing.assert_allclose(four.direction[:, 2], planes["planes"]["4-chamber"]["normal"], atol=1e-5)
    assert (tmp_path / "lax" / "2-chamber.png").read_bytes().startswith(b"\x89PNG")

    centre = phantom.dense.index_to_physical([32, 32, 30]) * [-1, -1, 1]  # RAS
    along = phantom.dense.index_to_physical([32, 32, 60]) * [-1, -1, 1]
    side = phantom.dense.index_to_physical([50, 32, 30]) * [-1, -1, 1]
    # Compared with a cine of half the frames over the same beat, at the last frame (beyond its count).
    half = write_stack(phantom.dense.select_frames(list(range(0, phantom.dense.n_frames, 2))), tmp_path / "half.nii.gz", dtype="int16")
    last = phantom.dense.n_frames - 1
    user = run_calid("lax", str(image), "--out", str(tmp_path / "user"), "--compare", str(half), "--frame", str(last),
                     "--points-ras", ";".join(",".join(f"{v:.4f}" for v in p) for p in (centre, along, side)))
    assert user.returncode == 0, user.stderr
    assert (tmp_path / "user" / "user.png").is_file()
    compared = json.loads((tmp_path / "user" / "planes.json").read_text())["compared_frames"]["half"]
    assert compared == {"frame": last // 2, "matched_by": "trigger time"}
    normal_ras = np.cross(along - centre, side - centre)
    by_plane = run_calid("lax", str(image), "--out", str(tmp_path / "plane"), "--plane-ras", ";".join(",".join(f"{v:.4f}" for v in p) for p in (centre, normal_ras, side - centre)))
    assert by_plane.returncode == 0, by_plane.stderr
    plane_json = json.loads((tmp_path / "plane" / "planes.json").read_text())["planes"]["user"]
    np.testing.assert_allclose(plane_json["centre_ras"], centre, atol=1e-3)
    np.testing.assert_allclose(np.abs(np.dot(plane_json["normal_ras"], normal_ras / np.linalg.norm(normal_ras))), 1.0, atol=1e-6)

    surfaces = run_calid("surfaces", str(dense_labels), "--out", str(tmp_path / "surf"), "--frames", "0", "--format", "stl", "--render")
    assert surfaces.returncode == 0, surfaces.stderr
    assert sorted(p.name for p in (tmp_path / "surf").iterdir()) == ["frame000_lv_cavity.stl", "frame000_lv_myocardium.stl", "frame000_render.png", "frame000_rv_cavity.stl"]

    volumes = run_calid("volumes", str(sparse_labels), str(dense_labels), "--out", str(tmp_path / "vol"))
    assert volumes.returncode == 0, volumes.stderr
    assert "EF" in volumes.stdout and (tmp_path / "vol" / "volumes.csv").is_file() and (tmp_path / "vol" / "volume_curves.png").is_file()

    no_lv = write_stack(phantom.dense_labels.with_data(np.where(phantom.dense_labels.data == 3, 0, phantom.dense_labels.data)), tmp_path / "no_lv.nii.gz", dtype="uint8")
    failed = run_calid("lax", str(image), "--labels", str(no_lv), "--out", str(tmp_path / "bad"))
    assert failed.returncode == 2 and "LV cavity" in failed.stderr and "points" in failed.stderr


def test_cli_lax_refuses_labels_off_the_image_and_warns_about_labels_of_another_heart(phantom, tmp_path):
    image = write_stack(phantom.dense, tmp_path / "dense.nii.gz", dtype="int16")
    own = write_stack(phantom.dense_labels, tmp_path / "labels.nii.gz", dtype="uint8")
    fits = run_calid("lax", str(image), "--labels", str(own), "--out", str(tmp_path / "own"))
    assert fits.returncode == 0 and "warning" not in fits.stderr.lower(), fits.stderr
    # A file that lost its geometry (all 1 mm, at the origin) lies elsewhere: refused in words about the labels, not the planes.
    lost = write_stack(phantom.dense_labels.with_data(phantom.dense_labels.data, spacing=(1.0, 1.0, 1.0), origin=(500.0, 500.0, 500.0)), tmp_path / "lost.nii.gz", dtype="uint8")
    off = run_calid("lax", str(image), "--labels", str(lost), "--out", str(tmp_path / "off"))
    assert off.returncode == 2 and "lost.nii.gz: does not lie on the image" in off.stderr and "geometry was probably lost" in off.stderr
    assert "check the coordinates" not in off.stderr and not (tmp_path / "off").exists()
    # Another heart on the same grid: here the cavity and the myocardium swapped, so the dark muscle lies under the "cavity".
    swapped_data = phantom.dense_labels.data.copy()
    swapped_data[phantom.dense_labels.data == 2], swapped_data[phantom.dense_labels.data == 3] = 3, 2
    swapped = write_stack(phantom.dense_labels.with_data(swapped_data), tmp_path / "swapped.nii.gz", dtype="uint8")
    warned = run_calid("lax", str(image), "--labels", str(swapped), "--out", str(tmp_path / "swapped"))
    assert warned.returncode == 0 and "calid lax: warning: " in warned.stderr and "LV cavity is not brighter than their myocardium" in warned.stderr, warned.stderr


def test_cli_lax_with_labels_of_one_phase_a_plane_beside_the_heart_and_same_named_comparisons(phantom, tmp_path):
    image = write_stack(phantom.dense, tmp_path / "dense.nii.gz", dtype="int16")
    es = phantom.es_frame
    # Labels of the end-systolic frame only (calid segment --frames ES), the image shown at that frame.
    es_labels = write_stack(phantom.dense_labels.select_frames([es]), tmp_path / "es_labels.nii.gz", dtype="uint8")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_stack(phantom.sparse, tmp_path / folder / "dense.nii.gz", dtype="int16")  # the input's own name, twice
    lax = run_calid("lax", str(image), "--labels", str(es_labels), "--frame", str(es), "--out", str(tmp_path / "lax"),
                    "--compare", str(tmp_path / "a" / "dense.nii.gz"), str(tmp_path / "b" / "dense.nii.gz"))
    assert lax.returncode == 0, lax.stderr
    assert "the labels have 1 frame(s)" in lax.stderr
    compared = json.loads((tmp_path / "lax" / "planes.json").read_text())["compared_frames"]
    assert sorted(compared) == ["a/dense", "b/dense"]

    # An acquired long-axis cine (one slice per frame) to compare with; one the stack does not reach leaves no folder.
    from calid.geometry.planes import Plane, standard_planes
    from calid.geometry.reslice import reslice

    plane = standard_planes(phantom.dense_labels, 0)["2-chamber"]
    acquired = write_stack(reslice(phantom.dense, plane, 1.5), tmp_path / "acquired_2ch.nii.gz")
    compared = run_calid("lax", str(image), "--labels", str(es_labels), "--frame", str(es), "--acquired-lax", str(acquired), "--out", str(tmp_path / "acq"))
    assert compared.returncode == 0, compared.stderr
    assert json.loads((tmp_path / "acq" / "planes.json").read_text())["comparison_with_acquired"]["input"]["psnr_db"] > 30
    far = write_stack(reslice(phantom.dense, Plane("far", plane.centre + 500 * plane.normal, plane.normal, plane.u), 1.5, size_mm=(60, 60)), tmp_path / "far_2ch.nii.gz")
    missed = run_calid("lax", str(image), "--labels", str(es_labels), "--frame", str(es), "--acquired-lax", str(far), "--out", str(tmp_path / "missed"))
    assert missed.returncode == 2 and "does not reach" in missed.stderr and not (tmp_path / "missed").exists()

    # Labels of two phases, with no frame times on either file to say which: refused, not guessed.
    untimed = write_stack(phantom.dense.with_data(phantom.dense.data, frame_times_ms=None), tmp_path / "untimed.nii.gz", dtype="int16")
    two = write_stack(phantom.dense_labels.with_data(phantom.dense_labels.data[[0, es]], frame_times_ms=None, metadata={}), tmp_path / "two.nii.gz", dtype="uint8")
    assert read_stack(untimed).frame_times_ms is None and read_stack(two).frame_times_ms is None
    guessed = run_calid("lax", str(untimed), "--labels", str(two), "--frame", str(es), "--out", str(tmp_path / "guessed"))
    assert guessed.returncode == 2 and "no frame times to tell which phases" in guessed.stderr
    # Labels of `calid segment --frames 0,ES` record which frames they are: the shown phase is found by number.
    recorded = write_stack(phantom.dense_labels.with_data(phantom.dense_labels.data, frame_times_ms=None, metadata={}).select_frames([0, es]), tmp_path / "recorded.nii.gz", dtype="uint8")
    found = run_calid("lax", str(untimed), "--labels", str(recorded), "--frame", str(es), "--out", str(tmp_path / "found"))
    assert found.returncode == 0, found.stderr
    assert "come from label frame 1 (matched by recorded frame numbers)" in found.stderr
    # The other way round: the image a selection of the cine, the labels of the whole cine.
    untimed_labels = write_stack(phantom.dense_labels.with_data(phantom.dense_labels.data, frame_times_ms=None, metadata={}), tmp_path / "all_labels.nii.gz", dtype="uint8")
    selection = write_stack(read_stack(untimed).select_frames([0, es]), tmp_path / "ed_es.nii.gz", dtype="int16")
    whole = run_calid("lax", str(selection), "--labels", str(untimed_labels), "--frame", "1", "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert f"come from label frame {es} (matched by recorded frame numbers)" in whole.stderr
    # volumes says which frames of the cine the recorded labels are
    measured = run_calid("volumes", str(recorded), "--out", str(tmp_path / "function"))
    assert measured.returncode == 0 and f"ES frame 1 (cine frame {es})" in measured.stdout
    table = list(csv.DictReader(io.StringIO((tmp_path / "function" / "volumes.csv").read_text().split("\n\n")[0])))
    assert [(row["frame"], row["cine_frame"]) for row in table] == [("0", "0"), ("1", str(es))]
    last = run_calid("lax", str(untimed), "--labels", str(recorded), "--frame", "-1", "--out", str(tmp_path / "last"))
    assert last.returncode == 0 and "come from label frame 0" in last.stderr, last.stderr  # -1: the last frame, next in the cycle to frame 0
    # An input inside --out named like a view would be replaced by it: refused, also with --overwrite.
    (tmp_path / "views").mkdir()
    acquired_in_out = write_stack(read_stack(acquired, min_slices=1), tmp_path / "views" / "2-chamber.nii.gz")
    clash = run_calid("lax", str(image), "--labels", str(es_labels), "--frame", str(es), "--acquired-lax", str(acquired_in_out), "--out", str(tmp_path / "views"), "--overwrite")
    assert clash.returncode == 2 and "is an input of this command" in clash.stderr and read_stack(acquired_in_out, min_slices=1).n_frames == phantom.dense.n_frames

    # A plane 300 mm away from the heart (coordinates from another study, or LPS typed as RAS): refused, nothing written.
    far = phantom.dense.index_to_physical([32, 32, 30]) * [-1, -1, 1] + [0, 0, 300]
    beside = run_calid("lax", str(image), "--out", str(tmp_path / "far"), "--plane-ras", ";".join(",".join(f"{v:.4f}" for v in p) for p in (far, (0, 0, 1), (1, 0, 0))))
    assert beside.returncode == 2 and "does not cross the image" in beside.stderr and "RAS" in beside.stderr
    assert not (tmp_path / "far").exists()


def test_shipped_segmenter_reaches_its_stated_dice_on_held_out_subjects():
    """The installed default segmentation model, on the labelled ACDC frames it never saw in training."""
    from calid.models.registry import default_model, verify

    entry = default_model("segmentation")
    assert entry is not None and entry.path.parent == REPO_ROOT / "Resources" / "Models", "the shipped segmentation model is not registered"
    model = load_segmenter(verify(entry))
    held_out = model.info["training_data"]["validation"]
    assert held_out and set(held_out).isdisjoint(model.info["training_data"]["train"])
    scores: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for subject in held_out:
        for label_path in sorted(shared_file("acdc_edes_labels").glob(f"{subject}_frame*_gt.nii.gz")):
            image = read_stack(label_path.with_name(label_path.name.replace("_gt", "")))
            truth = read_stack(label_path)
            for value, dice in dice_per_structure(segment(image, model).data, np.rint(truth.data), (1, 2, 3)).items():
                scores[value].append(dice)
    mean = float(np.mean([np.mean(v) for v in scores.values()]))
    assert mean >= model.info["metrics"]["dice_mean"] - 0.01  # what the model card states
    assert mean >= 0.80 and min(np.mean(v) for v in scores.values()) >= 0.70  # what a clinician can rely on


def test_heart_centre_of_a_full_field_of_view_scan_and_centre_on_heart_upsampling(tmp_path):
    """The shipped segmenter finds the heart of a full field-of-view ACDC volume near the centre of
    its reference labels; ``calid upsample --centre-on-heart`` puts the model's crop there."""
    from calid.data.preprocess import label_centre_lps
    from calid.models.registry import default_model
    from calid.segmentation import heart_centre_lps

    assert default_model("segmentation") is not None, "the shipped segmentation model is not registered"
    image_path = shared_file("acdc_edes_labels", "patient011_frame01.nii.gz")  # a validation subject of the segmenter
    image, truth = read_stack(image_path), read_stack(image_path.with_name("patient011_frame01_gt.nii.gz"))
    found, expected = heart_centre_lps(image), label_centre_lps(truth)
    field_centre = image.index_to_physical([(image.shape[3] - 1) / 2, (image.shape[2] - 1) / 2, (image.n_slices - 1) / 2])
    assert np.linalg.norm(found - expected) < 8.0, (found, expected)
    assert np.linalg.norm(found - expected) < np.linalg.norm(field_centre - expected)  # better than the field-of-view centre
    out = tmp_path / "dense.nii.gz"
    done = run_calid("upsample", str(image_path), str(out), "--factor", "2", "--mode", "latent-linear", "--model", "untrained:tiny", "--centre-on-heart")
    assert done.returncode == 0, done.stderr
    assert "centring the model's crop on the heart" in done.stdout
    both = run_calid("upsample", str(image_path), str(tmp_path / "x.nii.gz"), "--model", "untrained:tiny", "--centre-on-heart", "--centre-ras", "0,0,0")
    assert both.returncode == 2 and "not both" in both.stderr


def test_a_model_the_user_installs_takes_precedence_over_the_shipped_one(tiny_segmenter_file, tmp_path, monkeypatch):
    """calid install puts models in the user's folder: made the default, or given a shipped model's
    name, the user's model is the one that runs (the shipped one used to win silently)."""
    from calid.models.registry import default_model, install_model, registered_models, resolve_model

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    shipped = default_model("segmentation")
    assert shipped is not None and shipped.path.parent == REPO_ROOT / "Resources" / "Models"
    same_name = install_model(tiny_segmenter_file, shipped.name)  # not made the default
    assert resolve_model(shipped.name, "segmentation") == same_name.path
    assert [m.path for m in registered_models() if m.name == shipped.name] == [same_name.path]
    assert resolve_model(None, "segmentation") == same_name.path  # the default's name, found first in the user's folder
    mine = install_model(tiny_segmenter_file, "my-seg", default=True)
    assert default_model("segmentation").name == "my-seg" and resolve_model(None, "segmentation") == mine.path


def test_segmentation_training_takes_subjects_from_their_folders(tmp_path):
    """One folder per subject with generic file names (P001/sa.nii.gz, P001/sa_gt.nii.gz): every
    subject was 'sa', so no validation subject could be held out and no best model was ever written."""
    root = tmp_path / "data"
    for index in range(4):
        ph = make_phantom(40 + index, PhantomConfig(n_frames=1, matrix=48, pixel_spacing_mm=3.0))
        (root / f"P{index:03d}").mkdir(parents=True)
        write_stack(ph.sparse, root / f"P{index:03d}" / "sa.nii.gz", dtype="int16")
        write_stack(ph.sparse_labels, root / f"P{index:03d}" / "sa_gt.nii.gz", dtype="uint8")
    trainer = SegmentationTrainer(SegTrainConfig(data=(str(root),), out_dir=str(tmp_path / "out"), model="tiny", steps=1, val_fraction=0.25))
    assert trainer.subjects["validation"] and set(trainer.subjects["validation"]) | set(trainer.subjects["train"]) == {"P000", "P001", "P002", "P003"}
    single = tmp_path / "single"
    (single / "P000").mkdir(parents=True)
    for name in ("sa.nii.gz", "sa_gt.nii.gz"):
        (single / "P000" / name).write_bytes((root / "P000" / name).read_bytes())
    with pytest.raises(InputError, match="no validation subject could be held out: 1 subject"):
        SegmentationTrainer(SegTrainConfig(data=(str(single),), out_dir=str(tmp_path / "out2"), model="tiny", steps=1))


def test_cli_train_seg_end_to_end_and_resume(labelled_folder, tmp_path):
    """calid train seg as a user runs it: a best model that calid segment takes, and --resume continues."""
    out = tmp_path / "seg"
    common = ["train", "seg", "--data", str(labelled_folder), "--out", str(out), "--config", "tiny", "--batch-size", "4",
              "--validate-every", "2", "--checkpoint-every", "2", "--val-fraction", "0.25", "--device", "cpu"]
    first = subprocess.run([sys.executable, "-m", "calid", *common, "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "step 0 -> 2" in first.stdout and "done at step 2" in first.stdout
    best = out / "best.safetensors"
    assert load_segmenter(best).config.name == "tiny"
    # --resume alone continues with the run's own options (size, batch, split), not the defaults
    resumed = subprocess.run([sys.executable, "-m", "calid", "train", "seg", "--data", str(labelled_folder), "--out", str(out), "--steps", "4", "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "step 2 -> 4" in resumed.stdout and "done at step 4" in resumed.stdout
    assert "--config tiny" in resumed.stdout and "--batch-size 4" in resumed.stdout and "--val-fraction 0.25" in resumed.stdout
    from calid.training.state import read_training_extra

    saved = read_training_extra(out / "checkpoints" / "last.safetensors")["train_config"]
    assert (saved["model"], saved["batch_size"], saved["val_fraction"], saved["validate_every"]) == ("tiny", 4, 0.25, 2)
    # a new run into it is refused, and numbers the optimiser would misuse, by name (in-process: quick)
    from calid.cli import main

    assert main([*common, "--steps", "2"]) == 2
    assert main([*common, "--steps", "2", "--lr", "0", "--out", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()
    assert read_training_extra(out / "checkpoints" / "last.safetensors")["step"] == 4
    # a VAE run's folder is no segmentation run to resume
    wrong = subprocess.run([sys.executable, "-m", "calid", "train", "vae", "--data", str(labelled_folder), "--out", str(out), "--resume"], capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "not of a vae run" in wrong.stderr
    image = sorted(labelled_folder.glob("*_frame00.nii.gz"))[0]
    segmented = subprocess.run([sys.executable, "-m", "calid", "segment", str(image), str(tmp_path / "labels.nii.gz"), "--model", str(best), "--quiet"],
                               capture_output=True, text=True, timeout=600)
    assert segmented.returncode == 0, segmented.stderr
    assert read_stack(tmp_path / "labels.nii.gz").shape == read_stack(image).shape


def test_volumes_of_separate_ed_and_es_label_files(tmp_path):
    """ACDC's layout (one label file per phase): measured as the frames of one cine, giving the EF,
    checked against voxel counts (Simpson's rule on 10 mm slices: every voxel's volume)."""
    import re

    from calid.cli import main

    ed_path = shared_file("acdc_edes_labels", "patient011_frame01_gt.nii.gz")
    es_path = shared_file("acdc_edes_labels", "patient011_frame08_gt.nii.gz")
    ed, es = read_stack(ed_path), read_stack(es_path)
    voxel_ml = float(np.prod(ed.spacing)) / 1000.0
    edv, esv = float((ed.data == 3).sum()) * voxel_ml, float((es.data == 3).sum()) * voxel_ml
    out = tmp_path / "function"
    result = subprocess.run([sys.executable, "-m", "calid", "volumes", str(ed_path), str(es_path), "--frames-of-one-cine", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    found = re.search(r"LV EDV ([\d.]+) ml, ESV ([\d.]+) ml, SV [\d.]+ ml, EF ([\d.]+) %", result.stdout)
    assert found is not None, result.stdout
    assert float(found.group(1)) == pytest.approx(edv, abs=0.06) and float(found.group(2)) == pytest.approx(esv, abs=0.06)
    assert float(found.group(3)) == pytest.approx(100 * (edv - esv) / edv, abs=0.06)
    other = write_stack(ed.with_data(ed.data, spacing=(2.0, 2.0, 10.0)), tmp_path / "other_gt.nii.gz", dtype="uint8")
    assert main(["volumes", str(ed_path), str(other), "--frames-of-one-cine", "--out", str(tmp_path / "x")]) == 2


def test_small_fields_of_view_are_padded_as_in_training():
    """A cine cropped around the heart (ACDC's cines are ~150 mm) is smaller than the network's
    patch: padded with its own border values, as in training, the held-out subjects' heart-centred
    96-pixel crops are segmented about as well as the full scans (constant padding: myocardium 0.82)."""
    from calid.models.registry import default_model
    from calid.segmentation.inference import pad_like_training

    batch = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    padded, (rows, columns) = pad_like_training(batch, 8)
    assert padded.shape == (2, 1, 8, 8) and torch.equal(padded[..., rows, columns], batch)
    assert torch.equal(padded[..., 0, columns], batch[..., 0, :]) and torch.equal(padded[..., rows, -1], batch[..., :, -1])  # edges repeated
    assert pad_like_training(batch, 2)[0] is batch  # large enough: untouched

    model = load_segmenter(default_model("segmentation").path)
    scores: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for subject in model.info["training_data"]["validation"]:
        for label_path in sorted(shared_file("acdc_edes_labels").glob(f"{subject}_frame*_gt.nii.gz")):
            image, truth = read_stack(label_path.with_name(label_path.name.replace("_gt", ""))), read_stack(label_path)
            heart = np.argwhere(truth.data[0] > 0)
            cy, cx = heart[:, 1].mean().astype(int), heart[:, 2].mean().astype(int)
            rows, columns = slice(max(0, cy - 48), cy + 48), slice(max(0, cx - 48), cx + 48)
            crop = image.with_data(np.ascontiguousarray(image.data[:, :, rows, columns]))
            for value, dice in dice_per_structure(segment(crop, model).data, np.rint(truth.data[:, :, rows, columns]), (1, 2, 3)).items():
                scores[value].append(dice)
    assert np.mean(scores[2]) > 0.85 and np.mean(scores[1]) > 0.88 and np.mean(scores[3]) > 0.95
