"""The evaluation harness (``calid evaluate``): statistics, subject and label discovery, the
per-gap interpolation it scores, and the whole run on phantoms and on real ACDC data."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest

from calid.cli import main
from calid.data.io import read_stack, write_stack
from calid.data.phantom import PhantomConfig, make_phantom
from calid.data.preprocess import preprocess
from calid.errors import InputError
from calid.evaluation.harness import SCHEMA, EvaluationConfig, evaluate, expand_subjects, find_label_files, load_evaluation_subjects, mean_ci
from calid.evaluation.metrics import psnr
from calid.inference.pipeline import load_pipeline, untrained_model
from calid.models.checkpoint import save_model
from calid.models.config import named_config

from conftest import SHARED_DATA, shared_file


def test_mean_ci_matches_the_t_table():
    result = mean_ci([1.0, 2.0, 3.0, float("nan")])
    # sd = 1, n = 3, t(0.975, 2) = 4.3027 (statistics tables): half width 4.3027 / sqrt(3).
    assert result["n"] == 3
    assert result["mean"] == pytest.approx(2.0)
    assert result["ci95"] == pytest.approx([2.0 - 4.3027 / math.sqrt(3), 2.0 + 4.3027 / math.sqrt(3)], abs=1e-3)
    assert mean_ci([5.0])["n"] == 1 and math.isnan(mean_ci([5.0])["ci95"][0])
    assert mean_ci([])["n"] == 0


def test_confidence_intervals_stay_within_what_a_metric_can_take():
    """Three Dice scores near 1 with one low one: the t interval reaches past 1, the reported one stops at 1."""
    dice = [0.99, 0.98, 0.80]
    unbounded = mean_ci(dice)
    assert unbounded["ci95"][1] > 1.0  # the raw interval overshoots: the case this guards against
    bounded = mean_ci(dice, "dice LV cavity")
    assert bounded["ci95"] == [pytest.approx(unbounded["ci95"][0]), 1.0] and bounded["mean"] == unbounded["mean"]
    assert mean_ci([0.01, 0.02, 0.3], "lpips")["ci95"][0] == 0.0 and mean_ci([0.5, 2.0, 9.0], "hd95_mm")["ci95"][0] == 0.0
    assert mean_ci([-0.2, 0.9, 0.95], "ssim")["ci95"][0] == -1.0
    assert mean_ci([20.0, 30.0, 31.0], "psnr")["ci95"] == mean_ci([20.0, 30.0, 31.0])["ci95"]  # PSNR has no bound to clip to


def test_subject_ranges_and_unknown_subjects():
    available = [f"patient{i:03d}" for i in range(1, 12)]
    assert expand_subjects(["patient003..patient005", "patient010"], available) == ["patient003", "patient004", "patient005", "patient010"]
    with pytest.raises(InputError, match="patient099"):
        expand_subjects(["patient099"], available)


def test_bad_evaluation_data_leaves_no_report_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "eval"
    with pytest.raises(InputError, match="empty"):
        evaluate(EvaluationConfig(data=(str(empty),), out_dir=str(out), model="untrained:tiny", tasks=(1,), methods=("linear",)))
    assert not out.exists()
    (tmp_path / "report.txt").write_text("not a folder")
    with pytest.raises(InputError, match="not a folder"):
        evaluate(EvaluationConfig(data=("phantom:1",), out_dir=str(tmp_path / "report.txt"), model="untrained:tiny", tasks=(1,), methods=("linear",)))


def test_label_files_are_found_by_acdc_frame_numbers_and_checked(tmp_path, small_phantom):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    write_stack(small_phantom.sparse, images / "subj01_4d.nii.gz")
    es = small_phantom.es_frame
    write_stack(small_phantom.sparse_labels.select_frames([es]), labels / f"subj01_frame{es + 1:02d}_gt.nii.gz", dtype="uint8")
    assert find_label_files(labels, "subj01") == {es: labels / f"subj01_frame{es + 1:02d}_gt.nii.gz"}
    subjects = load_evaluation_subjects(EvaluationConfig(data=(str(images),), out_dir=str(tmp_path / "out"), labels=str(labels)))
    assert [s.subject for s in subjects] == ["subj01"] and subjects[0].name == "subj01_4d"
    assert subjects[0].frames == [es]  # "labelled" frames by default
    np.testing.assert_array_equal(subjects[0].labels[es], small_phantom.sparse_labels.data[es])
    # A label file that does not fit its cine is refused, naming the file.
    write_stack(small_phantom.sparse_labels.select_frames([0]).with_data(small_phantom.sparse_labels.data[:1, :-1]), labels / "subj01_frame01_gt.nii.gz", dtype="uint8")
    with pytest.raises(InputError, match="subj01_frame01_gt"):
        load_evaluation_subjects(EvaluationConfig(data=(str(images),), out_dir=str(tmp_path / "out"), labels=str(labels)))


def test_folders_per_subject_with_the_same_file_name_are_scored_each_on_its_own_data(tmp_path):
    """P001/sa.nii.gz and P002/sa.nii.gz: every result is keyed by volume name, so the names must differ."""
    phantoms = {f"P00{i}": make_phantom(40 + i, PhantomConfig(n_frames=2, matrix=48, n_slices=5)) for i in (1, 2)}
    for subject, phantom in phantoms.items():
        (tmp_path / "data" / subject).mkdir(parents=True)
        write_stack(phantom.sparse, tmp_path / "data" / subject / "sa.nii.gz")
    config = EvaluationConfig(data=(str(tmp_path / "data"),), out_dir=str(tmp_path / "out"), model="untrained:tiny", tasks=(1,), methods=("linear",), frames="all")
    subjects = load_evaluation_subjects(config)
    assert sorted(s.name for s in subjects) == ["P001_sa", "P002_sa"]
    for volume in subjects:
        np.testing.assert_array_equal(volume.stack.data, read_stack(tmp_path / "data" / volume.subject / "sa.nii.gz").data)
    results = evaluate(config)
    psnr = {row["subject"]: row["psnr"] for row in results["task1"]["per_subject"] if row["method"] == "linear"}
    assert set(psnr) == {"P001", "P002"} and psnr["P001"] != psnr["P002"]


def test_single_frame_copies_beside_a_subjects_cine_are_not_scored_twice(tmp_path, small_phantom):
    """ACDC's own folders hold patient001_4d and patient001_frame01 (the same ED frame) side by side."""
    folder = tmp_path / "patient001"
    folder.mkdir()
    write_stack(small_phantom.sparse, folder / "patient001_4d.nii.gz")
    write_stack(small_phantom.sparse.select_frames([0]), folder / "patient001_frame01.nii.gz")
    write_stack(small_phantom.sparse_labels.select_frames([0]), folder / "patient001_frame01_gt.nii.gz", dtype="uint8")
    with pytest.warns(UserWarning, match="patient001_frame01"):
        subjects = load_evaluation_subjects(EvaluationConfig(data=(str(tmp_path),), out_dir=str(tmp_path / "out")))
    assert [s.name for s in subjects] == ["patient001_4d"]
    assert subjects[0].frames == [0]  # its labelled ED frame, found from the frame file's labels
    # A labelled volume of the subject that is not a copy of a cine frame (another grid, another scan) stays.
    other = small_phantom.sparse.select_frames([0])
    write_stack(other.with_data(other.data[:, :, ::-1].copy()), folder / "patient001_sa_ed.nii.gz")
    write_stack(small_phantom.sparse_labels.select_frames([0]), folder / "patient001_sa_ed_gt.nii.gz", dtype="uint8")
    with pytest.warns(UserWarning, match="patient001_frame01"):
        names = [s.name for s in load_evaluation_subjects(EvaluationConfig(data=(str(tmp_path),), out_dir=str(tmp_path / "out")))]
    assert names == ["patient001_4d", "patient001_sa_ed"]


def test_interpolate_slices_is_the_engine_on_one_gap(small_phantom):
    pipeline = load_pipeline("untrained:tiny", "cpu")
    cropped, _ = preprocess(small_phantom.sparse, pipeline.config.preprocess)
    previous, following = cropped.data[0, 2:6], cropped.data[0, 4:8]
    np.testing.assert_allclose(pipeline.interpolate_slices(previous, following, "linear"), (previous + following) / 2)
    keys = [(0, 0, z) for z in range(3, 7)]
    whole = pipeline.interpolate_slices(previous, following, "calid", 2, keys, batch_size=4)
    split = pipeline.interpolate_slices(previous, following, "calid", 2, keys, batch_size=1)
    np.testing.assert_allclose(whole, split, atol=1e-4)  # batch size changes float summation order only
    other_seed = pipeline.interpolate_slices(previous, following, "calid", 2, [(1, 0, z) for z in range(3, 7)], batch_size=4)
    assert np.abs(other_seed - whole).max() > 1e-3
    baseline = pipeline.interpolate_slices(previous, following, "inversion-slerp", 2, keys)
    assert baseline.shape == previous.shape and np.all(np.abs(baseline) <= 1.0)
    with pytest.raises(InputError, match="crops"):
        pipeline.interpolate_slices(previous[:, :8], following[:, :8], "calid")


def test_test_time_augmented_methods_are_scored_beside_the_plain_ones(tmp_path):
    out = tmp_path / "tta"
    config = EvaluationConfig(
        data=("phantom:1",), out_dir=str(out), model="untrained:tiny", methods=("linear", "calid", "calid-tta"), tasks=(1, 4), steps=1,
        phantoms=1, factor=2, batch_size=32,
    )
    evaluate(config, command="test")
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"] == ["linear", "calid", "calid-tta"]
    summary = saved["task1"]["summary"]
    assert summary["calid-tta"]["slices"] == summary["calid"]["slices"] > 0
    assert summary["calid-tta"]["psnr"]["mean"] != pytest.approx(summary["calid"]["psnr"]["mean"], abs=1e-4)
    assert {"calid", "calid-tta"} <= set(saved["task4"]["summary"])
    assert "calid-tta" in (out / "report.md").read_text()
    with pytest.raises(InputError, match="calid-tta"):
        EvaluationConfig(data=("phantom:1",), out_dir=str(out), methods=("calid-ttx",))


def test_evaluation_end_to_end_on_two_phantoms(tmp_path, offline_lpips_weights):
    out = tmp_path / "report"
    config = EvaluationConfig(
        data=("phantom:2",), out_dir=str(out), model="untrained:tiny", baseline_steps=2, steps=2,
        sweep_steps=(1, 2), sweep_slices=4, phantoms=1, factor=2, batch_size=32,
    )
    results = evaluate(config, command="test")
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == SCHEMA
    assert set(saved) >= {"command", "config", "model", "methods", "subjects", "task1", "task2", "task3", "task4", "figures", "seconds"}
    assert saved["model"]["untrained"] is True
    assert saved["methods"] == ["linear", "registration", "latent-linear", "inversion-slerp", "calid", "calid+"]
    assert saved["subjects"] == ["phantom2000", "phantom2001"]
    assert [v["frames"] for v in saved["volumes"]] == [[0, v["labelled_frames"][1]] for v in saved["volumes"]]
    # Task 1: every method on every interior slice of the labelled frames (ED and ES), 8 interior slices each.
    summary = saved["task1"]["summary"]
    for method in saved["methods"]:
        assert summary[method]["slices"] == 2 * 2 * 8
        assert set(summary[method]) >= {"psnr", "ssim", "lpips", "ms_per_slice", "frechet_alexnet"}
        assert summary[method]["psnr"]["n"] == 2
    # The linear baseline's PSNR, recomputed here from the phantoms' own slices.
    expected = []
    for subject in results["volumes"]:
        from calid.data.phantom import make_phantom
        from calid.evaluation.harness import evaluation_phantom_config

        phantom = make_phantom(int(subject["subject"][len("phantom"):]), evaluation_phantom_config())
        cropped, _ = preprocess(phantom.sparse, untrained_model("tiny").config.preprocess)
        values = []
        for t in subject["frames"]:
            d = (cropped.data[t] + 1) / 2
            values.extend(psnr(np.clip((d[:-2] + d[2:]) / 2, 0, 1), np.clip(d[1:-1], 0, 1)))
        expected.append(np.mean(values))
    assert summary["linear"]["psnr"]["mean"] == pytest.approx(np.mean(expected), abs=1e-3)
    # An untrained autoencoder destroys the image: the linear baseline must beat it.
    assert summary["linear"]["psnr"]["mean"] > summary["latent-linear"]["psnr"]["mean"] + 3
    # Perceptually too (LPIPS from the offline AlexNet weights; without them, a note says why).
    if offline_lpips_weights is not None:
        assert 0.0 <= summary["linear"]["lpips"]["mean"] < summary["latent-linear"]["lpips"]["mean"]
    else:
        assert any("AlexNet weights could not be loaded" in note for note in saved["task1"]["notes"])
    with open(out / "task1_per_subject.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(saved["methods"]) and {r["subject"] for r in rows} == {"phantom2000", "phantom2001"}
    # Registration, like linear, needs no network: it scores the same neighbours, and its reference line is in Task 2's figure.
    assert summary["registration"]["psnr"]["mean"] > summary["latent-linear"]["psnr"]["mean"] + 3
    assert set(saved["task2"]["references"]) == {"linear", "registration", "latent-linear"}
    # Task 2: both modes at each step count.
    assert [(r["method"], r["steps"]) for r in saved["task2"]["rows"]] == [("calid", 1), ("calid", 2), ("calid+", 1), ("calid+", 2)]
    # Task 3: the real-slice upper bound and every method, per structure, with Dice in [0, 1].
    task3 = saved["task3"]["summary"]
    assert set(task3) == {"real", *saved["methods"]}
    for structures in task3.values():
        for scores in structures.values():
            assert scores["dice"]["mean"] is None or 0.0 <= scores["dice"]["mean"] <= 1.0
    # Task 4: the phantom truth; the linear baseline on thin phantom gaps is far better than an untrained model.
    task4 = saved["task4"]["summary"]
    assert {"linear", "calid", "truth image", "sparse stack (Simpson's)"} <= set(task4)
    assert task4["linear"]["psnr"]["mean"] > task4["calid"]["psnr"]["mean"]
    errors = [v for row in saved["task4"]["per_subject"] for k, v in row.items() if "abs error" in k and not math.isnan(v)]
    assert errors and min(errors) >= 0  # absolute errors: over- and under-estimates do not cancel in the means
    for name in ("report.md", "task3_per_subject.csv", "task4_per_subject.csv", "steps.png", "examples.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "UNTRAINED MODEL" in report and "## Task 1" in report and "## Task 4" in report


def test_inversion_slerp_needs_a_denoiser_trained_with_condition_dropout(tmp_path):
    model = untrained_model("tiny")
    path = save_model(tmp_path / "no-dropout.safetensors", model.config, model.vae, model.net)
    results = evaluate(
        EvaluationConfig(data=("phantom:1",), out_dir=str(tmp_path / "out"), model=str(path), tasks=(1,), steps=1, batch_size=32), command="test"
    )
    assert "inversion-slerp" not in results["methods"]
    assert "condition dropout" in results["skipped_methods"]["inversion-slerp"]
    assert "inversion-slerp" in (tmp_path / "out" / "report.md").read_text()


def test_cli_evaluate_on_real_acdc_labelled_frames(tmp_path, capsys):
    labels = shared_file("acdc_edes_labels", "patient011_frame01_gt.nii.gz").parent
    out = tmp_path / "acdc"
    code = main(["evaluate", "--data", str(labels), "--subjects", "patient011,patient001", "--methods", "linear", "--tasks", "1,3", "--out", str(out), "--quiet"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    # The ED and ES files of one subject are two volumes pooled into one subject.
    assert results["subjects"] == ["patient001", "patient011"]
    assert sorted(v["volume"] for v in results["volumes"]) == ["patient001_frame01", "patient001_frame12", "patient011_frame01", "patient011_frame08"]
    assert len(results["task1"]["per_subject"]) == 2 and len(results["task1"]["per_volume"]) == 4
    # Labels found beside the images (NAME_gt): the shipped segmenter agrees with them on the acquired slices.
    real = results["task3"]["summary"]["real"]
    assert real["LV cavity"]["dice"]["mean"] > 0.85
    assert real["LV myocardium"]["dice"]["mean"] > 0.7
    # patient001 is one of the shipped segmenter's training subjects (its card lists them): flagged.
    assert results["task3"]["segmenter_training_subjects"] == ["patient001"]
    assert "trained on 1 of these 2 subjects (patient001)" in (out / "report.md").read_text()
    # patient011 validated the shipped segmenter (its checkpoint was chosen on it): said too
    assert "checkpoint was chosen by its validation Dice on 1 of these subjects (patient011)" in (out / "report.md").read_text()
    assert str(out / "report.md") in capsys.readouterr().out


def test_cli_evaluate_real_cine_uses_ed_and_es_from_info_cfg(tmp_path):
    shared_file("acdc_cine", "patient061_4d.nii.gz")
    out = tmp_path / "cine"
    assert main(["evaluate", "--data", str(SHARED_DATA / "acdc_cine"), "--subjects", "patient061", "--methods", "linear", "--tasks", "1", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    info = (SHARED_DATA / "acdc_cine" / "patient061_Info.cfg").read_text()
    ed, es = (int(line.split(":")[1]) - 1 for line in info.splitlines() if line.startswith(("ED", "ES")))
    assert results["volumes"][0]["frames"] == sorted({ed, es})
    stack = read_stack(SHARED_DATA / "acdc_cine" / "patient061_4d.nii.gz")
    assert results["task1"]["summary"]["linear"]["slices"] == len({ed, es}) * (stack.n_slices - 2)
    # Bad method names are refused before any work.
    assert main(["evaluate", "--methods", "cubic", "--out", str(tmp_path / "x")]) == 2


def test_evaluation_gives_files_without_geometry_the_pixel_size_the_model_assumed(tmp_path):
    """ACDC cines saved at NIfTI's default 1 x 1 x 1 mm reach the model at the scale its training
    assumed for them (recorded in the model file), unless told otherwise; the report says so."""
    path = shared_file("acdc_cine", "patient011_4d.nii.gz")
    assert read_stack(path).has_placeholder_spacing
    model = untrained_model("tiny")
    assumed = {"note": "no geometry", "assumed_mm": 1.5, "subjects": ["patient002"]}
    model_file = save_model(tmp_path / "m.safetensors", model.config, model.vae, model.net, 1.0, {"training_data": {"placeholder_spacing": assumed}})

    def run(name, *extra):
        out = tmp_path / name
        assert main(["evaluate", "--data", str(path.parent), "--subjects", "patient011", "--model", str(model_file), "--methods", "linear",
                     "--tasks", "1", "--out", str(out), "--quiet", *extra]) == 0
        return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()

    by_model, report = run("model")
    assert by_model["placeholder_spacing"] == {"assumed_mm": 1.5, "volumes": ["patient011_4d"]}
    assert "taken as 1.5 mm" in report and "patient011_4d" in report
    kept, kept_report = run("keep", "--placeholder-spacing", "keep")
    assert "placeholder_spacing" not in kept and "taken as" not in kept_report
    # kept at 1 mm, by choice or because no model records a size: said too (not like for like with a model's report)
    assert kept["placeholder_spacing_kept"] == {"volumes": ["patient011_4d"], "why": "--placeholder-spacing keep"}
    assert "1 volume(s) carry no geometry (1 x 1 x 1 mm) and were scored at 1 mm pixels (--placeholder-spacing keep): patient011_4d" in kept_report
    assert "crop and pixel sizes from" in kept_report  # --model given, though linear needs none
    out = tmp_path / "no-model"
    assert main(["evaluate", "--data", str(path.parent), "--subjects", "patient011", "--methods", "linear", "--tasks", "1", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["placeholder_spacing_kept"]["why"] == "no model records a pixel size for such files"
    assert "crop and pixel sizes from" not in (out / "report.md").read_text()
    assert "placeholder_spacing_kept" not in by_model
    # The crop covers another part of the image, so the slices scored differ.
    assert by_model["task1"]["summary"]["linear"]["psnr"]["mean"] != kept["task1"]["summary"]["linear"]["psnr"]["mean"]
    explicit, _ = run("mm", "--placeholder-spacing", "1.5")
    assert explicit["task1"]["summary"]["linear"]["psnr"]["mean"] == by_model["task1"]["summary"]["linear"]["psnr"]["mean"]
    assert main(["evaluate", "--data", str(path.parent), "--subjects", "patient011", "--model", str(model_file), "--methods", "linear",
                 "--tasks", "1", "--out", str(tmp_path / "bad"), "--quiet", "--placeholder-spacing", "huge"]) == 2
    assert not (tmp_path / "bad").exists()  # refused before the report folder is made
    # A 2D+T model trained with another assumption: both models see the 2D model's pixels, and the report says so.
    temporal = untrained_model("tiny-2d+t")
    other = {"note": "no geometry", "assumed_mm": 1.7, "subjects": ["patient002"]}
    temporal_file = save_model(tmp_path / "t.safetensors", temporal.config, temporal.vae, temporal.net, 1.0, {"training_data": {"placeholder_spacing": other}})
    both, both_report = run("both", "--temporal-model", str(temporal_file), "--steps", "1", "--frames", "0-1")
    assert both["placeholder_disagreement"] == {"model_mm": 1.5, "temporal_model_mm": 1.7, "volumes": ["patient011_4d"]}
    assert "The 2D+T model's training assumed 1.7 mm" in both_report and both["placeholder_spacing"]["assumed_mm"] == 1.5
    assert "placeholder_disagreement" not in by_model
    # A 2D model that recorded nothing: the 2D+T model's size is the only one, and both see it.
    out = tmp_path / "only-temporal"
    assert main(["evaluate", "--data", str(path.parent), "--subjects", "patient011", "--model", "untrained:tiny", "--temporal-model", str(temporal_file),
                 "--methods", "linear", "--tasks", "1", "--steps", "1", "--frames", "0-1", "--out", str(out), "--quiet"]) == 0
    only_temporal = json.loads((out / "results.json").read_text())
    assert only_temporal["placeholder_spacing"]["assumed_mm"] == 1.7 and "placeholder_disagreement" not in only_temporal
    # A file with its geometry is never changed.
    reliable = shared_file("acdc_cine", "patient061_4d.nii.gz")
    assert not read_stack(reliable).has_placeholder_spacing  # patient061 keeps its true header (the data's manifest)
    subjects = load_evaluation_subjects(EvaluationConfig(data=(str(reliable),), out_dir=str(tmp_path / "x")), placeholder_spacing_mm=1.5)
    assert subjects[0].assumed_spacing_mm is None and subjects[0].stack.spacing == read_stack(reliable).spacing


def test_task1_scores_only_the_part_of_the_crop_inside_the_image(tmp_path):
    """A field of view smaller than the model's crop: the padding (-1 in truth and prediction alike)
    is left out, so the scores are those of the image, not inflated by zero-error pixels."""
    from calid.data.phantom import PhantomConfig, make_phantom

    phantom = make_phantom(5, PhantomConfig(n_frames=1, matrix=24, pixel_spacing_mm=2.0, n_slices=8))  # 48 mm, the tiny crop 57.6 mm
    images = tmp_path / "images"
    images.mkdir()
    write_stack(phantom.sparse, images / "small_fov.nii.gz")
    out = tmp_path / "report"
    saved = evaluate(EvaluationConfig(data=(str(images),), out_dir=str(out), model="untrained:tiny", tasks=(1,), methods=("linear", "latent-linear")), command="test")
    cropped, params = preprocess(read_stack(images / "small_fov.nii.gz"), untrained_model("tiny").config.preprocess)
    # Crop pixel (i, j) shows resampled image pixel start + (i, j): inside the image or padding.
    rows = np.arange(params.crop_size_yx[0]) + params.crop_start_yx[0]
    columns = np.arange(params.crop_size_yx[1]) + params.crop_start_yx[1]
    inside = ((rows >= 0) & (rows < params.resampled_shape_yx[0]))[:, None] & ((columns >= 0) & (columns < params.resampled_shape_yx[1]))[None, :]
    assert 0.3 < inside.mean() < 0.9
    assert np.all(cropped.data[..., ~inside] == -1.0)  # the part left out is padding only
    d = np.clip((cropped.data[0] + 1) / 2, 0, 1)
    linear, truth = (d[:-2] + d[2:]) / 2, d[1:-1]
    shape = (len(truth), int(inside.any(axis=1).sum()), int(inside.any(axis=0).sum()))
    inside_psnr = np.mean(psnr(linear[:, inside].reshape(shape), truth[:, inside].reshape(shape)))
    whole_crop_psnr = np.mean(psnr(linear, truth))
    task1 = saved["task1"]
    assert task1["summary"]["linear"]["psnr"]["mean"] == pytest.approx(inside_psnr, abs=1e-3)
    assert whole_crop_psnr > inside_psnr + 0.5  # what scoring the padding would have reported
    assert task1["scored_fraction"] == pytest.approx(inside.mean())
    assert any("padding is left out" in note for note in task1["notes"])
    assert "padding is left out" in (out / "report.md").read_text()


def test_task3_fills_the_slices_outside_the_crop_by_linear_interpolation_not_with_the_truth(small_phantom):
    """The engine interpolates linearly outside the model's crop: the segmentation task must do the
    same, or every method would be scored partly on the true slice."""
    from calid.evaluation.harness import _Triplets, paste_predictions
    from calid.inference.pipeline import seam_weight

    frame = small_phantom.sparse.select_frames([0])  # 192 mm field of view, the tiny crop 57.6 mm
    cropped, params = preprocess(frame, untrained_model("tiny").config.preprocess)
    interior = list(range(1, frame.n_slices - 1))
    data = _Triplets(cropped.data[0, :-2], cropped.data[0, 2:], cropped.data[0, 1:-1], [(0, 0, n) for n in interior], cropped, params)
    weight = seam_weight(params)
    assert (weight == 0).mean() > 0.5
    pasted = paste_predictions(frame, data.truth, data, weight, interior).data[0]
    linear = 0.5 * (frame.data[0, :-2] + frame.data[0, 2:])
    outside = weight == 0
    np.testing.assert_allclose(pasted[1:-1][:, outside], linear[:, outside], rtol=1e-6)
    assert not np.allclose(pasted[1:-1][:, outside], frame.data[0, 1:-1][:, outside])
    np.testing.assert_array_equal(pasted[[0, -1]], frame.data[0, [0, -1]])  # acquired neighbours untouched
    inside = weight == 1
    error_inside = np.abs(pasted[1:-1][:, inside] - frame.data[0, 1:-1][:, inside]).mean()
    assert error_inside < 0.5 * np.abs(linear[:, inside] - frame.data[0, 1:-1][:, inside]).mean()  # the (here perfect) prediction is used there


def test_linear_is_scored_on_the_named_models_crop_whichever_methods_run_with_it(tmp_path):
    """A baseline-only run loads no network; it must still score the crop the model would use."""
    common = dict(data=("phantom:1",), model="untrained:tiny", tasks=(1,), frames="all")
    alone = evaluate(EvaluationConfig(out_dir=str(tmp_path / "alone"), methods=("linear",), **common))
    together = evaluate(EvaluationConfig(out_dir=str(tmp_path / "together"), methods=("linear", "latent-linear"), **common))
    assert alone["crop"] == together["crop"] and tuple(alone["crop"]["crop_size"]) == named_config("tiny").preprocess.crop_size
    linear = [[row for row in run["task1"]["per_subject"] if row["method"] == "linear"] for run in (alone, together)]
    assert linear[0] == [{**row, "ms_per_slice": linear[0][i]["ms_per_slice"]} for i, row in enumerate(linear[1])]


def test_a_folder_evaluated_again_keeps_only_this_runs_tables_and_figures(tmp_path):
    out = tmp_path / "eval"
    first = evaluate(EvaluationConfig(data=("phantom:1",), out_dir=str(out), model="untrained:tiny", tasks=(1,), methods=("linear",), frames="all"))
    assert first["tables"] == ["task1_per_subject.csv"] and (out / "task1_per_subject.csv").is_file() and (out / "examples.png").is_file()
    again = evaluate(EvaluationConfig(data=("phantom:1",), out_dir=str(out), model="untrained:tiny", tasks=(2,), methods=("calid",), sweep_steps=(1,), frames="all"))
    assert again["tables"] == [] and again["figures"] == ["steps.png"]
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json", "steps.png"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tasks=(2,), sweep_steps=(0, 4)), "--sweep-steps: needs step counts of at least 1"),
        (dict(tasks=(1, 2), sweep_steps=(1, 5000)), "--sweep-steps: the number of DDIM steps must be an integer from 1 to"),
        (dict(tasks=(4,), phantoms=0), "--phantoms: Task 4 needs at least 1 phantom"),
    ],
)
def test_bad_task_options_are_refused_before_any_task_runs(tmp_path, options, message):
    out = tmp_path / "eval"
    with pytest.raises(InputError, match=re.escape(message)):
        evaluate(EvaluationConfig(data=("phantom:1",), out_dir=str(out), model="untrained:tiny", methods=("calid",), **options))
    assert not out.exists()


def test_pooling_a_subjects_volumes_weights_each_metric_by_the_slices_it_was_measured_on():
    """ED and ES volumes of one subject: a distance that exists on 1 of 7 slices of one volume must
    count as 1 slice, not 7, against a volume where it exists on all 7."""
    from calid.evaluation.harness import pool_by_subject

    rows = [
        {"subject": "P1", "method": "linear", "slices": 7, "dice": 0.8, "hd95_mm": 20.0, "slices dice": 7, "slices hd95_mm": 1},
        {"subject": "P1", "method": "linear", "slices": 7, "dice": 0.6, "hd95_mm": 4.0, "slices dice": 7, "slices hd95_mm": 7},
    ]
    [pooled] = pool_by_subject(rows, ("method",), ("dice", "hd95_mm"), weight="slices")
    assert pooled["dice"] == pytest.approx(0.7) and pooled["slices"] == 14
    assert pooled["hd95_mm"] == pytest.approx((20.0 * 1 + 4.0 * 7) / 8) and pooled["slices hd95_mm"] == 8


def test_a_volume_with_too_few_slices_is_left_out_with_a_warning_not_the_whole_run(tmp_path, small_phantom):
    folder = tmp_path / "data"
    folder.mkdir()
    write_stack(small_phantom.sparse, folder / "subj01_4d.nii.gz")
    two = small_phantom.sparse.with_data(small_phantom.sparse.data[:, :2])
    write_stack(two, folder / "subj02_4d.nii.gz")
    config = EvaluationConfig(data=(str(folder),), out_dir=str(tmp_path / "out"), frames="all")
    with pytest.warns(UserWarning, match="subj02_4d.nii.gz: not evaluated: 2 slice"):
        subjects = load_evaluation_subjects(config)
    assert [s.subject for s in subjects] == ["subj01"]
    # the report says so too (a warning scrolls away; the report is what is kept)
    with pytest.warns(UserWarning, match="subj02_4d.nii.gz: not evaluated"):
        results = evaluate(replace(config, methods=("linear",), tasks=(1,), frames="0"), command="test")
    assert results["not_evaluated"] == ["subj02_4d.nii.gz (2 slice(s), and a slice is predicted from two neighbours)"]
    assert "- Not evaluated: subj02_4d.nii.gz (2 slice(s)" in (tmp_path / "out" / "report.md").read_text()
    (folder / "subj01_4d.nii.gz").unlink()
    with pytest.warns(UserWarning), pytest.raises(InputError, match="no volume with 3 or more slices"):
        load_evaluation_subjects(config)


def test_subjects_the_model_was_trained_on_are_flagged(tmp_path):
    """Scores on a model's own training subjects are optimistic: the command line and the report say
    which, from the training record in the model file (a fine-tune's starting model's subjects too)."""
    model = untrained_model("tiny")

    def model_file(name, training_data):
        return save_model(tmp_path / f"{name}.safetensors", model.config, model.vae, model.net, 1.0, {"training_data": training_data})

    trained = model_file("m", {"train_subjects": ["phantom2000", "patient099"], "validation_subjects": ["phantom2001", "phantom2005"]})
    config = EvaluationConfig(data=("phantom:2",), out_dir=str(tmp_path / "report"), model=str(trained), methods=("linear", "calid"), tasks=(1,), steps=1, batch_size=32)
    with pytest.warns(UserWarning, match=r"m\.safetensors was trained on 1 of the evaluated subjects \(phantom2000\): its scores on them are optimistic"):
        results = evaluate(config, command="test")
    assert results["trained_on_evaluated_subjects"] == {str(trained): ["phantom2000"]}
    assert f"**Not held out**: the model {trained} was trained on 1 of these subjects (phantom2000)" in (tmp_path / "report" / "report.md").read_text()
    held_out = EvaluationConfig(data=("phantom:2",), out_dir=str(tmp_path / "other"), model="untrained:tiny", methods=("linear", "calid"), tasks=(1,), steps=1, batch_size=32)
    assert "trained_on_evaluated_subjects" not in evaluate(held_out, command="test")
    # --subjects held-out: the model's recorded validation subjects that the data hold (the others named)
    with pytest.warns(UserWarning, match=r"1 of the model's 2 held-out subjects are not in the data, and are not scored: phantom2005"):
        recorded = evaluate(replace(config, out_dir=str(tmp_path / "held-out"), subjects=("held-out",)), command="test")
    assert recorded["subjects"] == ["phantom2001"] and "trained_on_evaluated_subjects" not in recorded
    # ... also when only pixel methods run (no network is loaded): the subjects come from the model file named
    pixel_only = evaluate(replace(config, out_dir=str(tmp_path / "held-out-linear"), subjects=("held-out",), methods=("linear",)), command="test")
    assert pixel_only["subjects"] == ["phantom2001"]
    with pytest.raises(InputError, match="held-out: no trained model is given"):
        evaluate(replace(config, out_dir=str(tmp_path / "no-model"), subjects=("held-out",), methods=("linear",), model=None), command="test")
    with pytest.raises(InputError, match="held-out: the model untrained:tiny records no validation subjects"):
        evaluate(replace(config, out_dir=str(tmp_path / "untrained"), subjects=("held-out",), methods=("linear",), model="untrained:tiny"), command="test")
    with pytest.raises(InputError, match=r"holds none of the model's held-out subjects \(phantom2001, phantom2005\)"):
        evaluate(replace(config, data=("phantom:1",), out_dir=str(tmp_path / "none-there"), subjects=("held-out",)), command="test")
    with pytest.raises(InputError, match="held-out: the model untrained:tiny records no validation subjects"):
        evaluate(replace(held_out, out_dir=str(tmp_path / "none"), subjects=("held-out",)), command="test")
    # a fine-tune: the subjects its starting model learnt count as seen, and are not "held out"
    tuned = model_file("tuned", {"train_subjects": ["patient099"], "validation_subjects": ["phantom2000", "phantom2001"],
                                 "initialised_from": {"file": "m.safetensors", "train_subjects": ["phantom2000"]}})
    with pytest.warns(UserWarning, match=r"tuned\.safetensors was trained on 1 of the evaluated subjects \(phantom2000\)"):
        evaluate(replace(config, model=str(tuned), out_dir=str(tmp_path / "tuned")), command="test")
    assert evaluate(replace(config, model=str(tuned), out_dir=str(tmp_path / "tuned-held-out"), subjects=("held-out",)), command="test")["subjects"] == ["phantom2001"]
    # the autoencoder is part of the model: the subjects its first-stage training learnt count as seen too
    second_stage = model_file("two-stages", {"train_subjects": ["patient099"], "validation_subjects": ["phantom2000", "phantom2001"],
                                             "autoencoder": {"file": "vae.safetensors", "train_subjects": ["phantom2001"]}})
    with pytest.warns(UserWarning, match=r"two-stages\.safetensors was trained on 1 of the evaluated subjects \(phantom2001\)"):
        evaluate(replace(config, model=str(second_stage), out_dir=str(tmp_path / "two-stages")), command="test")
    assert evaluate(replace(config, model=str(second_stage), out_dir=str(tmp_path / "two-stages-held-out"), subjects=("held-out",)), command="test")["subjects"] == ["phantom2000"]


def test_single_frames_of_a_subject_scored_beside_its_cine_on_another_grid_are_warned_about(tmp_path):
    """ACDC's full field-of-view ED / ES files and its cropped cine are the same anatomy on two grids:
    pooled, those phases would count twice in the subject's mean."""
    cine = shared_file("acdc_cine", "patient011_4d.nii.gz")
    frames = shared_file("acdc_edes_labels", "patient011_frame01.nii.gz")
    together = EvaluationConfig(data=(str(cine), str(frames)), out_dir=str(tmp_path / "out"), subjects=("patient011",))
    with pytest.warns(UserWarning, match=r"1 single-frame volume\(s\) are scored beside their subject's cine \(patient011_frame01\).*count twice"):
        volumes = load_evaluation_subjects(together)
    assert sorted(v.name for v in volumes) == ["patient011_4d", "patient011_frame01"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each folder alone: nothing to say
        load_evaluation_subjects(replace(together, data=(str(frames),)))
