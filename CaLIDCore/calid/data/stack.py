"""`CineStack`: a short-axis cine (or a single 3D stack) with its physical geometry.

Conventions (the same as ITK, SimpleITK and DICOM):

* ``data`` has shape ``(T, Z, Y, X)``: frames, slices, rows, columns; float32, or
  float64 for voxel types that float32 cannot hold exactly (see :func:`holding_dtype`).
* Physical coordinates are **LPS** millimetres (DICOM patient coordinates).
  Readers and writers convert where a format uses RAS (NIfTI, Slicer's RAS
  space in NRRD files is converted on read).
* ``spacing`` is ``(sx, sy, sz)``: column, row and slice spacing in mm.
* ``direction`` is a 3x3 matrix whose *columns* are the unit vectors of the
  x (column), y (row) and z (slice) index axes in LPS.
* ``origin`` is the LPS position of the centre of voxel ``(x, y, z) = (0, 0, 0)``.

So the physical point of index ``(i, j, k)`` (x, y, z order) is
``origin + direction @ (spacing * (i, j, k))``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calid.errors import InputError

#: The metadata keys of :meth:`CineStack.selection_record`: which frames of which cine a selection holds.
SELECTION_KEYS = ("source_frames", "source_frame_count", "source_cine")

#: Relative tolerance used to decide that two geometries are the same.
GEOMETRY_RTOL = 1e-5


def holding_dtype(dtype: np.dtype[Any] | type) -> np.dtype[Any]:
    """The float type voxels of ``dtype`` are held in: float32 when it keeps every value exactly
    (8- and 16-bit integers, float16, float32, bool: what scanners write), else float64 (float64,
    32- and 64-bit integers), so that acquired slices are written back bit for bit."""
    return np.dtype(np.float32) if np.can_cast(dtype, np.float32, casting="safe") else np.dtype(np.float64)


@dataclass(eq=False)
class CineStack:
    """Image data ``(T, Z, Y, X)`` float32 (float64 where needed) plus exact physical geometry.

    Args:
        data: array of shape ``(T, Z, Y, X)``; converted (C-contiguous) to float32, or to float64
            when float32 would round its values (:func:`holding_dtype`).
        spacing: ``(sx, sy, sz)`` in mm: in-plane column and row spacing, then the
            distance between slice centres along the slice normal.
        origin: LPS position (mm) of the centre of the first voxel.
        direction: 3x3 matrix, columns = unit vectors of the x, y, z index axes.
        frame_times_ms: trigger time of every frame in ms (length T, strictly
            increasing) or ``None`` when unknown.
        metadata: free-form JSON-serialisable information (source file, source
            dtype, subject id, provenance of generated slices ...).
        source: where the stack came from (used in error messages only).
    """

    data: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    frame_times_ms: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    #: The file or folder read, as an absolute path (``source`` is as the user named it, perhaps relative
    #: to a working directory that has changed since): what ``write_stack`` never replaces unasked.
    source_path: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self.source
        data = np.asarray(self.data)
        if data.ndim != 4:
            raise InputError(where, f"image data must have 4 axes (T, Z, Y, X), got shape {data.shape}")
        if 0 in data.shape:
            raise InputError(where, f"image has an empty axis: shape (T, Z, Y, X) = {data.shape}")
        if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise InputError(where, f"image data type {data.dtype} is not numeric")
        data = np.ascontiguousarray(data, dtype=holding_dtype(data.dtype))
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise InputError(where, f"image contains {bad} NaN or infinite voxel value(s)")
        self.data = data

        spacing = np.asarray(self.spacing, dtype=np.float64).reshape(-1)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise InputError(where, f"spacing must be 3 positive finite numbers (sx, sy, sz) in mm, got {self.spacing}")
        self.spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))

        origin = np.asarray(self.origin, dtype=np.float64).reshape(-1)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise InputError(where, f"origin must be 3 finite numbers in mm, got {self.origin}")
        self.origin = (float(origin[0]), float(origin[1]), float(origin[2]))

        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise InputError(where, f"direction must be a finite 3x3 matrix, got {direction!r}")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise InputError(where, "direction cosines are not orthonormal (sheared or scaled axes are not supported)")
        self.direction = direction

        if self.frame_times_ms is not None:
            times = np.asarray(self.frame_times_ms, dtype=np.float64).reshape(-1)
            if times.shape != (self.n_frames,):
                raise InputError(where, f"{times.size} frame times given for {self.n_frames} frame(s)")
            if not np.all(np.isfinite(times)):
                raise InputError(where, "frame times contain NaN or infinite values")
            if times.size > 1 and np.any(np.diff(times) <= 0):
                raise InputError(where, f"frame times must be strictly increasing, got {times.tolist()}")
            self.frame_times_ms = times
        self.metadata = dict(self.metadata)

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(T, Z, Y, X)``."""
        t, z, y, x = self.data.shape
        return (t, z, y, x)

    @property
    def n_frames(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[1])

    @property
    def in_plane_spacing(self) -> tuple[float, float]:
        """``(sx, sy)`` in mm."""
        return (self.spacing[0], self.spacing[1])

    @property
    def slice_spacing(self) -> float:
        """Distance between neighbouring slice centres (mm)."""
        return self.spacing[2]

    @property
    def has_placeholder_spacing(self) -> bool:
        """True when all three spacings are exactly 1 mm: NIfTI's default, what a cine saved
        without its geometry carries (a real cine has 5-10 mm between slices)."""
        return self.spacing == (1.0, 1.0, 1.0)

    @property
    def made_from_placeholder_spacing(self) -> bool:
        """True for a stack calid upsampled from one without geometry (see :attr:`has_placeholder_spacing`):
        its pixels are still 1 mm, and its acquired slices are recorded 1 mm apart."""
        return self.in_plane_spacing == (1.0, 1.0) and self.recorded_acquired_spacing() == 1.0

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit vector (LPS) along which the slice index grows."""
        return self.direction[:, 2].copy()

    @property
    def frame_interval_ms(self) -> float | None:
        """Mean time between frames (ms), or None when unknown or T = 1."""
        if self.frame_times_ms is None or self.n_frames < 2:
            return None
        return float(np.mean(np.diff(self.frame_times_ms)))

    # --------------------------------------------------------------- geometry
    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (x, y, z, 1) voxel indices to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        matrix[:3, 3] = self.origin
        return matrix

    def index_to_physical(self, index_xyz: np.ndarray | list[float] | tuple[float, ...]) -> np.ndarray:
        """Voxel indices ``(..., 3)`` in (x, y, z) order -> LPS points ``(..., 3)``."""
        index = np.asarray(index_xyz, dtype=np.float64)
        return index @ (self.direction * np.asarray(self.spacing)[None, :]).T + np.asarray(self.origin)

    def physical_to_index(self, points_lps: np.ndarray | list[float] | tuple[float, ...]) -> np.ndarray:
        """LPS points ``(..., 3)`` -> continuous voxel indices ``(..., 3)`` in (x, y, z) order."""
        points = np.asarray(points_lps, dtype=np.float64) - np.asarray(self.origin)
        return (points @ self.direction) / np.asarray(self.spacing)

    def slice_positions(self) -> np.ndarray:
        """Signed position (mm) of every slice centre along the slice normal.

        Measured from the LPS origin (0, 0, 0), like DICOM's position along the
        normal, so stacks of the same acquisition can be compared directly.
        """
        start = float(np.dot(np.asarray(self.origin), self.slice_normal))
        return start + self.slice_spacing * np.arange(self.n_slices, dtype=np.float64)

    def slice_origin(self, z: float) -> np.ndarray:
        """LPS position of voxel (0, 0, z); z may be fractional."""
        return np.asarray(self.origin) + self.direction[:, 2] * self.slice_spacing * float(z)

    def same_geometry(self, other: CineStack, check_shape: bool = True) -> bool:
        """True when both stacks share spacing, origin, direction (and shape)."""
        if check_shape and self.shape[1:] != other.shape[1:]:
            return False
        scale = max(1.0, float(np.max(np.abs(self.origin))))
        return bool(
            np.allclose(self.spacing, other.spacing, rtol=GEOMETRY_RTOL, atol=0)
            and np.allclose(self.origin, other.origin, rtol=0, atol=GEOMETRY_RTOL * scale)
            and np.allclose(self.direction, other.direction, rtol=0, atol=GEOMETRY_RTOL)
        )

    @property
    def is_right_handed(self) -> bool:
        """True when the slice axis is x cross y (always so in DICOM)."""
        return bool(np.linalg.det(self.direction) > 0)

    def right_handed(self) -> CineStack:
        """The same physical image with the slice order reversed if needed so that z = x cross y.

        DICOM can only describe right-handed stacks, so a left-handed NIfTI
        stack comes back from a DICOM round trip in this form.
        """
        if self.is_right_handed:
            return self
        direction = self.direction.copy()
        direction[:, 2] *= -1.0
        last = tuple(self.slice_origin(self.n_slices - 1))
        return self.with_data(self.data[:, ::-1].copy(), origin=last, direction=direction)

    # ------------------------------------------------------------------ copies
    def with_data(self, data: np.ndarray, **changes: Any) -> CineStack:
        """A new stack with other voxel data (and optionally other fields), same geometry otherwise."""
        fields: dict[str, Any] = {
            "spacing": self.spacing,
            "origin": self.origin,
            "direction": self.direction.copy(),
            "frame_times_ms": None if self.frame_times_ms is None else self.frame_times_ms.copy(),
            "metadata": copy.deepcopy(self.metadata),
            "source": self.source,
            "source_path": self.source_path,
        }
        fields.update(changes)
        return CineStack(data=data, **fields)

    def copy(self) -> CineStack:
        return self.with_data(self.data.copy())

    def recorded_frames(self) -> list[int] | None:
        """The frame numbers of the acquired cine that this stack's frames are, as recorded by
        :meth:`select_frames` (or by calid upsample --frames in older files), else None."""
        for stored in (self.metadata.get("source_frames"), self.metadata.get("upsampling", {}).get("frames")):
            if isinstance(stored, list) and len(stored) == self.n_frames and all(isinstance(f, int) for f in stored):
                return [int(f) for f in stored]
        return None

    def recorded_acquired_spacing(self) -> float | None:
        """The spacing (mm) of the acquired slices this upsampled stack was made from, as calid
        recorded it (through a chain of upsamplings too); None for a stack without that record
        (an acquired stack, a file from another tool)."""
        record = self.metadata.get("upsampling")
        if not isinstance(record, dict):
            return None
        # "input_slice_spacing_mm" alone: a file written before chains were recorded.
        for key in ("acquired_slice_spacing_mm", "input_slice_spacing_mm"):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
                return float(value)
        return None

    def acquired_slice_step(self) -> int | None:
        """1 slice in how many of this upsampled stack is acquired (4 for x2 of x2), from calid's
        record; None without a usable record."""
        acquired = self.recorded_acquired_spacing()
        step = None if acquired is None else round(acquired / self.slice_spacing)
        return step if step is not None and step >= 1 else None

    def select_frames(self, frames: list[int] | np.ndarray) -> CineStack:
        """A stack of the given frame indices (increasing, when the frames have times)."""
        frames = [int(f) for f in frames]
        for f in frames:
            if not -self.n_frames <= f < self.n_frames:
                raise InputError(self.source, f"frame {f} does not exist (the cine has {self.n_frames} frame(s))")
        times = None if self.frame_times_ms is None else self.frame_times_ms[frames]
        selected = self.with_data(self.data[frames], frame_times_ms=times)
        for key in SELECTION_KEYS:
            selected.metadata.pop(key, None)
        selected.metadata.update(self.selection_record(frames))
        return selected

    def selection_record(self, frames: list[int]) -> dict[str, Any]:
        """What :meth:`select_frames` records about a selection of (valid) frame indices: which frames
        of the acquired cine they are, of how many, and from which file."""
        # Kept in calid's files: a cine without trigger times can still be paired frame by frame
        # with the whole cine or another selection.
        stored = self.recorded_frames()
        recorded = stored is not None
        numbers = stored if stored is not None else list(range(self.n_frames))
        record: dict[str, Any] = {"source_frames": [numbers[int(f)] for f in frames]}
        # Of how many frames: the cycle fraction of each frame, to pair it with another cine of the beat
        # (unknown for a record that did not keep it: left out rather than guessed).
        count = self.metadata.get("source_frame_count") if recorded else self.n_frames
        if isinstance(count, int):
            record["source_frame_count"] = count
        if not recorded and isinstance(self.metadata.get("source_file"), str):
            # Which file that cine is: a file read back later names itself as "source_file".
            record["source_cine"] = self.metadata["source_file"]
        elif recorded and isinstance(self.metadata.get("source_cine"), str):
            record["source_cine"] = self.metadata["source_cine"]
        return record

    def geometry_dict(self) -> dict[str, Any]:
        """Geometry as plain JSON-serialisable Python values."""
        return {
            "shape_tzyx": list(self.shape),
            "spacing_xyz_mm": list(self.spacing),
            "origin_lps_mm": list(self.origin),
            "direction_lps": self.direction.tolist(),
            "frame_times_ms": None if self.frame_times_ms is None else self.frame_times_ms.tolist(),
        }

    def __repr__(self) -> str:
        t, z, y, x = self.shape
        sx, sy, sz = self.spacing
        return (
            f"CineStack(T={t}, Z={z}, Y={y}, X={x}, spacing=({sx:.4g}, {sy:.4g}, {sz:.4g}) mm, "
            f"origin=({self.origin[0]:.4g}, {self.origin[1]:.4g}, {self.origin[2]:.4g}), source={self.source!r})"
        )


def fixed_placeholder_mm(choice: str | float, words: tuple[str, ...] = ("model", "keep"), option: str = "--placeholder-spacing") -> float | None:
    """The pixel size given as ``--placeholder-spacing MM`` (or as a number); None for one of
    ``words`` (which the caller resolves); anything else, or an implausible size, is an error."""
    text = str(choice).strip().lower()
    if text in words:
        return None
    try:
        value = float(text)
    except ValueError:
        expected = f"{', '.join(words)} or a pixel size in mm" if words else "a pixel size in mm"
        raise InputError(option, f"expected {expected}, got {choice!r}") from None
    if not 0.1 <= value <= 10:
        raise InputError(option, f"a pixel size of {value:g} mm is not plausible for cardiac MRI")
    return value


def label_map_warning(stack: CineStack) -> str | None:
    """A warning when ``stack`` looks like a label map (only the whole values 0-3, as ACDC and calid
    write them) where an image is expected: interpolating or segmenting it runs and makes nonsense
    (the average of RV cavity 1 and LV cavity 3 is myocardium 2)."""
    data = stack.data
    if data.size and float(data.min()) >= 0 and float(data.max()) <= 3 and np.array_equal(data, np.rint(data)):
        return f"{stack.source} holds only the values 0-3: is it a label map (segmentation) rather than an image? Give the grey-level cine here"
    return None


def upsampling_steps(record: Any) -> list[dict[str, Any]]:
    """The steps of calid's upsampling record, first to last: each ``{"mode", "factor"}`` (an
    output upsampled again lists the earlier steps); entries of the wrong kind are left out."""
    if not isinstance(record, dict) or not isinstance(record.get("mode"), str):
        return []
    earlier = record.get("earlier_upsampling")
    steps = [step for step in earlier if isinstance(step, dict)] if isinstance(earlier, list) else []
    return [
        {"mode": step["mode"], "factor": step.get("factor") if isinstance(step.get("factor"), int) and not isinstance(step.get("factor"), bool) else None}
        for step in [*steps, record]
        if isinstance(step.get("mode"), str)
    ]


def describe_upsampling(record: Any) -> str:
    """``linear x2 then registration x2``: how an upsampled stack was made, in words."""
    return " then ".join(f"{step['mode']} x{step['factor'] if step['factor'] is not None else '?'}" for step in upsampling_steps(record))
