from __future__ import annotations

import numpy as np
import pytest

from calid.data.stack import CineStack
from calid.errors import InputError

from conftest import oblique_stack


def test_index_physical_round_trip_and_slice_positions():
    stack = oblique_stack()
    index = np.array([[0, 0, 0], [3.5, 2.0, 4.0], [9, 11, 4]], dtype=float)
    points = stack.index_to_physical(index)
    np.testing.assert_allclose(stack.physical_to_index(points), index, atol=1e-9)
    # Voxel (0, 0, k) lies k * slice spacing along the normal from the origin.
    np.testing.assert_allclose(points[0], stack.origin)
    positions = stack.slice_positions()
    np.testing.assert_allclose(np.diff(positions), stack.slice_spacing)
    np.testing.assert_allclose(positions[0], np.dot(stack.origin, stack.slice_normal))
    # The 4x4 matrix agrees with the point transform.
    homogeneous = np.c_[index, np.ones(3)] @ stack.index_to_physical_matrix.T
    np.testing.assert_allclose(homogeneous[:, :3], points)


def test_right_handed_keeps_every_voxel_at_its_physical_place():
    stack = oblique_stack()
    flipped_direction = stack.direction.copy()
    flipped_direction[:, 2] *= -1
    left = stack.with_data(stack.data, direction=flipped_direction)
    assert not left.is_right_handed
    right = left.right_handed()
    assert right.is_right_handed
    # voxel (x, y, k) of the left stack is voxel (x, y, Z-1-k) of the right one
    for k in range(left.n_slices):
        np.testing.assert_allclose(left.index_to_physical([2, 3, k]), right.index_to_physical([2, 3, left.n_slices - 1 - k]), atol=1e-9)
        np.testing.assert_array_equal(left.data[:, k], right.data[:, left.n_slices - 1 - k])


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (np.zeros((2, 3, 4)), {}, "4 axes"),
        (np.zeros((1, 0, 4, 4)), {}, "empty axis"),
        (np.full((1, 2, 4, 4), np.nan), {}, "NaN"),
        (np.zeros((1, 2, 4, 4)), {"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        (np.zeros((1, 2, 4, 4)), {"direction": np.diag([1.0, 2.0, 1.0])}, "orthonormal"),
        (np.zeros((2, 2, 4, 4)), {"frame_times_ms": [0.0, 0.0]}, "strictly increasing"),
        (np.zeros((2, 2, 4, 4)), {"frame_times_ms": [0.0]}, "frame times"),
    ],
)
def test_invalid_stacks_are_refused_with_their_source(data, kwargs, message):
    with pytest.raises(InputError, match=message) as caught:
        CineStack(data=data, source="scan.nii.gz", **kwargs)
    assert "scan.nii.gz" in str(caught.value)


def test_select_frames_keeps_times_and_refuses_missing_frames():
    stack = oblique_stack(frames=3)
    picked = stack.select_frames([0, 2])
    np.testing.assert_array_equal(picked.data[1], stack.data[2])
    np.testing.assert_allclose(picked.frame_times_ms, stack.frame_times_ms[[0, 2]])
    with pytest.raises(InputError, match="frame 5"):
        stack.select_frames([5])
