from __future__ import annotations

import numpy as np
import pytest

from calid.data.phantom import LV_CAVITY, LV_MYOCARDIUM, RV_CAVITY, PhantomConfig, make_phantom


def test_deterministic_for_a_seed_and_varied_across_seeds(small_phantom):
    again = make_phantom(3, PhantomConfig(n_frames=6, matrix=64, pixel_spacing_mm=3.0, n_slices=10))
    np.testing.assert_array_equal(again.sparse.data, small_phantom.sparse.data)
    np.testing.assert_array_equal(again.dense_labels.data, small_phantom.dense_labels.data)
    other = make_phantom(4, PhantomConfig(n_frames=6, matrix=64, pixel_spacing_mm=3.0, n_slices=10))
    assert not np.array_equal(other.dense_labels.data, small_phantom.dense_labels.data)
    assert other.anatomy != small_phantom.anatomy


def test_labels_agree_with_mr_contrast(small_phantom):
    image, labels = small_phantom.dense.data, small_phantom.dense_labels.data
    blood_lv = image[labels == LV_CAVITY].mean()
    blood_rv = image[labels == RV_CAVITY].mean()
    muscle = image[labels == LV_MYOCARDIUM].mean()
    assert blood_lv > 2.5 * muscle and blood_rv > 2.0 * muscle
    assert set(np.unique(labels)) == {0, RV_CAVITY, LV_MYOCARDIUM, LV_CAVITY}
    # The myocardium encloses the cavity: no cavity voxel touches the background in-plane.
    cavity = labels == LV_CAVITY
    neighbours = np.zeros_like(cavity)
    for axis in (2, 3):
        for shift in (1, -1):
            neighbours |= np.roll(cavity, shift, axis=axis) & (labels == 0)
    assert neighbours.sum() < 0.02 * cavity.sum()


def test_volume_curve_is_cardiac(small_phantom):
    voxel_ml = np.prod(small_phantom.dense.spacing) / 1000.0
    labels = small_phantom.dense_labels.data
    lv = (labels == LV_CAVITY).sum(axis=(1, 2, 3)) * voxel_ml
    myo = (labels == LV_MYOCARDIUM).sum(axis=(1, 2, 3)) * voxel_ml
    assert int(np.argmax(lv)) in (0, len(lv) - 1)  # end-diastole at the start (or end) of the cycle
    assert int(np.argmin(lv)) == small_phantom.es_frame
    ejection_fraction = 1.0 - lv.min() / lv.max()
    assert ejection_fraction == pytest.approx(small_phantom.anatomy["ejection_fraction"], abs=0.06)
    assert 60.0 < lv.max() < 250.0  # ml, a human left ventricle
    assert myo.std() / myo.mean() < 0.06  # muscle volume is conserved while the wall thickens


def test_sparse_slices_are_slab_averages_of_the_dense_truth(small_phantom):
    """Integrate the dense (piecewise-constant) profile over each 8 mm slab on a fine grid."""
    dense, sparse = small_phantom.dense, small_phantom.sparse
    dz = dense.slice_spacing
    thickness = sparse.metadata["slice_thickness_mm"]
    dense_z = np.arange(dense.n_slices) * dz
    for k, centre_index in enumerate(small_phantom.sparse_to_dense_index):
        centre = centre_index * dz
        samples = np.linspace(centre - thickness / 2, centre + thickness / 2, 8001)[:-1] + thickness / 16000
        nearest = np.rint(samples / dz).astype(int)
        counts = np.bincount(nearest, minlength=dense.n_slices)
        expected = np.tensordot(dense.data, counts / counts.sum(), axes=([1], [0]))
        np.testing.assert_allclose(sparse.data[:, k], expected, rtol=2e-3, atol=0.5)
        assert np.all(dense_z[nearest] >= centre - thickness / 2 - dz)


def test_geometry_of_sparse_dense_and_upsampling_truth(small_phantom):
    dense, sparse = small_phantom.dense, small_phantom.sparse
    assert dense.slice_spacing == pytest.approx(sparse.slice_spacing / 8)
    for k, j in enumerate(small_phantom.sparse_to_dense_index):
        np.testing.assert_allclose(sparse.slice_origin(k), dense.slice_origin(j), atol=1e-9)
    np.testing.assert_array_equal(small_phantom.sparse_labels.data, small_phantom.dense_labels.data[:, small_phantom.sparse_to_dense_index])
    truth = small_phantom.truth_for_factor(4)
    assert truth.n_slices == (sparse.n_slices - 1) * 4 + 1
    np.testing.assert_allclose(truth.slice_origin(4), sparse.slice_origin(1), atol=1e-9)
    assert small_phantom.sparse.frame_times_ms is not None and np.all(np.diff(sparse.frame_times_ms) > 0)
    with pytest.raises(ValueError):
        small_phantom.truth_for_factor(3)
    with pytest.raises(ValueError):
        small_phantom.truth_for_factor(0)
    # the slab truth at acquired positions is the acquisition itself; labels share the grid
    np.testing.assert_allclose(truth.data[:, ::4], sparse.data, rtol=1e-6, atol=1e-3)
    labels = small_phantom.labels_for_factor(4)
    assert labels.shape == truth.shape and labels.same_geometry(truth)
    np.testing.assert_array_equal(labels.data[:, ::4], small_phantom.sparse_labels.data)
