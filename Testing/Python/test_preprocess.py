from __future__ import annotations

import numpy as np
import pytest

from calid.data.preprocess import PreprocessConfig, label_centre_lps, preprocess, undo_preprocess
from calid.data.stack import CineStack
from calid.errors import InputError

from conftest import oblique_stack


def smooth_stack() -> CineStack:
    """A smooth image (so resampling loses little) with an int16 range, on an oblique grid."""
    base = oblique_stack(frames=2, slices=3, rows=90, columns=80)
    y, x = np.mgrid[0:90, 0:80]
    pattern = 500 + 300 * np.sin(x / 9.0) * np.cos(y / 11.0)
    data = np.broadcast_to(pattern, base.shape) + 20.0 * np.arange(3)[None, :, None, None]
    return base.with_data(data.astype(np.float32))


def test_identity_config_inverts_exactly():
    stack = smooth_stack()
    config = PreprocessConfig(target_spacing_mm=None, crop_size=None, clip=False)
    processed, params = preprocess(stack, config)
    restored = undo_preprocess(processed, params)
    np.testing.assert_allclose(restored.data, stack.data, atol=1e-3)
    assert restored.same_geometry(stack)


def test_resample_and_crop_invert_within_tolerance_and_keep_geometry():
    stack = smooth_stack()
    config = PreprocessConfig(target_spacing_mm=1.8, crop_size=(64, 64), percentiles=(0.0, 100.0))
    processed, params = preprocess(stack, config)
    assert processed.shape == (2, 3, 64, 64)
    assert processed.data.min() >= -1.0 and processed.data.max() <= 1.0
    assert processed.spacing == pytest.approx((1.8, 1.8, stack.slice_spacing))
    restored = undo_preprocess(processed, params)
    assert restored.same_geometry(stack)
    inside = params.crop_mask()
    assert 0.3 < inside.mean() < 1.0
    # inside the crop, away from its edge, the image comes back within 1.5 % of its range
    core = np.zeros_like(inside)
    rows, cols = np.nonzero(inside)
    core[rows.min() + 3 : rows.max() - 3, cols.min() + 3 : cols.max() - 3] = True
    error = np.abs(restored.data - stack.data)[..., core]
    assert error.max() < 0.015 * 600


def test_a_physical_point_stays_at_its_place():
    stack = oblique_stack(frames=1, slices=3, rows=100, columns=100).with_data(np.zeros((1, 3, 100, 100), np.float32))
    data = stack.data.copy()
    data[0, 1, 61:64, 30:33] = 1000.0  # a bright 3x3 spot around pixel (x=31, y=62)
    data[0, :, 0, 0] = 1.0  # so the percentiles differ
    stack = stack.with_data(data)
    spot = stack.index_to_physical([31.0, 62.0, 1.0])
    processed, _ = preprocess(stack, PreprocessConfig(target_spacing_mm=2.0, crop_size=(96, 96), percentiles=(0, 100)))
    found = np.unravel_index(np.argmax(processed.data[0, 1]), processed.shape[2:])
    where = processed.index_to_physical([found[1], found[0], 1.0])
    assert np.linalg.norm(where - spot) < 2.0 * 1.5  # within about one output pixel


def test_crop_centres_on_a_label_or_point():
    stack = smooth_stack()
    labels = stack.with_data(np.zeros(stack.shape, np.float32))
    labels.data[:, :, 10:20, 60:70] = 1.0
    centre = label_centre_lps(labels)
    processed, params = preprocess(stack, PreprocessConfig(target_spacing_mm=None, crop_size=(32, 32)), centre_lps=centre)
    index = processed.physical_to_index(centre)
    assert abs(index[0] - 15.5) <= 0.5 and abs(index[1] - 15.5) <= 0.5
    # the crop reaches outside the image: padded with the background value -1
    assert processed.data.min() == -1.0
    with pytest.raises(InputError, match="no labelled voxels"):
        label_centre_lps(labels.with_data(np.zeros(labels.shape, np.float32)))


def test_intensity_mapping_records_range_and_type():
    stack = smooth_stack()
    processed, params = preprocess(stack, PreprocessConfig(target_spacing_mm=None, crop_size=None, percentiles=(1, 99)))
    low, high = np.percentile(stack.data, [1, 99])
    assert params.intensity_low == pytest.approx(low) and params.intensity_high == pytest.approx(high)
    assert params.source_dtype == "int16"
    restored = undo_preprocess(processed, params)
    assert restored.data.min() >= stack.data.min() and restored.data.max() <= stack.data.max()
    assert restored.metadata["source_dtype"] == "int16"
    # values inside the percentile window come back exactly
    inside = (stack.data > low) & (stack.data < high)
    np.testing.assert_allclose(restored.data[inside], stack.data[inside], rtol=1e-5, atol=1e-2)


def test_params_serialise_and_inverse_works_on_an_upsampled_stack():
    stack = smooth_stack()
    processed, params = preprocess(stack, PreprocessConfig(target_spacing_mm=1.6, crop_size=(48, 40)))
    params_back = type(params).from_dict(params.to_dict())
    assert params_back == params
    denser = processed.with_data(np.repeat(processed.data, 2, axis=1)[:, :5], spacing=(*processed.spacing[:2], processed.slice_spacing / 2))
    restored = undo_preprocess(denser, params_back)
    assert restored.shape == (2, 5, 90, 80)
    assert restored.slice_spacing == pytest.approx(stack.slice_spacing / 2)
    np.testing.assert_allclose(restored.origin, stack.origin, atol=1e-9)


def test_constant_image_is_refused():
    stack = smooth_stack()
    with pytest.raises(InputError, match="constant intensity"):
        preprocess(stack.with_data(np.ones(stack.shape, np.float32)))
