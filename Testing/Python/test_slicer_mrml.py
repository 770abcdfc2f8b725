"""The Slicer glue (CaLIDSlicerLib) on a real, headless MRML scene from the slicer-core wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calid.data.io import read_stack, write_stack
from calid.data.phantom import PhantomConfig, make_phantom
from calid.errors import InputError
from calid.geometry.planes import standard_planes
from calid.geometry.volumes import cardiac_function

from conftest import REPO_ROOT, oblique_stack

import slicer  # noqa: E402 - slicer-core is a test requirement: a broken install must fail, not skip
sys.path.insert(0, str(REPO_ROOT / "CaLIDSlicer"))
from CaLIDSlicerLib import mrml  # noqa: E402


@pytest.fixture()
def scene():
    """A scene with the application, Sequences and Segmentations logics, as Slicer sets it up."""
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    colours = slicer.vtkSlicerColorLogic()
    colours.SetMRMLApplicationLogic(application)
    logics = [colours, slicer.vtkSlicerSequencesLogic(), slicer.vtkSlicerSegmentationsModuleLogic()]
    for logic in logics:
        logic.SetMRMLScene(scene)
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    scene.application_logic = application  # for the offscreen slice views
    yield scene
    for logic in logics:
        logic.SetMRMLScene(None)
    slicer.mrmlScene = previous


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(8, PhantomConfig(n_frames=3, matrix=64, pixel_spacing_mm=3.0))


def test_volume_node_round_trip_keeps_geometry_and_type(scene):
    stack = oblique_stack(frames=1, slices=4)
    node = mrml.volume_from_stack(scene, stack, "oblique")
    back = mrml.stack_from_volume(node)
    assert back.same_geometry(stack) and back.metadata["source_dtype"] == "int16"
    np.testing.assert_array_equal(back.data, stack.data)
    # RAS in MRML: the LPS origin with x and y negated.
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose([matrix.GetElement(r, 3) for r in range(3)], np.asarray(stack.origin) * [-1, -1, 1], atol=1e-9)


def test_a_double_volume_node_upsampled_keeps_its_acquired_slices_bit_for_bit(scene):
    """Slicer volumes are often doubles (after a filter, from a script): float32 would round them."""
    from calid.inference import upsample_linear

    reference = oblique_stack(frames=1, slices=3)
    values = np.random.default_rng(5).uniform(0, 1, reference.shape) / 3.0
    node = mrml.volume_from_stack(scene, reference.with_data(values, metadata={"source_dtype": "float64"}), "doubles")
    stack = mrml.stack_from_volume(node)
    output = mrml.volume_from_stack(scene, upsample_linear(stack, 2), "doubles x2")
    dense = slicer.util.arrayFromVolume(output)
    assert dense.dtype == np.float64
    np.testing.assert_array_equal(dense[::2], values[0])


def test_sequence_round_trip_with_frame_times_and_seq_nrrd(scene, tmp_path):
    stack = oblique_stack(frames=3, slices=4)
    sequence, browser = mrml.sequence_from_stack(scene, stack, "cine")
    assert sequence.GetNumberOfDataNodes() == 3 and browser.GetProxyNode(sequence) is not None
    back = mrml.stack_from_sequence(sequence)
    assert back.same_geometry(stack)
    np.testing.assert_array_equal(back.data, stack.data)
    np.testing.assert_allclose(back.frame_times_ms, stack.frame_times_ms)
    # Written by Slicer's own sequence storage node, read by calid, and back.
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "cine.seq.nrrd"))
    assert storage.WriteData(sequence)
    from_file = read_stack(tmp_path / "cine.seq.nrrd")
    assert from_file.same_geometry(stack)
    np.testing.assert_allclose(from_file.data, stack.data)
    np.testing.assert_allclose(from_file.frame_times_ms, stack.frame_times_ms)
    write_stack(stack, tmp_path / "calid.seq.nrrd")
    loaded = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "loaded")
    reader = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(str(tmp_path / "calid.seq.nrrd"))
    assert reader.ReadData(loaded)
    assert mrml.stack_from_sequence(loaded).same_geometry(stack)


def test_sequence_with_mixed_grids_is_refused(scene):
    stack = oblique_stack(frames=2, slices=4)
    sequence, _ = mrml.sequence_from_stack(scene, stack, "cine")
    other = mrml.volume_from_stack(scene, oblique_stack(frames=1, slices=5), "other")
    sequence.SetDataNodeAtValue(other, "999")
    with pytest.raises(InputError, match="another grid"):
        mrml.stack_from_sequence(sequence)
    # the same voxel count at another voxel size is another grid too
    import vtk

    coarser = mrml.volume_from_stack(scene, oblique_stack(frames=1, slices=4), "coarser")
    matrix = vtk.vtkMatrix4x4()
    coarser.GetIJKToRASMatrix(matrix)
    for row in range(3):
        matrix.SetElement(row, 0, 2.0 * matrix.GetElement(row, 0))  # columns twice as wide
    coarser.SetIJKToRASMatrix(matrix)
    mixed, _ = mrml.sequence_from_stack(scene, stack, "mixed spacing")
    mixed.SetDataNodeAtValue(coarser, mixed.GetNthIndexValue(1))
    with pytest.raises(InputError, match="another grid"):
        mrml.stack_from_sequence(mixed)


def test_a_cine_without_frame_times_is_indexed_by_frame_number_not_by_made_up_times(scene):
    import dataclasses

    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    untimed = dataclasses.replace(oblique_stack(frames=3, slices=4), frame_times_ms=None)
    sequence, _ = mrml.sequence_from_stack(scene, untimed, "untimed")
    assert sequence.GetIndexName() == "frame" and sequence.GetIndexUnit() == ""
    assert [sequence.GetNthIndexValue(k) for k in range(3)] == ["0", "1", "2"]
    assert mrml.stack_from_sequence(sequence).frame_times_ms is None  # read back: still no times
    # a selection of frames keeps the input's own index values (here frame numbers 1 and 2)
    result = upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear", segment=False, frames="1,2"))
    output = result.output_node
    assert [output.GetNthIndexValue(k) for k in range(2)] == ["1", "2"] and output.GetIndexUnit() == ""
    assert result.dense.frame_times_ms is None and mrml.stack_from_sequence(output).frame_times_ms is None


def test_segmentation_with_closed_surfaces_in_place(scene, phantom):
    labels = phantom.dense_labels
    volume_display_nodes = scene.GetNumberOfNodesByClass("vtkMRMLVolumeDisplayNode")
    segmentation = mrml.segmentation_from_labels(scene, labels, "heart", frame=0)
    # The intermediate labelmap leaves nothing behind (a display node would be saved with the scene).
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeDisplayNode") == volume_display_nodes
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    segments = segmentation.GetSegmentation()
    names = sorted(segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments()))
    assert names == ["LV cavity", "LV myocardium", "RV cavity"]
    import vtk
    from vtk.util import numpy_support

    lv_id = next(segments.GetNthSegmentID(i) for i in range(3) if segments.GetNthSegment(i).GetName() == "LV cavity")
    surface = vtk.vtkPolyData()
    segmentation.GetClosedSurfaceRepresentation(lv_id, surface)
    points_ras = numpy_support.vtk_to_numpy(surface.GetPoints().GetData())
    z, y, x = np.nonzero(np.rint(labels.data[0]) == 3)
    centroid_lps = labels.index_to_physical(np.stack([x, y, z], axis=1).mean(axis=0))
    np.testing.assert_allclose(points_ras.mean(axis=0) * [-1, -1, 1], centroid_lps, atol=3.0)


def test_slice_nodes_on_the_long_axis_planes(scene, phantom):
    planes = standard_planes(phantom.dense_labels, 0)
    for name in ("4-chamber", "2-chamber", "3-chamber"):
        node = slicer.vtkMRMLSliceNode()
        scene.AddNode(node)
        matrix = mrml.orient_slice_node(node, planes[name])
        ras = planes[name].to_ras()
        np.testing.assert_allclose(matrix[:3, 2], -np.asarray(ras["normal"]), atol=1e-9)  # the same plane
        np.testing.assert_allclose(matrix[:3, 0], ras["u"], atol=1e-9)  # right on screen, as in the PNGs
        np.testing.assert_allclose(matrix[:3, 1], -np.asarray(ras["v"]), atol=1e-9)  # up on screen: apex side
        np.testing.assert_allclose(matrix[:3, 3], ras["centre"], atol=1e-9)
        np.testing.assert_allclose(np.cross(matrix[:3, 2], matrix[:3, 0]), matrix[:3, 1], atol=1e-9)


def test_volumes_table_and_plot(scene, phantom):
    results = {"dense": cardiac_function(phantom.dense_labels), "sparse": cardiac_function(phantom.sparse_labels)}
    table, chart = mrml.table_from_function(scene, results)
    assert table.GetNumberOfRows() == phantom.dense.n_frames and table.GetNumberOfColumns() == 1 + 3 * 2
    lv = slicer.util.arrayFromTableColumn(table, "LV ml (dense)")
    np.testing.assert_allclose(lv, results["dense"].lv_volume_ml)
    assert chart.GetNumberOfPlotSeriesNodes() == 4
    summary = mrml.summary_table_from_function(scene, results)
    assert summary.GetNumberOfColumns() == 3 and summary.GetNumberOfRows() == len(mrml.SUMMARY_ROWS)
    rows = [summary.GetCellText(row, 0) for row in range(summary.GetNumberOfRows())]
    ef_row = rows.index("LV ejection fraction (%)")
    for method, function in results.items():
        assert float(summary.GetCellText(ef_row, list(results).index(method) + 1)) == pytest.approx(function.summary["lv_ef_percent"], rel=1e-5)
    assert table.GetTable().GetColumnByName("time_ms") is not None and chart.GetXAxisTitle() == "time (ms)"
    # ED and ES of a cine without trigger times: plotted at their frame numbers in the cine, not as times.
    untimed = phantom.dense_labels.with_data(phantom.dense_labels.data, frame_times_ms=None).select_frames([0, phantom.es_frame])
    table, chart = mrml.table_from_function(scene, {"dense": cardiac_function(untimed)})
    assert chart.GetXAxisTitle() == "frame of the cine" and table.GetTable().GetColumnByName("time_ms") is None
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(table, "frame"), [0, phantom.es_frame])


def test_logic_blocking_call_end_to_end(scene, phantom, tmp_path):
    from calid.inference.pipeline import untrained_model
    from calid.models.checkpoint import save_model
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    model = untrained_model("tiny")
    model_file = save_model(tmp_path / "tiny.safetensors", model.config, model.vae, model.net)
    sequence, _ = mrml.sequence_from_stack(scene, phantom.sparse, "sparse cine")
    before = mrml.stack_from_sequence(sequence).data.copy()
    calls = []
    options = UpsamplingOptions(factor=2, mode="calid", steps=2, model=str(model_file), device="cpu", frames="0,2")
    result = upsample_node(scene, sequence, options, progress=lambda d, t, m: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1]
    out = mrml.stack_from_sequence(result.output_node)
    assert out.n_frames == 2 and out.n_slices == 2 * phantom.sparse.n_slices - 1
    np.testing.assert_allclose(out.slice_spacing, phantom.sparse.slice_spacing / 2, rtol=1e-6)
    np.testing.assert_allclose(out.data[:, ::2], phantom.sparse.data[[0, 2]], atol=0.5)  # stored as int16 like the input
    np.testing.assert_array_equal(mrml.stack_from_sequence(sequence).data, before)  # the input is untouched
    assert result.segmentation_node is not None and result.table_node.GetNumberOfRows() == 2
    assert set(result.planes) >= {"4-chamber", "2-chamber", "3-chamber"}
    # the names say which frames of the cine these are; the segmentation's frame is not called end-diastole
    shown = [0, 2][result.function["dense"].ed_frame]
    assert result.output_node.GetName() == "sparse cine calid x2 frames 0,2"
    assert result.segmentation_node.GetName() == f"sparse cine calid x2 frames 0,2 segmentation (frame {shown}, the largest LV of the 2 frames run)"
    again = upsample_node(scene, result.output_node, UpsamplingOptions(factor=2, mode="linear"))  # every frame of a selection: still a selection
    assert again.output_node.GetName().endswith("x2 frames 0,2") and again.segmentation_node.GetName().endswith("the largest LV of the 2 frames run)")
    # ... also from a scene saved before the selection attribute existed, or with it damaged (the upsampling record stays)
    from CaLIDSlicerLib.logic import SELECTION_ATTRIBUTE, stack_from_node

    for damaged in (None, "{not json"):
        if damaged is None:
            result.output_node.RemoveAttribute(SELECTION_ATTRIBUTE)
        else:
            result.output_node.SetAttribute(SELECTION_ATTRIBUTE, damaged)
        assert stack_from_node(result.output_node).acquired_slice_step() == 2
    old_scene = upsample_node(scene, result.output_node, UpsamplingOptions(factor=2, mode="linear", segment=False))
    assert old_scene.output_node.GetName().startswith("sparse cine calid x2 frames 0,2 linear x2 frames 0,2") and old_scene.output_node.GetDescription().endswith("Frame(s) 0, 2 of the cine.")
    one = upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear", frames="2"))
    assert one.output_node.GetName() == "sparse cine linear x2 frame 2" and one.segmentation_node.GetName().endswith("segmentation (frame 2)")
    assert one.output_node.GetDescription().endswith("the slices between are generated. Frame(s) 2 of the cine.")
    summary = one.summary_table_node  # one frame: its volumes, no end-diastole or ejection fraction claimed
    assert [summary.GetCellText(row, 0) for row in range(summary.GetNumberOfRows())] == ["LV volume (ml)", "RV volume (ml)", "LV mass (g)"]
    assert float(summary.GetCellText(0, 1)) == pytest.approx(one.function["dense"].lv_volume_ml[0], rel=1e-5)
    whole = upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear"))
    ed = whole.function["dense"].ed_frame
    assert "Frame(s)" not in whole.output_node.GetDescription()  # a whole cine: no frames to name
    assert whole.segmentation_node.GetName() == f"sparse cine linear x2 segmentation (frame {ed}, end-diastole)"
    # the volume curves of two runs can be told apart in a legend
    series = scene.GetNodesByClass("vtkMRMLPlotSeriesNode")
    names = [series.GetItemAsObject(i).GetName() for i in range(series.GetNumberOfItems())]
    assert len(names) == len(set(names)) == 16 and "sparse cine linear x2 function: LV ml (dense)" in names


def test_the_result_layout_shows_three_long_axis_views_the_3d_view_the_curves_and_the_summary(scene, phantom):
    """Slicer's own plot layouts give up a slice view or the 3D view; the result needs all of them."""
    layout = scene.AddNode(slicer.vtkMRMLLayoutNode())
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout.SetViewArrangement(mrml.result_layout(layout))
    assert mrml.result_layout(layout) == layout.GetViewArrangement()  # registered once, found again

    def tags(node_class):
        nodes = scene.GetNodesByClass(node_class)
        return {nodes.GetItemAsObject(i).GetSingletonTag(): nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())}

    assert {"Red", "Yellow", "Green"} <= set(tags("vtkMRMLSliceNode")) and "1" in tags("vtkMRMLViewNode")  # the panel's LAX_VIEWS and 3D
    results = {"dense": cardiac_function(phantom.dense_labels)}
    table, chart = mrml.table_from_function(scene, results)
    summary = mrml.summary_table_from_function(scene, results)
    mrml.show_function(scene, chart, summary)
    assert tags("vtkMRMLPlotViewNode")["PlotView1"].GetPlotChartNodeID() == chart.GetID()
    assert tags("vtkMRMLTableViewNode")["TableView1"].GetTableNodeID() == summary.GetID()
    layout_logic.SetMRMLScene(None)


def test_batch_script_code_path(scene, phantom, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.delenv("CALID_SHIPPED_MODEL_DIR", raising=False)  # the script sets it: restored after the test

    spec = importlib.util.spec_from_file_location("CaLIDBatch", REPO_ROOT / "Resources" / "CaLIDBatch.py")
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    source = write_stack(phantom.sparse, tmp_path / "cine.nii.gz", dtype="int16")
    code = batch.main([str(source), str(tmp_path / "out"), "--factor", "2", "--mode", "calid", "--steps", "1", "--model", "untrained:tiny", "--device", "cpu", "--frames", "0"], scene)
    assert code == 0
    dense = read_stack(tmp_path / "out" / "cine_calid_x2.nii.gz")
    assert dense.n_slices == 2 * phantom.sparse.n_slices - 1 and dense.n_frames == 1
    assert (tmp_path / "out" / "cine_calid_x2_volumes.csv").is_file() and "4-chamber" in (tmp_path / "out" / "cine_calid_x2_planes.json").read_text()
    # the same record as `calid lax` writes: LPS, with RAS under *_ras (a script reading both gets no mirrored points)
    planes = json.loads((tmp_path / "out" / "cine_calid_x2_planes.json").read_text())
    assert planes["coordinates"] == "LPS mm (RAS in the *_ras entries)"
    labels = tmp_path / "out" / "cine_calid_x2_labels.nii.gz"
    from calid.geometry.planes import standard_planes

    for name, plane in standard_planes(read_stack(labels), 0).items():  # the planes of the labels written, in LPS
        np.testing.assert_allclose(planes["planes"][name]["centre"], plane.centre, atol=1e-6)
        np.testing.assert_allclose(planes["planes"][name]["v"], plane.v, atol=1e-6)
        np.testing.assert_allclose(planes["planes"][name]["normal_ras"], plane.normal * [-1, -1, 1], atol=1e-6)
    corrected = labels.read_bytes()  # as if corrected by hand since: a second run must not replace it
    assert batch.main([str(source), str(tmp_path / "out"), "--factor", "2", "--mode", "calid", "--model", "untrained:tiny", "--frames", "0"], scene) == 2
    assert labels.read_bytes() == corrected
    # The segmentation fails (no such model): the dense stack is written, the exit status says what is missing.
    failed = [str(source), str(tmp_path / "out5"), "--factor", "2", "--mode", "linear", "--frames", "0", "--segmentation-model", str(tmp_path / "none.safetensors")]
    assert batch.main(failed, scene) == batch.SEGMENTATION_FAILED
    assert [p.name for p in (tmp_path / "out5").iterdir()] == ["cine_linear_x2.nii.gz"]
    # Again with --overwrite over a complete earlier run: its labels, volumes and planes go, not to sit beside the new stack.
    complete = [str(source), str(tmp_path / "out5"), "--factor", "2", "--mode", "linear", "--frames", "0", "--overwrite"]
    assert batch.main(complete, scene) == 0 and len(list((tmp_path / "out5").iterdir())) == 4
    assert batch.main(failed + ["--overwrite"], scene) == batch.SEGMENTATION_FAILED
    assert [p.name for p in (tmp_path / "out5").iterdir()] == ["cine_linear_x2.nii.gz"]
    assert batch.main([str(tmp_path / "missing.nii.gz"), str(tmp_path / "out2")], scene) == 2
    bad = [str(source), str(tmp_path / "out3"), "--factor", "2", "--model", "untrained:tiny", "--device", "cpu", "--placeholder-spacing", "huge"]
    assert batch.main(bad, scene) == 2 and not (tmp_path / "out3").exists()  # refused before anything is made
    # Without --mode: CaLID when a model is installed or given, else registration (no model ships yet).
    from calid.models.registry import default_model

    assert batch.main([str(source), str(tmp_path / "out4"), "--factor", "2", "--frames", "0", "--no-segmentation"], scene) == 0
    default_mode = "calid" if default_model("calid") is not None else "registration"
    assert [p.name for p in (tmp_path / "out4").iterdir()] == [f"cine_{default_mode}_x2.nii.gz"]


def test_batch_script_ends_slicer_on_any_failure(tmp_path):
    """Run as Slicer runs it: an unexpected error (here: no MRML scene, as in a bare Python) prints its
    traceback and exits 1, so that a headless Slicer never keeps running."""
    import subprocess

    source = write_stack(oblique_stack(frames=1), tmp_path / "in.nii.gz")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "Resources" / "CaLIDBatch.py"), str(source), str(tmp_path / "out"), "--mode", "linear"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr and "NoneType" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    usage = subprocess.run([sys.executable, str(REPO_ROOT / "Resources" / "CaLIDBatch.py"), "--factor"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_background_process_progress_and_cancel(phantom, tmp_path):
    """The worker the panel starts: progress lines are read as they come; killing it leaves no output."""
    import subprocess

    from CaLIDSlicerLib.logic import UpsamplingOptions
    from CaLIDSlicerLib.process import parse_progress, upsample_command, warnings_in

    source = write_stack(phantom.sparse, tmp_path / "in.seq.nrrd")
    done = upsample_command(source, tmp_path / "dense.seq.nrrd", UpsamplingOptions(factor=2, steps=1, model="untrained:tiny", device="cpu", frames="0", tta=True))
    finished = subprocess.run(done, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "averaged over 8 turns/mirrors" in finished.stderr  # the summary line; stdout holds the JSON progress only
    updates = [parse_progress(line) for line in finished.stdout.splitlines()]
    assert all(updates)
    assert updates and updates[-1]["done"] == updates[-1]["total"]
    assert read_stack(tmp_path / "dense.seq.nrrd").n_slices == 2 * phantom.sparse.n_slices - 1
    default_command = upsample_command(source, tmp_path / "default.seq.nrrd", UpsamplingOptions(factor=2, model="untrained:tiny", device="cpu", frames="0"))
    assert "--steps" not in default_command  # "model default" on the panel
    by_default = subprocess.run(default_command, capture_output=True, text=True, timeout=300)
    assert by_default.returncode == 0, by_default.stderr
    assert ", 8 steps, model untrained:tiny" in by_default.stderr  # the model's default (8 for an untrained one)
    assert any("UNTRAINED MODEL" in w for w in warnings_in(by_default.stderr))  # what the panel shows after the run
    # frames counted from the end (a value starting with a minus sign must not read as an option)
    last_two = subprocess.run(upsample_command(source, tmp_path / "last.seq.nrrd", UpsamplingOptions(factor=2, mode="linear", device="cpu", frames="-2,-1")),
                              capture_output=True, text=True, timeout=300)
    assert last_two.returncode == 0, last_two.stderr
    np.testing.assert_array_equal(read_stack(tmp_path / "last.seq.nrrd").data[:, ::2], read_stack(source).data[-2:])
    from CaLIDSlicerLib.process import segment_command

    assert "--frames=-2,-1" in segment_command(source, tmp_path / "labels.seq.nrrd", UpsamplingOptions(), frames="-2,-1")
    long_job = upsample_command(source, tmp_path / "killed.seq.nrrd", UpsamplingOptions(factor=16, mode="calid+", steps=32, model="untrained:tiny", device="cpu"))
    worker = subprocess.Popen(long_job, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert worker.stdout is not None
    for line in worker.stdout:  # wait for the first progress line, as the panel does
        if parse_progress(line):
            break
    worker.kill()
    worker.wait(timeout=30)
    assert not (tmp_path / "killed.seq.nrrd").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert parse_progress("not json") is None and parse_progress('{"done": 1}') is None


def test_extension_files_listed_in_cmake_exist_and_the_module_parses():
    import ast
    import re
    import xml.etree.ElementTree as ElementTree

    module_dir = REPO_ROOT / "CaLIDSlicer"
    cmake = (module_dir / "CMakeLists.txt").read_text()
    listed = [entry.replace("${MODULE_NAME}", "CaLIDSlicer") for entry in re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake, flags=re.M)]
    assert len(listed) >= 8
    for entry in listed:
        assert (module_dir / entry).is_file(), entry
    on_disk = {str(p.relative_to(module_dir)) for p in module_dir.rglob("*") if p.suffix in (".py", ".png", ".ui") and "__pycache__" not in p.parts}
    assert on_disk == set(listed), "every module file must be listed in CaLIDSlicer/CMakeLists.txt"
    top = (REPO_ROOT / "CMakeLists.txt").read_text()
    assert 'EXTENSION_DEPENDS "PyTorch"' in top and "add_subdirectory(CaLIDSlicer)" in top
    source = (module_dir / "CaLIDSlicer.py").read_text()
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"CaLIDSlicer", "CaLIDSlicerWidget", "CaLIDSlicerLogic", "CaLIDSlicerTest"} <= classes
    ui = ElementTree.parse(module_dir / "Resources" / "UI" / "CaLIDSlicer.ui")
    names = {w.get("name") for w in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used <= names, f"widgets used but missing from the .ui file: {used - names}"
    # A MRML widget that is not given the scene stays empty: each must follow the panel's scene.
    root = ui.getroot().find("widget")
    mrml_widgets = {w.get("name") for w in root.iter("widget") if w is not root and w.get("class", "").startswith(("qMRML", "qSlicer"))}
    given_the_scene = {
        c.findtext("receiver") for c in ui.iter("connection")
        if c.findtext("sender") == root.get("name") and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert {"inputSelector", "planePointsSelector", "planePointsPlaceWidget"} <= mrml_widgets
    assert mrml_widgets <= given_the_scene, f"MRML widgets without the scene: {mrml_widgets - given_the_scene}"
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    assert {w.get("class") for w in root.iter("widget")} - {"QWidget", "QLabel", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QCheckBox", "QLineEdit", "QPushButton", "QProgressBar"} <= declared


@pytest.mark.parametrize("mode", ["linear", "registration"])
def test_output_of_a_whole_cine_plays_in_the_input_browser(scene, phantom, mode):
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    sequence, browser = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    result = upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode=mode, segment=False))
    assert result.output_node.GetName().startswith(f"cine {mode} x2")
    assert result.browser_node is browser and browser.IsSynchronizedSequenceNode(result.output_node.GetID(), True)
    browser.SetSelectedItemNumber(2)
    proxy = browser.GetProxyNode(result.output_node)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(proxy)[::2], phantom.sparse.data[2], atol=0.5)


@pytest.mark.parametrize("frames", ["all", "0,2", "1"])
def test_cancelling_during_segmentation_leaves_the_scene_as_it_was(scene, phantom, frames):
    """Cancelled after the dense output was made, while segmenting: the output goes again (the
    input's browser keeps playing the input alone), as the panel promises ("nothing was added")."""
    from calid.errors import Cancelled
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    sequence, browser = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    browser.GetProxyNode(sequence)
    before = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    upsampled = []

    def progress(done: float, total: float, message: str) -> None:
        if done >= total:
            upsampled.append(True)

    with pytest.raises(Cancelled):
        upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear", frames=frames), progress=progress, cancel=lambda: bool(upsampled))
    assert upsampled  # it did get as far as segmenting
    after = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    assert after == before, f"left behind: {[scene.GetNodeByID(node_id).GetName() for node_id in after - before]}"
    assert browser.GetNumberOfSynchronizedSequenceNodes() == 0 and browser.GetMasterSequenceNode() is sequence


def _run_stages(job):
    """The panel's loop over worker stages, with subprocess: stops at the first failure, whose
    last error line is returned for an optional stage (as the panel passes it on)."""
    import subprocess

    from CaLIDSlicerLib.process import parse_progress

    updates, failures = [], []
    for stage in job.stages:
        finished = subprocess.run(stage.command, capture_output=True, text=True, timeout=300)
        updates += [(stage.label, u) for u in map(parse_progress, finished.stdout.splitlines()) if u]
        if finished.returncode != 0:
            assert stage.optional, finished.stderr
            failures.append(finished.stderr.strip().splitlines()[-1])
            break
    return updates, failures


def test_background_round_trip_as_the_panel_runs_it(scene, phantom):
    """prepare_background -> the worker processes (upsampling, then segmentation) -> finish_background:
    the path the panel's Apply takes, with no network in the calling process."""
    import shutil

    from CaLIDSlicerLib.logic import UpsamplingOptions, finish_background, prepare_background

    sequence, browser = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    options = UpsamplingOptions(factor=2, mode="calid", steps=1, model="untrained:tiny", device="cpu", frames="0,2")
    job = prepare_background(sequence, options)
    try:
        assert [(stage.label, stage.optional) for stage in job.stages] == [
            ("Upsampling", False), ("Segmenting the dense volume", True), ("Segmenting the acquired slices", True)
        ]
        updates, failures = _run_stages(job)
        assert failures == [] and {label for label, _ in updates} == {stage.label for stage in job.stages}
        assert all(path.is_file() for path in job.label_files)
        result = finish_background(scene, sequence, job, options)
    finally:
        shutil.rmtree(job.folder)
    assert result.browser_node is not browser and result.dense.metadata["upsampling"]["mode"] == "calid"  # 2 of 3 frames: a browser of its own
    assert result.labels.shape == result.dense.shape and result.warnings == []
    assert result.table_node.GetNumberOfRows() == 2 and "4-chamber" in result.planes
    assert result.summary_table_node.GetNumberOfColumns() == 3  # quantity, dense, acquired (Simpson)
    np.testing.assert_allclose(mrml.stack_from_sequence(result.output_node).data[:, ::2], phantom.sparse.data[[0, 2]], atol=0.5)


def test_background_segmentation_failure_still_adds_the_dense_output(scene, phantom, tmp_path):
    import shutil

    from CaLIDSlicerLib.logic import UpsamplingOptions, finish_background, prepare_background

    sequence, _ = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    options = UpsamplingOptions(factor=2, mode="linear", segmentation_model=str(tmp_path / "missing-segmenter.safetensors"))
    job = prepare_background(sequence, options)
    try:
        _, failures = _run_stages(job)
        assert len(failures) == 1 and "missing-segmenter" in failures[0]
        result = finish_background(scene, sequence, job, options, failures)
    finally:
        shutil.rmtree(job.folder)
    assert mrml.stack_from_sequence(result.output_node).n_slices == 2 * phantom.sparse.n_slices - 1
    assert result.segmentation_node is None and len(result.warnings) == 1 and "missing-segmenter" in result.warnings[0]
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_offscreen_slice_views_on_the_long_axis_planes(scene, phantom, tmp_path):
    """Slicer's own slice logic renders the dense phantom on the 4/2/3-chamber planes; the PNGs are kept."""

    import vtk
    from vtk.util import numpy_support

    from CaLIDSlicerLib.render import render_slice_view

    artifacts = Path(os.environ.get("CALID_TEST_ARTIFACTS", tmp_path))  # set it to keep the PNGs
    artifacts.mkdir(parents=True, exist_ok=True)
    volume = mrml.volume_from_stack(scene, phantom.dense, "dense", frame=0)
    planes = standard_planes(phantom.dense_labels, 0)
    for name in ("4-chamber", "2-chamber", "3-chamber"):
        png = render_slice_view(scene, scene.application_logic, volume, planes[name], artifacts / f"slice_view_{name}.png", size=(200, 160))
        reader = vtk.vtkPNGReader()
        reader.SetFileName(str(png))
        reader.Update()
        assert reader.GetOutput().GetDimensions()[:2] == (200, 160)
        grey = numpy_support.vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars())[:, 0].reshape(160, 200)
        # The bright LV blood pool lies on the plane's centre (on the LV axis), the corners are outside the heart.
        assert grey[70:90, 90:110].mean() > grey[:20, :20].mean() + 40, name


def test_offscreen_three_d_view_shows_the_segment_surfaces(scene, phantom, tmp_path):
    """Slicer's 3D displayable managers render the segmentation's closed surfaces; the PNGs are kept."""

    import vtk
    from vtk.util import numpy_support

    from CaLIDSlicerLib.render import render_three_d_view

    artifacts = Path(os.environ.get("CALID_TEST_ARTIFACTS", tmp_path))  # set it to keep the PNGs
    artifacts.mkdir(parents=True, exist_ok=True)
    segmentation = mrml.segmentation_from_labels(scene, phantom.dense_labels, "surfaces", frame=0)

    def pixels(path):
        reader = vtk.vtkPNGReader()
        reader.SetFileName(str(path))
        reader.Update()
        width, height = reader.GetOutput().GetDimensions()[:2]
        return numpy_support.vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars())[:, :3].reshape(height, width, 3).astype(int)

    def coloured_like(image, rgb):
        return (np.abs(image - np.asarray(rgb) * 255).sum(axis=2) < 120).mean()

    views = {d: pixels(render_three_d_view(scene, scene.application_logic, artifacts / f"three_d_{d}.png", size=(240, 200), direction=d)) for d in ("anterior", "left")}
    assert views["anterior"].shape == (200, 240, 3)
    for image in views.values():
        for value, (_, colour) in mrml.SEGMENTS.items():
            assert coloured_like(image, colour) > 0.002 or value == 3, value  # the LV cavity is hidden inside the myocardium
    assert np.abs(views["anterior"] - views["left"]).mean() > 5
    # Hidden segments are not drawn: the surfaces come from the display nodes, not from the test.
    segmentation.GetDisplayNode().SetVisibility(False)
    hidden = pixels(render_three_d_view(scene, scene.application_logic, artifacts / "three_d_hidden.png", size=(240, 200)))
    # (The LV cavity's blue is close to the background gradient and is not drawn anyway.)
    assert all(coloured_like(hidden, mrml.SEGMENTS[value][1]) < 0.0005 for value in (1, 2))


def _parameter_node_fields():
    """Fields and default expressions of the module's parameterNodeWrapper class, read from its source."""
    import ast

    tree = ast.parse((REPO_ROOT / "CaLIDSlicer" / "CaLIDSlicer.py").read_text())
    (wrapper,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper" for d in n.decorator_list)]
    return {n.target.id: n.value for n in wrapper.body if isinstance(n, ast.AnnAssign)}


def test_parameter_node_fields_match_the_panel_and_become_options():
    import ast
    import xml.etree.ElementTree as ElementTree
    from types import SimpleNamespace

    from calid.inference.pipeline import MODES
    from CaLIDSlicerLib.parameters import FrameSelection, Method, PlaceholderSpacing, options_from_parameters

    fields = _parameter_node_fields()
    ui = ElementTree.parse(REPO_ROOT / "CaLIDSlicer" / "Resources" / "UI" / "CaLIDSlicer.ui")
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound <= set(fields), f"widgets bound to unknown parameters: {bound - set(fields)}"
    assert set(fields) - bound == {"device", "model"}, "every other parameter must have a widget"
    assert {m.value for m in Method} == set(MODES), "the panel offers every engine mode"
    from calid.inference.pipeline import PIXEL_MODES

    assert {m.value for m in Method if not m.needs_model()} == set(PIXEL_MODES), "the panel greys out steps for exactly the model-free modes"
    from CaLIDSlicerLib.dependencies import interpolation_model_installed

    namespace = {"Method": Method, "FrameSelection": FrameSelection, "PlaceholderSpacing": PlaceholderSpacing, "interpolation_model_installed": interpolation_model_installed}
    defaults = SimpleNamespace(**{name: None if value is None else eval(compile(ast.Expression(value), "defaults", "eval"), namespace) for name, value in fields.items()})
    options = options_from_parameters(defaults)
    default_mode = "calid" if interpolation_model_installed() else "registration"  # what works as installed
    assert (options.factor, options.mode, options.steps, options.seed, options.frames, options.device, options.model, options.segment) == (4, default_mode, None, 0, None, "auto", None, True)
    assert options.placeholder_spacing == "model" and options.tta is False
    defaults.testTimeAugmentation = True
    assert options_from_parameters(defaults).tta is True
    defaults.placeholderSpacing, defaults.placeholderPixelMm = PlaceholderSpacing.CUSTOM, 1.5
    assert options_from_parameters(defaults).placeholder_spacing == "1.5"
    defaults.placeholderSpacing = PlaceholderSpacing.KEEP
    assert options_from_parameters(defaults).placeholder_spacing == "keep"
    defaults.placeholderSpacing, defaults.placeholderPixelMm = PlaceholderSpacing.CUSTOM, 50.0
    with pytest.raises(InputError, match="not plausible"):
        options_from_parameters(defaults)
    defaults.placeholderSpacing = PlaceholderSpacing.MODEL
    defaults.frames = FrameSelection.CURRENT
    assert options_from_parameters(defaults, current_frame=3).frames == "3"
    defaults.frames, defaults.frameRange = FrameSelection.RANGE, " 0,5-9 "
    assert options_from_parameters(defaults).frames == "0,5-9"
    defaults.frameRange = ""
    with pytest.raises(InputError, match="frames"):
        options_from_parameters(defaults)
    defaults.frames, defaults.method, defaults.model = FrameSelection.ALL, Method.LINEAR, "my-model"
    assert (options_from_parameters(defaults).mode, options_from_parameters(defaults).model) == ("linear", "my-model")
    with pytest.raises(InputError, match="not 2"):
        options_from_parameters(defaults, plane_points_lps=np.zeros((2, 3)))
    on_a_line = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [20.0, 0.0, 0.0]])  # refused before any work, not after it
    with pytest.raises(InputError, match="long-axis points: the 3 points do not define a plane"):
        options_from_parameters(defaults, plane_points_lps=on_a_line)


def test_a_frame_the_cine_lacks_is_refused_in_the_panels_words_before_anything_is_written(scene, phantom, tmp_path, monkeypatch):
    import tempfile

    from CaLIDSlicerLib.logic import UpsamplingOptions, prepare_background

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the work folder would go
    sequence, _ = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    with pytest.raises(InputError, match="^Frames: "):
        prepare_background(sequence, UpsamplingOptions(factor=2, mode="linear", frames="0,99"))
    # a long-axis cine (one slice) and a sequence of label maps, refused in the node's name, as in a blocking run
    long_axis, _ = mrml.sequence_from_stack(scene, phantom.sparse.with_data(phantom.sparse.data[:, :1]), "long axis")
    with pytest.raises(InputError, match="^long axis: has 1 slice\\(s\\); upsampling needs a short-axis stack of at least 2 parallel slices"):
        prepare_background(long_axis, UpsamplingOptions(factor=2, mode="registration"))
    labels, _ = mrml.sequence_from_stack(scene, phantom.sparse_labels, "label cine", labelmap=True)
    with pytest.raises(InputError, match="^label cine: is a sequence of label maps"):
        prepare_background(labels, UpsamplingOptions(factor=2, mode="linear"))
    assert list(tmp_path.iterdir()) == []


def test_worker_messages_name_the_nodes_not_the_temporary_files(scene, phantom):
    """A segmentation worker warns about its input file; the panel says which node that is, once."""
    import shutil

    from CaLIDSlicerLib.logic import UpsamplingOptions, in_panel_words, prepare_background

    sequence, _ = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    job = prepare_background(sequence, UpsamplingOptions(factor=2, mode="linear"))
    shutil.rmtree(job.folder)
    warning = f"{job.folder / 'input.nii'} carries no geometry (all spacings exactly 1 mm)"
    shown = in_panel_words(job, [warning, warning, f"{job.folder / 'dense.nii'}: made from slices 10 mm apart"], "cine")
    assert shown == ["the input 'cine' carries no geometry (all spacings exactly 1 mm)", "the dense output: made from slices 10 mm apart"]
    assert all(str(job.folder) not in message for message in shown)
    # a command-line option that a worker suggests is named as the panel's control
    suggestion = f"{job.folder / 'input.nii'} carries no geometry; ... or give the pixel size (--placeholder-spacing MM)"
    assert in_panel_words(job, [suggestion], "cine") == [
        "the input 'cine' carries no geometry; ... or give the pixel size ('Files without geometry' > 'Pixel size (mm)' in the panel)"
    ]


def test_gpus_are_listed_without_loading_pytorch_into_the_calling_process():
    """The panel fills its Device choice in Slicer's own process: that must not load PyTorch (seconds, and CUDA)."""
    probe = "import sys; from CaLIDSlicerLib.dependencies import cuda_devices; devices = cuda_devices(); print('torch' in sys.modules, devices)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT / "CaLIDSlicer")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False ")


def test_a_failure_after_the_output_was_added_takes_it_out_again(scene, phantom):
    """Points that pass the panel's count but give no plane (a script's options): the error comes
    after the dense output was added, which then goes again."""
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    sequence, _ = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    before = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
    on_a_line = ((0.0, 0.0, 0.0), (10.0, 0.0, 0.0), (20.0, 0.0, 0.0))
    for segment in (False, True):  # with the segmentation, its table, chart and the chart's curves go too
        with pytest.raises(InputError, match="plane user"):
            upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear", segment=segment, plane_points_lps=on_a_line))
        after = {scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())}
        assert after == before, f"left behind: {[scene.GetNodeByID(node_id).GetClassName() for node_id in after - before]}"


def test_labels_without_a_right_ventricle_keep_their_volumes_without_long_axis_planes(scene, phantom):
    """The 4/2/3-chamber planes need the RV; the LV volumes and ejection fraction do not."""
    import shutil

    from calid.data.io import write_stack
    from calid.inference import upsample_linear
    from CaLIDSlicerLib.logic import UpsamplingOptions, finish_background, prepare_background

    sequence, _ = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    options = UpsamplingOptions(factor=2, mode="linear")
    job = prepare_background(sequence, options)
    try:
        upsampling = subprocess.run(job.stages[0].command, capture_output=True, text=True, timeout=300)
        assert upsampling.returncode == 0, upsampling.stderr
        no_rv = phantom.sparse_labels.with_data(np.where(phantom.sparse_labels.data == 1, 0, phantom.sparse_labels.data))
        dense_labels = upsample_linear(no_rv, 2)
        dense_labels.data[:, 1::2] = no_rv.data[:, :-1]  # nearest, not linear: no label values in between
        write_stack(dense_labels, job.label_files[0], dtype="uint8")
        write_stack(no_rv, job.label_files[1], dtype="uint8")
        result = finish_background(scene, sequence, job, options)
    finally:
        shutil.rmtree(job.folder)
    assert result.segmentation_node is not None and result.summary_table_node is not None
    assert result.function["dense"].summary["lv_ef_percent"] > 0
    assert result.planes == {} and any("long-axis planes were not placed" in w for w in result.warnings)


def test_markup_points_place_the_user_plane_and_the_three_chamber_plane(scene, phantom):
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    ras = np.array([[10.0, -20.0, 30.0], [12.0, -5.0, 70.0], [40.0, -18.0, 35.0]])
    for point in ras:
        markups.AddControlPoint(*point)
    markups.AddControlPoint(0.0, 0.0, 0.0)
    markups.SetNthControlPointPositionMissing(3)  # skipped by the user: ignored
    points = mrml.points_from_markups(markups)
    np.testing.assert_allclose(points, ras * [-1, -1, 1])
    volume = mrml.volume_from_stack(scene, phantom.sparse, "sparse", frame=0)
    result = upsample_node(scene, volume, UpsamplingOptions(factor=2, mode="linear", segment=False, plane_points_lps=tuple(map(tuple, points))))
    plane = result.planes["user"]
    assert np.abs((points - plane.centre) @ plane.normal).max() < 1e-9
    np.testing.assert_allclose(plane.centre, points[0])
    # One point: the aortic valve, through which the 3-chamber plane passes (with the LV axis).
    valve = standard_planes(phantom.sparse_labels, 0)["2-chamber"].centre + 25.0 * standard_planes(phantom.sparse_labels, 0)["2-chamber"].u
    result = upsample_node(scene, volume, UpsamplingOptions(factor=2, mode="linear", segment=True, plane_points_lps=(tuple(valve),)))
    three = result.planes["3-chamber"]
    assert abs(float((valve - three.centre) @ three.normal)) < 1e-6
    assert "user" not in result.planes


def test_centre_on_heart_moves_the_models_window_onto_the_heart(scene, tmp_path):
    """A full field-of-view ACDC volume in a real volume node: with "centre on the heart" the
    generated window is placed around the segmented heart instead of the image centre."""
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node
    from CaLIDSlicerLib.process import upsample_command

    from calid.data.preprocess import label_centre_lps
    from calid.models.registry import default_model
    from conftest import shared_file

    assert default_model("segmentation") is not None, "the shipped segmentation model is not registered"
    image_path = shared_file("acdc_edes_labels", "patient011_frame01.nii.gz")
    stack = read_stack(image_path)
    node = mrml.volume_from_stack(scene, stack, "full field of view")
    windows = {}
    for centred in (False, True):
        options = UpsamplingOptions(factor=2, mode="latent-linear", model="untrained:tiny", device="cpu", segment=False, centre_on_heart=centred)
        crop = upsample_node(scene, node, options).dense.metadata["upsampling"]["crop"]
        (y0, x0), (h, w), (sx, sy) = crop["crop_start_yx"], crop["crop_size_yx"], crop["resampled_spacing_xy"]
        windows[centred] = np.array([(x0 + (w - 1) / 2) * sx, (y0 + (h - 1) / 2) * sy])  # window centre, mm from the first resampled pixel
    assert not np.allclose(windows[True], windows[False])
    heart = label_centre_lps(read_stack(image_path.with_name("patient011_frame01_gt.nii.gz")))
    offset = np.linalg.inv(stack.direction) @ (heart - np.asarray(stack.origin))  # heart in mm along the image axes
    assert np.linalg.norm(windows[True] - offset[:2]) < min(10.0, np.linalg.norm(windows[False] - offset[:2]))
    assert "--centre-on-heart" in upsample_command(image_path, tmp_path / "o.nii.gz", UpsamplingOptions(centre_on_heart=True))


def test_test_time_augmentation_from_the_panel_options(scene, phantom):
    """The panel's "average over the 8 rotations and reflections" reaches the engine through a real volume node."""
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node
    from CaLIDSlicerLib.process import upsample_command

    from calid.inference import load_pipeline

    pipeline = load_pipeline("untrained:tiny", device="cpu")
    node = mrml.volume_from_stack(scene, phantom.sparse.select_frames([0]), "one frame")
    from_node = mrml.stack_from_volume(node)
    options = UpsamplingOptions(factor=2, mode="calid", steps=1, model="untrained:tiny", device="cpu", segment=False, tta=True)
    result = upsample_node(scene, node, options, pipeline=pipeline)
    averaged = result.dense
    assert result.output_node.GetName() == "one frame calid x2 tta"
    np.testing.assert_array_equal(averaged.data, pipeline.upsample(from_node, 2, "calid", 1, tta=True).data)
    assert averaged.metadata["upsampling"]["tta"] is True
    assert not np.array_equal(averaged.data, pipeline.upsample(from_node, 2, "calid", 1).data)
    np.testing.assert_array_equal(averaged.data[:, ::2], from_node.data)
    assert "--tta" in upsample_command("in.nii.gz", "out.nii.gz", options)
    assert "--tta" not in upsample_command("in.nii.gz", "out.nii.gz", UpsamplingOptions())


def test_volume_without_geometry_reaches_the_network_at_the_chosen_pixel_size(scene, tmp_path):
    """A cine saved at 1 x 1 x 1 mm, in a real volume node: by default the network sees it at the
    pixel size the model's training assumed, exactly as it sees the same cine with that geometry;
    "keep" and a size of the user's own are passed through, also to the background worker."""
    from dataclasses import replace

    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node
    from CaLIDSlicerLib.process import upsample_command

    from calid.inference import load_pipeline
    from calid.inference.pipeline import untrained_model
    from calid.models.checkpoint import save_model

    phantom = make_phantom(3, PhantomConfig(n_frames=1, matrix=48, pixel_spacing_mm=1.5))
    bare = replace(phantom.sparse, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    model = untrained_model("tiny")
    recorded = {"note": "no geometry", "assumed_mm": 1.5, "subjects": ["x"]}
    model_file = save_model(tmp_path / "m.safetensors", model.config, model.vae, model.net, 1.0, {"training_data": {"placeholder_spacing": recorded}})
    pipeline = load_pipeline(str(model_file), device="cpu")
    node = mrml.volume_from_stack(scene, bare, "no geometry")
    from_node = mrml.stack_from_volume(node)  # as the panel reads it (in the node's voxel type)
    assert from_node.has_placeholder_spacing
    real = replace(from_node, spacing=(1.5, 1.5, 1.0))  # the same cine with the geometry the model assumes

    def run(choice):
        options = UpsamplingOptions(factor=2, mode="calid", steps=2, seed=4, model=str(model_file), device="cpu", segment=False, placeholder_spacing=choice)
        return upsample_node(scene, node, options, pipeline=pipeline).dense

    as_real = pipeline.upsample(real, factor=2, mode="calid", steps=2, seed=4)
    by_default, kept, given, given_other = run("model"), run("keep"), run("1.5"), run("2")
    np.testing.assert_array_equal(by_default.data, as_real.data)  # the network saw the cine at 1.5 mm
    np.testing.assert_array_equal(given.data, as_real.data)
    assert not np.array_equal(kept.data, as_real.data) and not np.array_equal(given_other.data, as_real.data)
    assert by_default.metadata["upsampling"]["assumed_pixel_mm"] == 1.5 and given_other.metadata["upsampling"]["assumed_pixel_mm"] == 2.0
    assert "assumed_pixel_mm" not in kept.metadata["upsampling"]
    for dense in (by_default, kept):
        assert dense.spacing == (1.0, 1.0, 0.5)  # the output keeps the stored geometry
        np.testing.assert_array_equal(dense.data[:, ::2], from_node.data)
    command = upsample_command(tmp_path / "in.nii.gz", tmp_path / "out.nii.gz", UpsamplingOptions(placeholder_spacing="keep"))
    assert command[command.index("--placeholder-spacing") + 1] == "keep"
    for default in ("model", None):
        assert "--placeholder-spacing" not in upsample_command(tmp_path / "in.nii.gz", tmp_path / "out.nii.gz", UpsamplingOptions(placeholder_spacing=default))
    np.testing.assert_array_equal(run(None).data, by_default.data)


def test_a_failed_segmentation_keeps_the_dense_output_and_warns(scene, phantom, tmp_path):
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    volume = mrml.volume_from_stack(scene, phantom.sparse.select_frames([0]), "sparse")
    missing = tmp_path / "no-such-segmenter.safetensors"
    result = upsample_node(scene, volume, UpsamplingOptions(factor=2, mode="linear", segmentation_model=str(missing)))
    assert mrml.stack_from_volume(result.output_node).n_slices == 2 * phantom.sparse.n_slices - 1
    assert len(result.warnings) == 1 and "segmentation" in result.warnings[0] and "no-such-segmenter" in result.warnings[0]
    assert result.segmentation_node is None and result.labels is None and result.planes == {} and result.table_node is None
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


# Subprocesses run with -I -S: the standard library only, no calid, torch, MONAI or numpy.
_BARE_PYTHON = [sys.executable, "-I", "-S"]


def test_the_module_loads_before_calid_is_installed():
    """Slicer imports CaLIDSlicer.py at start-up, before the first-use installer has run: its
    top-level imports must be Slicer's, the standard library's, or calid-free module files."""
    import ast
    import json
    import subprocess

    tree = ast.parse((REPO_ROOT / "CaLIDSlicer" / "CaLIDSlicer.py").read_text())
    top_level = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    allowed_roots = set(sys.stdlib_module_names) | {"__future__", "qt", "slicer", "vtk"}
    from_library = {name for name in top_level if name.startswith("CaLIDSlicerLib")}
    assert {name for name in top_level - from_library if name.split(".")[0] not in allowed_roots} == set()
    assert from_library == {"CaLIDSlicerLib.choices", "CaLIDSlicerLib.dependencies"}
    script = (
        "import json, os, sys; sys.path.insert(0, sys.argv[1]); os.environ['CALID_MODEL_DIR'] = '/mine';"
        "from CaLIDSlicerLib import choices, dependencies as d;"
        "folder = d.register_bundled_models();"
        "print(json.dumps({'missing': d.missing_packages(), 'core': str(d.bundled_core()), 'models': str(folder),"
        " 'env': os.environ['CALID_MODEL_DIR'], 'shipped': os.environ['CALID_SHIPPED_MODEL_DIR'], 'factors': list(choices.FACTORS), 'modules': sorted(m for m in sys.modules if m.split('.')[0] in ('calid', 'torch', 'numpy'))}))"
    )
    done = subprocess.run([*_BARE_PYTHON, "-c", script, str(REPO_ROOT / "CaLIDSlicer")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["missing"] == ["torch", "monai", "calid"] and found["modules"] == []
    assert found["core"] == str(REPO_ROOT / "CaLIDCore") and found["models"] == str(REPO_ROOT / "Resources" / "Models")
    assert found["env"] == "/mine" and found["shipped"] == found["models"]  # the user's folders stay first
    assert found["factors"] == [2, 4, 8, 16]


def test_installed_extension_layout_finds_the_bundled_core_and_models(tmp_path, monkeypatch):
    """The layout CMake installs (CaLIDCore/ and CaLIDModels/ beside the module's library) is the
    one the first-use installer and the model registration look for, and calid reads its models."""
    import json
    import re
    import shutil
    import subprocess

    cmake = (REPO_ROOT / "CaLIDSlicer" / "CMakeLists.txt").read_text()
    installed = dict(re.findall(r"install\(DIRECTORY \$\{(\w+)\}/\s+DESTINATION \$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/(\w+)", cmake))
    assert installed == {"CALID_CORE_DIR": "CaLIDCore", "CALID_MODELS_DIR": "CaLIDModels"}
    assert "set(CALID_CORE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/../CaLIDCore)" in cmake
    assert "set(CALID_MODELS_DIR ${CMAKE_CURRENT_SOURCE_DIR}/../Resources/Models)" in cmake
    modules = tmp_path / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    (modules / "CaLIDSlicerLib").mkdir(parents=True)
    for name in ("__init__.py", "dependencies.py"):
        shutil.copy(REPO_ROOT / "CaLIDSlicer" / "CaLIDSlicerLib" / name, modules / "CaLIDSlicerLib" / name)
    (modules / "CaLIDCore").mkdir()
    shutil.copy(REPO_ROOT / "CaLIDCore" / "pyproject.toml", modules / "CaLIDCore" / "pyproject.toml")
    shutil.copytree(REPO_ROOT / "Resources" / "Models", modules / "CaLIDModels")
    script = (
        "import json, os, sys; sys.path.insert(0, sys.argv[1]); os.environ.pop('CALID_SHIPPED_MODEL_DIR', None);"
        "from CaLIDSlicerLib import dependencies as d; d.register_bundled_models();"
        "print(json.dumps({'core': str(d.bundled_core()), 'env': os.environ['CALID_SHIPPED_MODEL_DIR']}))"
    )
    done = subprocess.run([*_BARE_PYTHON, "-c", script, str(modules)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["core"] == str(modules / "CaLIDCore") and found["env"] == str(modules / "CaLIDModels")
    from calid.models.registry import SHIPPED_MODEL_DIR_ENV, model_folders

    from CaLIDSlicerLib.dependencies import SHIPPED_MODEL_DIR_ENV as module_spelling

    assert module_spelling == SHIPPED_MODEL_DIR_ENV
    monkeypatch.setenv(SHIPPED_MODEL_DIR_ENV, found["env"])
    assert model_folders()[-1] == modules / "CaLIDModels"  # searched, after the user's folders


def test_output_in_the_input_browser_copies_the_input_index_in_any_unit(scene, phantom):
    """A browser pairs frames by index value: a cine indexed in seconds gets an output indexed in
    the same seconds (not in ms), so that every frame shows its own upsampled frame."""
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    sequence, browser = mrml.sequence_from_stack(scene, phantom.sparse, "cine in seconds")
    seconds = [f"{0.04 * frame:g}" for frame in range(phantom.sparse.n_frames)]
    for frame, value in enumerate(seconds):
        assert sequence.UpdateIndexValue(sequence.GetNthIndexValue(frame), value)
    sequence.SetIndexUnit("s")
    result = upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear", segment=False))
    output = result.output_node
    assert output.GetIndexUnit() == "s" and output.GetIndexName() == sequence.GetIndexName()
    assert [output.GetNthIndexValue(frame) for frame in range(output.GetNumberOfDataNodes())] == seconds
    # some frames only: each keeps its own index value (a browser of its own shows them)
    some = upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear", segment=False, frames="0,2"))
    assert [some.output_node.GetNthIndexValue(k) for k in range(2)] == [seconds[0], seconds[2]] and some.output_node.GetIndexUnit() == "s"
    np.testing.assert_allclose(some.dense.frame_times_ms, [0.0, 80.0])  # the index, read in seconds
    for frame in range(phantom.sparse.n_frames):
        browser.SetSelectedItemNumber(frame)
        shown = slicer.util.arrayFromVolume(browser.GetProxyNode(output))
        np.testing.assert_allclose(shown[::2], phantom.sparse.data[frame], atol=0.5)


def test_outputs_carry_how_they_were_made_and_get_names_of_their_own(scene, phantom):
    import json

    from CaLIDSlicerLib.logic import PROVENANCE_ATTRIBUTE, UpsamplingOptions, upsample_node

    volume = mrml.volume_from_stack(scene, phantom.sparse.select_frames([0]), "sparse")
    first, second = (upsample_node(scene, volume, UpsamplingOptions(factor=2, mode="linear", segment=False)) for _ in range(2))
    assert first.output_node.GetName() != second.output_node.GetName()
    assert first.output_node.GetName().startswith("sparse linear x2")
    recorded = json.loads(first.output_node.GetAttribute(PROVENANCE_ATTRIBUTE))
    assert recorded["mode"] == "linear" and recorded["factor"] == 2
    assert "generated" in first.output_node.GetDescription()
    # An output upsampled again keeps the first acquisition in its record (Simpson's end slabs, acquired slices).
    again = upsample_node(scene, first.output_node, UpsamplingOptions(factor=2, mode="linear", segment=False))
    chained = json.loads(again.output_node.GetAttribute(PROVENANCE_ATTRIBUTE))
    assert chained["acquired_slice_spacing_mm"] == pytest.approx(phantom.sparse.slice_spacing)
    assert chained["acquired_slice_indices"] == list(range(0, again.dense.n_slices, 4))
    assert "was itself upsampled (linear x2)" in chained["warning"] and chained["warning"] in again.warnings


def test_an_output_upsampled_again_keeps_its_cine_frames_and_measures_simpson_on_the_acquired_slices(scene, phantom):
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    sequence, _ = mrml.sequence_from_stack(scene, phantom.sparse, "sparse cine")
    first = upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear", frames="0,2", segment=False))
    again = upsample_node(scene, first.output_node, UpsamplingOptions(factor=2, mode="linear"))
    assert again.dense.recorded_frames() == [0, 2]  # the cine's frames, not positions in the first output
    assert "only 1 slice in 4 is acquired" in again.output_node.GetDescription() and "linear x2 then linear x2" in again.output_node.GetDescription()
    # "acquired (Simpson)" is measured on the acquired slices, as from the acquired cine in one x4 run.
    direct = upsample_node(scene, sequence, UpsamplingOptions(factor=4, mode="linear", frames="0,2"))
    np.testing.assert_allclose(again.function["acquired (Simpson)"].lv_volume_ml, direct.function["acquired (Simpson)"].lv_volume_ml)
    np.testing.assert_allclose(again.function["dense"].summary["lv_edv_ml"], direct.function["dense"].summary["lv_edv_ml"], rtol=0.05)
    # The panel's background run segments the acquired slices alone too.
    from calid.data.io import read_stack
    from CaLIDSlicerLib.logic import WORKER_ACQUIRED_INPUT, prepare_background

    job = prepare_background(first.output_node, UpsamplingOptions(factor=2, mode="linear"))
    try:
        acquired_stage = job.stages[-1].command
        assert str(job.folder / WORKER_ACQUIRED_INPUT) in acquired_stage
        acquired = read_stack(job.folder / WORKER_ACQUIRED_INPUT)
        assert acquired.n_slices == phantom.sparse.n_slices and acquired.slice_spacing == pytest.approx(phantom.sparse.slice_spacing)
        assert acquired.recorded_frames() == [0, 2] and "upsampling" not in acquired.metadata
    finally:
        import shutil

        shutil.rmtree(job.folder, ignore_errors=True)


def _start_and_wait_for_progress(command):
    import subprocess

    from CaLIDSlicerLib.process import parse_progress

    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    for line in worker.stdout:  # the worker is inside its network loop once it reports progress
        if parse_progress(line):
            return worker
    raise AssertionError(f"the worker ended without progress: {worker.wait()} {worker.stderr.read() if worker.stderr else ''}")


def test_a_worker_stops_on_the_jobs_stop_file_or_when_its_folder_is_removed(scene, phantom):
    """Cancel without a signal: where killing Slicer's Python launcher leaves the Python worker
    running, the stop file (or the removed job folder) ends it, with nothing written."""
    import shutil

    from CaLIDSlicerLib.logic import UpsamplingOptions, prepare_background

    sequence, _ = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    options = UpsamplingOptions(factor=16, mode="calid+", steps=32, model="untrained:tiny", device="cpu")  # minutes if not stopped
    for how in ("stop file", "folder removed"):
        job = prepare_background(sequence, options)
        try:
            assert "--stop-file" in job.stages[0].command and all("--stop-file" in stage.command for stage in job.stages)
            worker = _start_and_wait_for_progress(job.stages[0].command)
            if how == "stop file":
                job.request_stop()
            else:
                shutil.rmtree(job.folder)
            code = worker.wait(timeout=120)
            errors = worker.stderr.read() if worker.stderr else ""
            worker.stdout.close()
            worker.stderr.close()
            assert code == 130, (how, errors)
            assert "cancelled; no output was written" in errors
            assert not job.output.exists()
            if how == "stop file":
                assert sorted(p.name for p in job.folder.iterdir()) == ["input.nii", "stop"]  # no output, no temporary file
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)
    job.request_stop()  # its folder is gone: nothing to signal, and no error
    assert not job.folder.exists()


def test_first_use_installer_installs_only_what_is_missing_and_sees_an_outdated_core(tmp_path):
    """Inside Slicer only calid's missing requirements are installed (Slicer's own VTK, SimpleITK and
    pydicom stay), read from the bundled core itself; a calid that differs from the bundled one
    (an updated extension) is replaced."""
    import shutil
    import tomllib

    from CaLIDSlicerLib import dependencies as d

    core = REPO_ROOT / "CaLIDCore"
    declared = tomllib.loads((core / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = d.core_requirements(core)
    assert sorted(requirements.values()) == sorted(declared)
    assert requirements["nrrd"].startswith("pynrrd") and requirements["SimpleITK"].startswith("SimpleITK")
    assert d.missing_requirements(core) == []  # this test environment has them all

    fake = tmp_path / "core"
    fake.mkdir()
    (fake / "pyproject.toml").write_text('[project]\nname = "calid"\ndependencies = ["numpy>=1.24", "torch>=2.4", "no-such-package-xyz>=1.0"]\n')
    assert d.missing_requirements(fake) == ["no-such-package-xyz>=1.0"]  # numpy is there; torch is installed apart

    # The calid of this environment is the checkout's own: current. A changed copy is not.
    assert d.installed_core_is_outdated(core) is False
    changed = tmp_path / "changed"
    shutil.copytree(core / "calid", changed / "calid", ignore=shutil.ignore_patterns("__pycache__"))
    assert d.installed_core_is_outdated(changed) is False
    (changed / "calid" / "errors.py").write_text((changed / "calid" / "errors.py").read_text() + "\n# changed\n")
    assert d.installed_core_is_outdated(changed) is True


def test_without_an_installed_model_the_panel_defaults_to_registration_and_says_what_to_do(scene, phantom, tmp_path, monkeypatch):
    """No CaLID model ships yet: the panel's default method must work as installed, and a
    model-based method with no model gets the panel's own words (not a command-line option's)."""
    import json

    from calid.models.registry import default_model

    from CaLIDSlicerLib import dependencies as d
    from CaLIDSlicerLib.logic import UpsamplingOptions, check_model_available, upsample_node

    shipped = json.loads((REPO_ROOT / "Resources" / "Models" / "registry.json").read_text())["models"]
    ships = any(entry.get("kind", "calid") == "calid" and entry.get("default") for entry in shipped)
    assert d.interpolation_model_installed() is ships
    assert (default_model("calid") is not None) is ships
    if ships:
        return
    node = mrml.volume_from_stack(scene, phantom.sparse.select_frames([0]), "cine")
    for mode in ("calid", "calid+", "latent-linear"):
        with pytest.raises(InputError, match="Choose the Registration or Linear method"):
            check_model_available(UpsamplingOptions(factor=2, mode=mode))
    with pytest.raises(InputError, match="Load from file"):
        upsample_node(scene, node, UpsamplingOptions(factor=2, mode="calid", segment=False))
    check_model_available(UpsamplingOptions(factor=2, mode="calid", model="untrained:tiny"))  # a chosen model is the user's
    for mode in ("registration", "linear"):
        result = upsample_node(scene, node, UpsamplingOptions(factor=2, mode=mode, segment=False))
        assert result.dense.n_slices == 2 * phantom.sparse.n_slices - 1 and result.dense.metadata["upsampling"]["mode"] == mode

    # A default interpolation model installed by the user (calid install --default), or shipped,
    # makes CaLID the panel's default.
    registry = json.dumps({"models": [{"name": "m", "file": "m.safetensors", "sha256": "0" * 64, "kind": "calid", "default": True}]})
    user_folder = tmp_path / "data" / "calid" / "models"
    user_folder.mkdir(parents=True)
    (user_folder / "registry.json").write_text(registry)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert d.interpolation_model_installed() is True
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "elsewhere"))
    assert d.interpolation_model_installed() is False
    shipped_folder = tmp_path / "shipped"
    shipped_folder.mkdir()
    (shipped_folder / "registry.json").write_text(registry)
    monkeypatch.setattr(d, "bundled_models", lambda: shipped_folder)
    assert d.interpolation_model_installed() is True


def test_input_under_a_transform_outputs_overlay_it_and_points_are_taken_in_its_frame(scene, phantom):
    """A cine shown under a (registration) transform: the outputs go under the same transform, so that
    they overlay it in the views; points placed in the views are taken back into the cine's own
    coordinates, where the planes are computed; the planes are shown moved by the transform."""
    import vtk

    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    sequence, browser = mrml.sequence_from_stack(scene, phantom.sparse, "cine")
    transform_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    to_parent = vtk.vtkTransform()
    to_parent.Translate(50.0, -20.0, 7.0)
    to_parent.RotateX(25.0)  # moves the plane's normal and in-plane axis below
    to_parent.RotateZ(30.0)
    transform_node.SetMatrixTransformToParent(to_parent.GetMatrix())
    mrml.shown_node(scene, sequence).SetAndObserveTransformNodeID(transform_node.GetID())
    assert mrml.parent_transform(scene, sequence) is transform_node

    result = upsample_node(scene, sequence, UpsamplingOptions(factor=2, mode="linear", segment=False, frames="all"))
    assert result.parent_transform is transform_node
    segmentation = mrml.segmentation_from_labels(scene, phantom.sparse_labels, "labels")
    mrml.place_under(scene, segmentation, result.parent_transform)  # as the Logic places its segmentation
    assert segmentation.GetParentTransformNode() is transform_node
    output_proxy = mrml.shown_node(scene, result.output_node)
    assert output_proxy.GetParentTransformNode() is transform_node
    # Overlaid in world coordinates: the same centre (the output spans the same slices, thinner).
    input_bounds, output_bounds, untransformed = [0.0] * 6, [0.0] * 6, [0.0] * 6
    mrml.shown_node(scene, sequence).GetRASBounds(input_bounds)
    output_proxy.GetRASBounds(output_bounds)
    output_proxy.GetBounds(untransformed)
    centre = lambda bounds: (np.asarray(bounds[0::2]) + np.asarray(bounds[1::2])) / 2  # noqa: E731
    np.testing.assert_allclose(centre(output_bounds), centre(input_bounds), atol=1e-3)
    assert np.linalg.norm(centre(untransformed) - centre(input_bounds)) > 40  # where it was shown before

    # A point placed in a view at the world position of a voxel centre is that voxel's local position.
    local_lps = phantom.sparse.index_to_physical([20, 30, 2])
    world_ras = np.asarray(to_parent.TransformPoint(*(local_lps * [-1, -1, 1])))
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    markups.AddControlPointWorld(vtk.vtkVector3d(*world_ras))
    np.testing.assert_allclose(mrml.points_from_markups(markups, local_to=transform_node)[0], local_lps, atol=1e-6)
    np.testing.assert_allclose(mrml.points_from_markups(markups)[0], world_ras * [-1, -1, 1], atol=1e-6)  # world without it

    # A plane in local coordinates is shown where the transform moves it.
    from calid.geometry.planes import Plane

    plane = Plane("local", local_lps, np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]))
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_to_ras = mrml.orient_slice_node(slice_node, plane, transform_node)
    np.testing.assert_allclose(slice_to_ras[:3, 3], world_ras, atol=1e-6)
    untransformed = mrml.orient_slice_node(scene.AddNewNodeByClass("vtkMRMLSliceNode"), plane)
    rotation = np.array([[to_parent.GetMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])
    np.testing.assert_allclose(slice_to_ras[:3, :3], rotation @ untransformed[:3, :3], atol=1e-6)  # every axis of the view moved
