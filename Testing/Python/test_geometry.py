"""Long-axis planes, reslicing, surfaces and clinical volumes, on phantoms with known geometry."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from calid.data.io import read_stack, write_stack
from calid.data.phantom import PhantomConfig, make_phantom
from calid.data.stack import CineStack
from calid.errors import InputError, OutputError
from calid.geometry.planes import Plane, lv_long_axis, standard_planes, structure_centroid
from calid.geometry.reslice import compare_with_acquired, frame_matching, matching_frame, resample_onto, reslice, save_plane_png, stack_corners
from calid.geometry.surfaces import enclosed_volume_ml, label_surface, read_surface, render_surfaces, surface_points, write_surface
from calid.geometry.volumes import MYOCARDIAL_DENSITY_G_PER_ML, cardiac_function, plot_volume_curves, structure_volumes_ml, write_function_csv
from calid.inference.baselines import upsample_linear

from conftest import oblique_stack


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(4, PhantomConfig(n_frames=8, matrix=96, pixel_spacing_mm=2.0))


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(abs(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)), 0, 1))))


# ---------------------------------------------------------------- planes
def test_lv_long_axis_follows_the_phantom_axis(phantom):
    # The phantom's LV axis runs along the stack normal; the fit must find it from the centroids.
    axis = lv_long_axis(phantom.dense_labels, 0)
    assert angle_deg(axis.direction, phantom.dense.slice_normal) < 2.0
    sparse_axis = lv_long_axis(phantom.sparse_labels, 0)
    assert angle_deg(sparse_axis.direction, phantom.dense.slice_normal) < 3.0
    # base -> apex: the LV cavity area shrinks along the direction
    areas = [(np.rint(phantom.dense_labels.data[0, z]) == 3).sum() for z in range(phantom.dense_labels.n_slices)]
    positions = phantom.dense_labels.slice_positions()
    with_lv = [(p, a) for p, a in zip(positions, areas) if a]
    base, apex = max(with_lv, key=lambda pa: pa[1])[0], min(with_lv, key=lambda pa: pa[1])[0]
    assert np.sign(apex - base) == np.sign(np.dot(axis.direction, phantom.dense.slice_normal))


def _lv_discs(radii_mm, rv_pixels=0):
    """An LV cavity of one disc per slice (radii in mm, 0: none), slices 10 mm apart along +z; an RV square beside it."""
    data = np.zeros((1, len(radii_mm), 60, 60), dtype=np.float32)
    yy, xx = np.mgrid[:60, :60]
    for z, radius in enumerate(radii_mm):
        data[0, z][(yy - 30) ** 2 + (xx - 30) ** 2 <= (radius / 1.5) ** 2] = 3
    if rv_pixels:
        side = int(round(np.sqrt(rv_pixels)))
        data[0, len(radii_mm) // 2, 5 : 5 + side, 5 : 5 + side] = 1
    return CineStack(data, spacing=(1.5, 1.5, 10.0))


@pytest.mark.parametrize(
    "radii, apex_towards_z",
    [
        ([20, 25, 22, 18, 12, 6], +1),  # base at slice 0, apex at the end
        ([6, 12, 18, 22, 25, 20], -1),  # the other order
        ([5, 25, 23, 19, 14, 8], +1),  # the most basal slice, through the outflow tract, smaller than the apical one
        ([8, 14, 19, 23, 25, 5], -1),
    ],
)
def test_the_long_axis_points_from_base_to_apex(radii, apex_towards_z):
    axis = lv_long_axis(_lv_discs(radii), 0)
    assert np.sign(axis.direction[2]) == apex_towards_z


def test_a_few_stray_rv_voxels_do_not_place_the_4_chamber_plane():
    with pytest.raises(InputError, match="only 0.2. ml of RV cavity.*give the planes by points"):
        standard_planes(_lv_discs([20, 25, 22, 18, 12, 6], rv_pixels=9), 0)  # 9 voxels of 22.5 mm^3
    assert "4-chamber" in standard_planes(_lv_discs([20, 25, 22, 18, 12, 6], rv_pixels=400), 0)


def test_standard_planes_contain_the_axis_and_the_rv(phantom):
    labels = phantom.dense_labels
    axis = lv_long_axis(labels, 0)
    planes = standard_planes(labels, 0)
    rv = structure_centroid(labels, 1, 0)
    for name in ("4-chamber", "2-chamber", "3-chamber"):
        plane = planes[name]
        assert abs(np.dot(plane.normal, axis.direction)) < 1e-9, name  # contains the axis direction
        assert abs(plane.distance(axis.point)) < 1e-9, name  # and a point of it
        np.testing.assert_allclose(plane.v, -axis.direction, atol=1e-9)  # rows run apex -> base
        np.testing.assert_allclose(np.cross(plane.normal, plane.u), plane.v, atol=1e-12)
    assert abs(planes["4-chamber"].distance(rv)) < 1e-6
    assert abs(np.dot(planes["4-chamber"].normal, planes["2-chamber"].normal)) < 1e-9
    assert angle_deg(planes["4-chamber"].normal, planes["3-chamber"].normal) == pytest.approx(90 - 125 + 90, abs=1e-6)
    through = axis.point + 30.0 * planes["2-chamber"].u + 40.0 * axis.direction
    by_point = standard_planes(labels, 0, three_chamber_point=through)["3-chamber"]
    assert abs(by_point.distance(through)) < 1e-9
    assert abs(planes["short-axis"].distance(axis.point)) < 1e-9 and angle_deg(planes["short-axis"].normal, axis.direction) < 1e-9
    ras = planes["4-chamber"].to_ras()
    np.testing.assert_allclose(ras["normal"], planes["4-chamber"].normal * [-1, -1, 1])


def test_missing_lv_is_a_clear_error_but_planes_from_points_work(phantom):
    no_lv = phantom.dense_labels.with_data(np.where(np.rint(phantom.dense_labels.data) == 3, 0, phantom.dense_labels.data))
    with pytest.raises(InputError, match="LV cavity.*0 slice.*give the planes by points"):
        standard_planes(no_lv, 0)
    a, b, c = np.array([0.0, 0, 0]), np.array([10.0, 0, 0]), np.array([0.0, 5, 0])
    plane = Plane.from_points("user", a, b, c)
    assert np.allclose([plane.distance(p) for p in (a, b, c)], 0)
    # As the automatic planes: the axis from the centre towards the second point (the apex) runs up the image, the third point is on the right.
    np.testing.assert_allclose(plane.v, [-1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(plane.u, [0, 1, 0], atol=1e-12)
    mirrored = Plane.from_points("user", a, b, np.array([0.0, -5, 0]))
    np.testing.assert_allclose(mirrored.v, plane.v, atol=1e-12)
    np.testing.assert_allclose(mirrored.u, [0, -1, 0], atol=1e-12)  # the third point on the right again
    with pytest.raises(InputError, match="parallel to the normal"):
        Plane("axis along the normal", a, np.array([0.0, 0, 1]), np.array([0.0, 0, 2]))
    assert reslice(phantom.dense, Plane.from_points("user", *(phantom.dense.index_to_physical(p) for p in ([10, 10, 5], [80, 10, 5], [10, 10, 60]))), 2.0).n_slices == 1
    with pytest.raises(InputError, match="plane bad from points: the third point lies on the line through the first two"):
        Plane.from_points("bad", a, a + (b - a), a + 2 * (b - a))
    with pytest.raises(InputError, match="plane bad from points: the first two points coincide"):
        Plane.from_points("bad", a, a.copy(), c)


# ---------------------------------------------------------------- reslicing
def test_reslice_of_a_linear_pattern_is_exact_and_placed_right():
    stack = oblique_stack(frames=2, slices=6, rows=30, columns=28)
    gradient, offset = np.array([0.5, -1.25, 2.0]), 7.0
    points = stack.index_to_physical(np.stack(np.meshgrid(np.arange(28), np.arange(30), np.arange(6), indexing="ij"), axis=-1).astype(float))
    pattern = (points @ gradient + offset).transpose(2, 1, 0)  # (Z, Y, X)
    stack = stack.with_data(np.stack([pattern, 2 * pattern]).astype(np.float32))
    centre = stack.index_to_physical([13.5, 14.5, 2.5])
    plane = Plane("oblique", centre, np.array([0.3, 0.9, 0.2]), np.array([1.0, 0.0, -0.5]))
    cut = reslice(stack, plane, spacing_mm=0.7, size_mm=(20.0, 16.0))
    assert cut.shape[:2] == (2, 1) and cut.spacing[:2] == (0.7, 0.7)
    np.testing.assert_allclose(cut.direction[:, 2], plane.normal, atol=1e-12)
    rows, columns = cut.shape[2:]
    jj, ii = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    where = cut.index_to_physical(np.stack([ii, jj, np.zeros_like(ii)], axis=-1).astype(float))
    assert np.abs(plane.distance(where)).max() < 1e-9
    np.testing.assert_allclose(where[rows // 2, columns // 2], centre, atol=0.7)
    expected = where @ gradient + offset
    np.testing.assert_allclose(cut.data[0, 0], expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(cut.data[1, 0], 2 * expected, rtol=1e-4, atol=2e-3)


def test_sparse_stacks_can_be_shown_as_acquired_slabs(phantom):
    plane = standard_planes(phantom.dense_labels, 0)["4-chamber"]
    slabs = reslice(phantom.sparse, plane, 1.0, through_plane="nearest").data[0, 0]
    blended = reslice(phantom.sparse, plane, 1.0).data[0, 0]
    # Nearest-slice sampling only takes values that exist in-plane in one acquired slice:
    # along the axis (rows) the image is piecewise constant in slabs, the linear one is not.
    tolerance = 1e-4 * float(slabs.max() - slabs.min())
    assert np.mean(np.abs(np.diff(slabs, axis=0)) < tolerance) > 0.8  # constant within each slab
    assert np.mean(np.abs(np.diff(blended, axis=0)) < tolerance) < 0.4  # blended between slabs


def test_label_reslice_is_nearest_and_pngs_are_written(phantom, tmp_path):
    plane = standard_planes(phantom.dense_labels, 0)["4-chamber"]
    labels = reslice(phantom.dense_labels, plane, 1.0, order=0)
    assert set(np.unique(labels.data)) <= {0.0, 1.0, 2.0, 3.0} and {1.0, 3.0} <= set(np.unique(labels.data))
    views = [("sparse", reslice(phantom.sparse, plane, 1.0)), ("truth", reslice(phantom.dense, plane, 1.0))]
    png = save_plane_png(views, tmp_path / "4ch.png", frame=phantom.es_frame, labels=labels)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_comparison_with_an_acquired_long_axis_image(phantom):
    plane = standard_planes(phantom.dense_labels, 0)["2-chamber"]
    acquired = reslice(phantom.dense, plane, 1.5)
    exact = compare_with_acquired(phantom.dense, acquired)
    assert exact["psnr_db"] > 40 and exact["ncc"] > 0.999 and exact["ssim"] > 0.98
    linear = compare_with_acquired(upsample_linear(phantom.sparse, 8), acquired)
    assert linear["psnr_db"] < exact["psnr_db"] and linear["ncc"] < exact["ncc"]
    assert len(linear["frames"]) == phantom.dense.n_frames
    away = Plane("far", plane.centre + 1000 * plane.normal, plane.normal, plane.u)
    with pytest.raises(InputError, match="does not reach"):
        compare_with_acquired(phantom.dense, reslice(phantom.dense, away, 1.5, size_mm=(50, 50)))
    middle = phantom.dense.n_slices // 2
    one_slice = phantom.dense.with_data(phantom.dense.data[:, middle : middle + 1], origin=tuple(phantom.dense.slice_origin(middle)))
    with pytest.raises(InputError, match="pixel band of this long-axis plane: too thin"):
        compare_with_acquired(one_slice, acquired)  # a band narrower than SSIM's window, once a crash


# ---------------------------------------------------------------- surfaces
def test_surfaces_are_closed_in_place_and_round_trip(phantom, tmp_path):
    labels = phantom.dense_labels
    corners = stack_corners(labels)
    for value in (1, 2, 3):
        surface = label_surface(labels, value, frame=phantom.es_frame)
        points = surface_points(surface)
        assert len(points) > 100
        margin = max(labels.spacing)
        assert np.all(points >= corners.min(axis=0) - margin) and np.all(points <= corners.max(axis=0) + margin)
        centroid = structure_centroid(labels, value, phantom.es_frame)
        assert np.linalg.norm(points.mean(axis=0) - centroid) < 3.0, value
        if value != 2:  # cavities are simple closed shapes: the enclosed volume matches the voxels
            assert enclosed_volume_ml(surface) == pytest.approx(structure_volumes_ml(labels, value)[phantom.es_frame], rel=0.04)
    lv = label_surface(labels, 3, 0)
    for suffix in (".vtp", ".stl", ".obj"):
        path = write_surface(lv, tmp_path / f"lv{suffix}")
        back = surface_points(read_surface(path))
        np.testing.assert_allclose(back.mean(axis=0), surface_points(lv).mean(axis=0), atol=1e-3)
    with pytest.raises(OutputError, match="unknown surface format"):
        write_surface(lv, tmp_path / "lv.ply")
    assert label_surface(labels.with_data(np.zeros(labels.shape, np.float32)), 3).GetNumberOfPoints() == 0


def test_offscreen_render_of_the_surfaces(phantom, tmp_path, monkeypatch):
    if "VTK_DEFAULT_OPENGL_WINDOW" not in os.environ:
        monkeypatch.setenv("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    surfaces = {name: label_surface(phantom.dense_labels, value, 0) for name, value in (("RV cavity", 1), ("LV myocardium", 2), ("LV cavity", 3))}
    png = render_surfaces(surfaces, tmp_path / "heart.png", size=(320, 240), view_direction_lps=phantom.dense.direction[:, 1])
    import vtk

    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(png))
    reader.Update()
    from vtk.util import numpy_support

    pixels = numpy_support.vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars())
    assert len(pixels) == 320 * 240
    assert len(np.unique(pixels, axis=0)) > 50  # shaded surfaces, not a blank frame


# ---------------------------------------------------------------- volumes
def test_volumes_and_ejection_fraction_against_the_phantom(phantom, tmp_path):
    dense = cardiac_function(phantom.dense_labels, method="dense truth")
    assert dense.es_frame == phantom.es_frame and dense.ed_frame == int(np.argmax(phantom.lv_volume_curve))
    assert dense.summary["lv_ef_percent"] == pytest.approx(100 * phantom.anatomy["ejection_fraction"], abs=2.0)
    assert dense.summary["rv_ef_percent"] == pytest.approx(100 * phantom.anatomy["rv_ejection_fraction"], abs=4.0)
    np.testing.assert_allclose(dense.lv_volume_ml / dense.lv_volume_ml.max(), phantom.lv_volume_curve / phantom.lv_volume_curve.max(), atol=0.03)
    assert dense.summary["lv_mass_ed_g"] == pytest.approx(dense.lv_myocardium_ml[dense.ed_frame] * MYOCARDIAL_DENSITY_G_PER_ML)
    voxel_ml = np.prod(phantom.dense_labels.spacing) / 1000
    assert dense.lv_volume_ml[0] == pytest.approx((np.rint(phantom.dense_labels.data[0]) == 3).sum() * voxel_ml)
    sparse = cardiac_function(phantom.sparse_labels, method="Simpson (sparse)")
    assert 0 < sparse.summary["lv_edv_ml"] < 1.5 * dense.summary["lv_edv_ml"]
    given = cardiac_function(phantom.dense_labels, ed_frame=1, es_frame=2)
    assert given.summary["lv_edv_ml"] == pytest.approx(dense.lv_volume_ml[1])
    with pytest.raises(InputError, match="ES frame 99 does not exist"):
        cardiac_function(phantom.dense_labels, es_frame=99)
    with pytest.raises(InputError, match="no LV cavity"):
        cardiac_function(phantom.dense_labels.with_data(np.zeros(phantom.dense_labels.shape, np.float32)))
    csv_path = write_function_csv({"dense": dense, "sparse": sparse}, tmp_path / "volumes.csv")
    text = csv_path.read_text()
    assert text.count("\n") > 2 * phantom.dense.n_frames and "lv_ef_percent" in text and ",ES" in text
    assert text.splitlines()[1].startswith("dense,0,,")  # no record says which frames of a cine these are: left blank
    selection = cardiac_function(phantom.dense_labels.select_frames([1, 3]))
    assert [row["cine_frame"] for row in selection.rows()] == [1, 3] and [row["frame"] for row in selection.rows()] == [0, 1]
    assert plot_volume_curves({"dense": dense, "sparse": sparse}, tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")


def test_dense_stack_covers_the_same_slab_as_simpsons_method():
    """A cylinder of equal area in every slice: discs summation gives the same volume before and after upsampling."""
    data = np.zeros((1, 5, 20, 20), dtype=np.float32)
    data[:, :, 5:15, 6:14] = 3
    sparse = CineStack(data, spacing=(1.5, 1.5, 10.0))
    simpson = structure_volumes_ml(sparse, 3)[0]
    assert simpson == pytest.approx(10 * 8 * 1.5 * 1.5 * 10 * 5 / 1000)
    dense = upsample_linear(sparse, 4)  # labels stay 3 everywhere: the cylinder on the dense grid
    assert structure_volumes_ml(dense, 3)[0] == pytest.approx(simpson)
    stripped = dense.with_data(dense.data, metadata={})  # the record lost, as NRRD or DICOM labels lose it
    assert structure_volumes_ml(stripped, 3)[0] < simpson
    assert structure_volumes_ml(stripped, 3, acquired_slice_spacing_mm=10.0)[0] == pytest.approx(simpson)


def test_a_stack_upsampled_twice_keeps_the_acquired_spacing_for_simpsons_end_slabs(tmp_path):
    """x2 of a x2 output: the end slices stand for half the acquired 10 mm gap, not half of the 5 mm
    one it was upsampled from, also after a round trip through a file; the acquired slices stay marked."""
    data = np.zeros((1, 5, 20, 20), dtype=np.float32)
    data[:, :, 5:15, 6:14] = 3
    sparse = CineStack(data, spacing=(1.5, 1.5, 10.0))
    simpson = structure_volumes_ml(sparse, 3)[0]
    twice = upsample_linear(upsample_linear(sparse, 2), 2)
    record = twice.metadata["upsampling"]
    assert twice.slice_spacing == pytest.approx(2.5) and record["input_slice_spacing_mm"] == pytest.approx(5.0)
    assert record["acquired_slice_spacing_mm"] == pytest.approx(10.0) and twice.recorded_acquired_spacing() == pytest.approx(10.0)
    assert record["acquired_slice_indices"] == [0, 4, 8, 12, 16]
    assert np.array_equal(twice.data[:, record["acquired_slice_indices"]], sparse.data)
    assert record["earlier_upsampling"] == [{"mode": "linear", "factor": 2}]
    assert structure_volumes_ml(twice, 3)[0] == pytest.approx(simpson)
    back = read_stack(write_stack(twice, tmp_path / "twice.nrrd"))
    assert structure_volumes_ml(back, 3)[0] == pytest.approx(simpson)
    three = upsample_linear(back, 2)  # the chain goes on
    assert three.metadata["upsampling"]["acquired_slice_indices"] == [0, 8, 16, 24, 32]
    assert [step["factor"] for step in three.metadata["upsampling"]["earlier_upsampling"]] == [2, 2]
    assert structure_volumes_ml(three, 3)[0] == pytest.approx(simpson)


def test_a_malformed_recorded_acquired_spacing_is_not_used():
    labels = _cine_labels([10, 6], [12, 9], spacing=(1.5, 1.5, 2.5))
    for bad in ("10", None, True, float("nan"), -10.0, [10.0]):
        labels.metadata["upsampling"] = {"mode": "linear", "acquired_slice_spacing_mm": bad}
        assert labels.recorded_acquired_spacing() is None
    labels.metadata["upsampling"] = {"mode": "linear", "acquired_slice_spacing_mm": "x", "input_slice_spacing_mm": 7.5}  # the spacing upsampled from, as older files record it
    assert labels.recorded_acquired_spacing() == 7.5


def _cine_labels(lv_areas, rv_areas, spacing=(1.5, 1.5, 10.0)):
    """Labels whose LV and RV cavities are squares of the given side lengths (pixels) per frame, 3 slices."""
    data = np.zeros((len(lv_areas), 3, 40, 40), dtype=np.float32)
    for t, (lv, rv) in enumerate(zip(lv_areas, rv_areas)):
        data[t, :, 2 : 2 + lv, 2 : 2 + lv] = 3
        data[t, :, 22 : 22 + rv, 22 : 22 + rv] = 1
    return CineStack(data, spacing=spacing)


def test_each_ventricle_gets_its_own_end_systole_and_failed_frames_are_left_out():
    """SCMR: the RV's end-systole may be another frame than the LV's. A frame without any LV (a failed
    segmentation) must not become end-systole (EF near 100 %)."""
    labels = _cine_labels(lv_areas=[10, 8, 6, 7, 9], rv_areas=[12, 11, 9, 7, 10])
    function = cardiac_function(labels)
    assert (function.ed_frame, function.es_frame, function.rv_ed_frame, function.rv_es_frame) == (0, 2, 0, 3)
    voxel_ml = 1.5 * 1.5 * 10.0 * 3 / 1000
    assert function.summary["rv_esv_ml"] == pytest.approx(7 * 7 * voxel_ml)
    assert function.summary["rv_ef_percent"] == pytest.approx(100 * (144 - 49) / 144)
    assert [row["phase"] for row in function.rows()] == ["ED", "", "ES", "RV ES", ""]
    assert function.warnings == []
    given = cardiac_function(labels, ed_frame=0, es_frame=2)  # given frames hold for both ventricles
    assert given.rv_es_frame == 2 and given.summary["rv_esv_ml"] == pytest.approx(81 * voxel_ml)
    failed = labels.with_data(labels.data.copy())
    failed.data[4][failed.data[4] == 3] = 0
    measured = cardiac_function(failed)
    assert measured.es_frame == 2 and measured.summary["lv_ef_percent"] == pytest.approx(100 * (100 - 36) / 100)
    assert any("frame(s) 4 have no LV cavity" in w for w in measured.warnings)
    no_rv = labels.with_data(labels.data.copy())
    no_rv.data[1][no_rv.data[1] == 1] = 0  # the RV lost in frame 1: not an RV end-systole of 0 ml (EF 100 %)
    measured = cardiac_function(no_rv)
    assert measured.rv_es_frame == 3 and measured.summary["rv_ef_percent"] == pytest.approx(100 * (144 - 49) / 144)
    assert any("frame(s) 1 have no RV cavity" in w for w in measured.warnings)


def test_an_acquired_slice_spacing_below_the_stacks_own_is_refused():
    """A dense stack's end slices stand for half an acquired gap more; a smaller 'acquired' spacing
    would shrink them, a negative one give negative volumes."""
    labels = _cine_labels([10, 6], [12, 9], spacing=(1.5, 1.5, 2.5))
    for bad in (-10.0, 0.0, 1.0):
        with pytest.raises(InputError, match="--acquired-slice-spacing: acquired slice spacing"):
            cardiac_function(labels, acquired_slice_spacing_mm=bad)
    assert cardiac_function(labels, acquired_slice_spacing_mm=10.0).summary["lv_edv_ml"] > cardiac_function(labels).summary["lv_edv_ml"]


def test_one_frame_gives_no_ejection_fraction_and_no_geometry_gives_a_warning():
    one = cardiac_function(_cine_labels([10], [12]))
    assert math.isnan(one.summary["lv_ef_percent"]) and math.isnan(one.summary["lv_sv_ml"]) and math.isnan(one.summary["rv_ef_percent"])
    assert one.summary["lv_edv_ml"] > 0 and any("same frame" in w for w in one.warnings)
    bare = cardiac_function(_cine_labels([10, 6], [12, 9], spacing=(1.0, 1.0, 1.0)))
    assert any("no geometry" in w and "voxels, not ml" in w for w in bare.warnings)
    assert bare.summary["lv_ef_percent"] == pytest.approx(100 * (100 - 36) / 100)  # still meaningful
    # a dense stack made from such a file: its spacings are no longer all 1 mm, but it has no geometry either
    dense = upsample_linear(_cine_labels([10, 6], [12, 9], spacing=(1.0, 1.0, 1.0)), 2)
    assert dense.slice_spacing == 0.5 and not dense.has_placeholder_spacing
    assert any("upsampled from a stack whose spacings were all exactly 1 mm" in w and "voxels, not ml" in w for w in cardiac_function(dense).warnings)
    real = upsample_linear(_cine_labels([10, 6], [12, 9], spacing=(1.0, 1.0, 8.0)), 2)  # 1 mm pixels, 8 mm slices: a real geometry
    assert not any("no geometry" in w for w in cardiac_function(real).warnings)


def test_calid_volumes_without_geometry_prints_voxels_not_ml_and_no_mass(tmp_path, capsys):
    from calid.cli import main

    write_stack(_cine_labels([10, 6], [12, 9], spacing=(1.0, 1.0, 1.0)), tmp_path / "bare.nii.gz", dtype="uint8")
    assert main(["volumes", str(tmp_path / "bare.nii.gz"), "--out", str(tmp_path / "function")]) == 0
    said = capsys.readouterr()
    assert "ml*, ESV" in said.out and "mass unknown (no geometry)" in said.out and " ml," not in said.out
    assert "* not ml: the file has no geometry, and these count its placeholder 1 mm pixels" in said.out
    assert "voxels, not ml" in said.err and "no record of the acquired spacing" not in said.err  # one warning, about what matters
    write_stack(_cine_labels([10, 6], [12, 9], spacing=(1.5, 1.5, 8.0)), tmp_path / "real.nii.gz", dtype="uint8")
    assert main(["volumes", str(tmp_path / "real.nii.gz"), "--out", str(tmp_path / "real")]) == 0
    said = capsys.readouterr().out
    assert " ml, ESV" in said and " g; RV" in said


def test_comparison_matches_frames_of_the_same_cardiac_phase(phantom):
    """A long-axis cine acquired with fewer frames over the same beat: frame k is not frame k."""
    plane = standard_planes(phantom.dense_labels, 0)["2-chamber"]
    every_other = list(range(0, phantom.dense.n_frames, 2))
    acquired = reslice(phantom.dense, plane, 1.5).select_frames(every_other)
    assert acquired.n_frames < phantom.dense.n_frames and phantom.dense.frame_times_ms is not None
    by_time = compare_with_acquired(phantom.dense, acquired)
    assert by_time["frames_matched_by"] == "trigger time"
    assert [f["stack_frame"] for f in by_time["frames"]] == every_other
    assert min(f["psnr_db"] for f in by_time["frames"]) > 40
    # Without trigger times: the same fraction of the cycle (an acquired cine of its own, with no record of selected frames).
    dense_untimed = phantom.dense.with_data(phantom.dense.data, frame_times_ms=None)
    untimed = compare_with_acquired(dense_untimed, acquired.with_data(acquired.data, frame_times_ms=None, metadata={}))
    assert untimed["frames_matched_by"] == "fraction of the cycle"
    assert [f["stack_frame"] for f in untimed["frames"]] == every_other
    assert untimed["psnr_db"] == pytest.approx(by_time["psnr_db"])
    # Frames selected from the same cine record their numbers: the same pairing, by number.
    by_number = compare_with_acquired(dense_untimed, acquired.with_data(acquired.data, frame_times_ms=None))
    assert by_number["frames_matched_by"] == "recorded frame numbers" and [f["stack_frame"] for f in by_number["frames"]] == every_other
    # Matching by index would have compared other phases of the beat: the heart moves between them.
    assert np.abs(phantom.dense.data[every_other[-1]] - phantom.dense.data[acquired.n_frames - 1]).max() > 0.1 * np.ptp(phantom.dense.data)
    # A stack of fewer frames (only some upsampled) is scored on the acquired frames of its phases only.
    some = phantom.dense.select_frames([0, 4])
    partial = compare_with_acquired(some, reslice(phantom.dense, plane, 1.5))
    assert [(f["frame"], f["stack_frame"]) for f in partial["frames"]] == [(0, 0), (4, 1)] and partial["psnr_db"] > 40
    # One frame asked for: the same rule (the CLI's --compare views).
    assert matching_frame(phantom.dense, acquired, 1) == every_other[1]
    with pytest.raises(InputError, match="does not exist"):
        matching_frame(phantom.dense, acquired, acquired.n_frames)


@pytest.mark.parametrize("written_as", ["ed_es.nii.gz", "ed_es.seq.nrrd", "ed_es_dicom"])
def test_a_selection_of_frames_is_paired_with_its_cine_by_recorded_frame_numbers(tmp_path, written_as):
    """ACDC cines carry no trigger times: frame 1 of `--frames 0,11` is frame 11 of the cine, not the
    frame at the same fraction of the cycle; the numbers survive a round trip through each of calid's formats."""
    cine = oblique_stack(frames=30, slices=3)
    cine.frame_times_ms = None
    selection = read_stack(write_stack(cine.select_frames([0, 11]), tmp_path / written_as))
    assert selection.frame_times_ms is None and frame_matching(selection, cine) == "recorded frame numbers"
    assert matching_frame(cine, selection, 1) == 11 and matching_frame(selection, cine, 11) == 1 and matching_frame(selection, cine, 3) == 0
    again = selection.select_frames([1])  # a selection of a selection keeps the cine's numbers
    assert again.metadata["source_frames"] == [11] and matching_frame(cine, again, 0) == 11
    # A whole cine upsampled (its record lists every frame) is no selection: paired with another cine by cycle fraction.
    whole = upsample_linear(cine, 2)
    whole.metadata["upsampling"]["frames"] = list(range(30))
    forty = oblique_stack(frames=40, slices=1)
    forty.frame_times_ms = None
    assert frame_matching(whole, forty) == "fraction of the cycle" and matching_frame(whole, forty, 20) == 15
    # Another cine of the same beat (a long-axis cine of 25 frames, no times): paired by the fraction of the cycle.
    long_axis = oblique_stack(frames=25, slices=1)
    long_axis.frame_times_ms = None
    assert matching_frame(long_axis, selection, 1) == round(11 / 30 * 25) and matching_frame(selection, long_axis, 24) == 0  # the cycle wraps round


def test_labels_on_another_grid_are_resampled_onto_the_view(phantom):
    """A DICOM round trip can reverse the slice order: the same anatomy on another grid outlines the same."""
    plane = standard_planes(phantom.dense_labels, 0)["4-chamber"]
    view = reslice(phantom.dense, plane, 1.5)
    same_grid = reslice(phantom.dense_labels, plane, 1.5, order=0)
    np.testing.assert_array_equal(resample_onto(phantom.dense_labels, view).data, same_grid.data)
    reversed_labels = phantom.dense_labels.with_data(phantom.dense_labels.data[:, ::-1].copy(), origin=tuple(phantom.dense_labels.slice_origin(phantom.dense_labels.n_slices - 1)),
                                                direction=phantom.dense_labels.direction * [1, 1, -1])  # the same anatomy, slices stored last to first
    assert not reversed_labels.same_geometry(phantom.dense)
    np.testing.assert_array_equal(resample_onto(reversed_labels, view).data, same_grid.data)
