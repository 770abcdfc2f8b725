"""NRRD reading and writing with pynrrd: 3D volumes and Slicer's volume sequences.

A cine (T > 1) is written as Slicer's ``.seq.nrrd`` layout: ``dimension: 4``,
``kinds: list domain domain domain``, the frame axis first, and the custom
fields ``axis 0 index type:=numeric`` / ``axis 0 index values:=...`` holding
the frame times (ms, with ``units: "ms" ...``), so the file opens in 3D
Slicer as a volume sequence with the right times. The reader accepts the
list axis first or last, and ``space`` in RAS or LPS.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import nrrd
import numpy as np

from calid.atomic import atomic_path
from calid.data.io import cast_for_writing, check_spatial_shape, metadata_record, output_dtype, require_finite, restore_record
from calid.data.stack import CineStack, holding_dtype
from calid.errors import InputError, OutputError

_SPACE_TO_LPS = {
    "left-posterior-superior": np.diag([1.0, 1.0, 1.0]),
    "lps": np.diag([1.0, 1.0, 1.0]),
    "right-anterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    "left-anterior-superior": np.diag([1.0, -1.0, 1.0]),
    "las": np.diag([1.0, -1.0, 1.0]),
}
_DOMAIN_KINDS = {"domain", "space"}
# A cardiac cycle lasts under 20 s: larger sequence index values are milliseconds.
_SECONDS_MAX = 20.0


def read_nrrd(path: str | os.PathLike[str]) -> CineStack:
    """Read a 3D NRRD volume or a 4D volume sequence (``.seq.nrrd``)."""
    path = Path(path)
    try:
        array, header = nrrd.read(str(path), index_order="F")
    except Exception as error:  # pynrrd raises NRRDError, ValueError, EOFError, zlib.error ...
        raise InputError(path, f"cannot be read as NRRD ({error})") from error
    dimension = int(header.get("dimension", array.ndim))
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * dimension)]
    if dimension not in (3, 4):
        raise InputError(path, f"has {dimension} axes; expected a 3D volume or a 4D volume sequence")
    check_spatial_shape(array.shape, path)
    if array.dtype.kind not in "iuf":
        raise InputError(path, f"voxel type {array.dtype} is not a scalar image type")

    list_axis: int | None = None
    if dimension == 4:
        non_domain = [i for i, kind in enumerate(kinds) if kind not in _DOMAIN_KINDS]
        if len(non_domain) != 1:
            raise InputError(path, f"4D NRRD needs exactly one list (time) axis; kinds are {kinds}")
        if kinds[non_domain[0]] not in ("list", "time"):
            raise InputError(path, f"has a '{kinds[non_domain[0]]}' axis (colour or vector image); only scalar volumes and volume sequences are supported")
        list_axis = non_domain[0]
        spatial_axes = [i for i in range(4) if i != list_axis]
    else:
        spatial_axes = [0, 1, 2]

    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _SPACE_TO_LPS:
        raise InputError(path, f"unsupported NRRD space {space!r} (use RAS or LPS)")
    to_lps = _SPACE_TO_LPS[space]
    directions_raw = header.get("space directions")
    geometry_note = None
    if directions_raw is None:
        spacing, origin = _spacings_only(header, spatial_axes, path)
        direction = np.eye(3)
        geometry_note = "the file gives voxel sizes only ('spacings', no 'space directions'): identity orientation assumed, as ITK and Slicer do"
    else:
        directions = np.asarray(directions_raw, dtype=np.float64)
        if directions.shape[0] == dimension:
            directions = directions[spatial_axes]
        if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
            raise InputError(path, f"'space directions' is not three 3D vectors: {directions_raw}")
        axes_lps = (to_lps @ directions.T)  # columns: x, y, z axis vectors (mm)
        spacing = np.linalg.norm(axes_lps, axis=0)
        if np.any(spacing <= 0):
            raise InputError(path, "'space directions' has a zero-length axis")
        direction = axes_lps / spacing
        origin = to_lps @ np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError(path, "the axes are sheared (not perpendicular); such images are not supported")
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt

    data = np.asarray(array, dtype=holding_dtype(array.dtype))
    require_finite(data, path)
    frame_times = None
    if list_axis is None:
        data_tzyx = np.transpose(data, (2, 1, 0))[None]
        frame_times = _single_frame_time(header)
    else:
        # F-order array (a0, a1, a2, a3) -> (T, Z, Y, X)
        x_axis, y_axis, z_axis = spatial_axes
        data_tzyx = np.transpose(data, (list_axis, z_axis, y_axis, x_axis))
        frame_times = _frame_times(header, list_axis, data_tzyx.shape[0])
    metadata: dict[str, Any] = {
        "source_file": path.name,
        "source_format": "nrrd",
        "source_dtype": str(array.dtype),
    }
    if geometry_note is not None:
        metadata["geometry_note"] = geometry_note
    restore_record(metadata, _read_record(header))
    return CineStack(
        data=data_tzyx,
        spacing=tuple(spacing),
        origin=tuple(origin),
        direction=direction,
        frame_times_ms=frame_times,
        metadata=metadata,
        source=str(path),
    )


def _spacings_only(header: dict[str, Any], spatial_axes: list[int], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel size and origin of a NRRD file without ``space directions`` (teem's ``unu`` and older
    tools write ``spacings`` and ``axis mins``), read as ITK (and so Slicer) reads them: identity
    orientation, and the first voxel's centre at ``axis mins`` (node-centred axes) or half a voxel
    inside it (cell-centred or unknown)."""
    spacings_raw = header.get("spacings")
    if spacings_raw is None:
        raise InputError(path, "has neither 'space directions' nor 'spacings'; its voxel size and orientation are unknown")
    try:
        spacings = np.asarray([float(v) for v in spacings_raw], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(path, f"cannot read its 'spacings' {spacings_raw!r}") from error
    if spacings.size > 3:
        spacings = spacings[spatial_axes]
    if spacings.shape != (3,) or not np.all(np.isfinite(spacings)) or np.any(spacings <= 0):
        raise InputError(path, f"'spacings' must give three positive voxel sizes, got {list(spacings_raw)}")
    origin = np.zeros(3)
    mins_raw = header.get("axis mins")
    if mins_raw is not None:
        mins = np.asarray([float(v) for v in mins_raw], dtype=np.float64)
        mins = mins[spatial_axes] if mins.size > 3 else mins
        if mins.shape == (3,) and np.all(np.isfinite(mins)):
            # Per axis, as ITK (teem's nrrdOriginCalculate) reads it: a cell-centred axis, or one of
            # unknown centring, starts half a voxel inside its minimum; a node-centred one on it.
            centres = [str(c).lower() for c in (header.get("centerings") or header.get("centers") or [])]
            node = np.array([axis < len(centres) and centres[axis] == "node" for axis in spatial_axes])
            origin = mins + np.where(node, 0.0, 0.5 * spacings)
    return spacings, origin


#: Custom field (``key:=value``) holding the time (ms) of a one-frame volume cut from a cine.
FRAME_TIME_FIELD = "calid frame time ms"


#: Custom field holding calid's record of how a stack was made (JSON on one line), as NIfTI outputs keep it in a header extension.
RECORD_FIELD = "calid metadata"


def _read_record(header: dict[str, Any]) -> Any:
    try:
        return json.loads(str(header[RECORD_FIELD])) if RECORD_FIELD in header else None
    except ValueError:
        return None  # edited by hand or cut short: the voxels and geometry are still right


def _single_frame_time(header: dict[str, Any]) -> np.ndarray | None:
    value = header.get(FRAME_TIME_FIELD)
    try:
        time_ms = float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return None
    return np.array([time_ms]) if np.isfinite(time_ms) else None


def _frame_times(header: dict[str, Any], list_axis: int, n_frames: int) -> np.ndarray | None:
    """Frame times (ms) from Slicer's ``axis N index values`` (a volume sequence) or ``MultiVolume.FrameLabels``
    (what Slicer's MultiVolume importer saves), or None when they are not times."""
    values = header.get(f"axis {list_axis} index values")
    if values is None:
        return _multivolume_frame_times(header, n_frames)
    try:
        times = np.asarray([float(v) for v in str(values).split()], dtype=np.float64)
    except ValueError:
        return None  # text index values (e.g. names), not times
    if times.size != n_frames or (n_frames > 1 and np.any(np.diff(times) <= 0)):
        return None
    labels = header.get("labels") or [""] * 4
    name = str(labels[list_axis]).lower() if list_axis < len(labels) else ""
    units = header.get("units") or []
    unit = str(units[list_axis] if list_axis < len(units) else "").strip().lower()
    unit = unit or str(header.get(f"axis {list_axis} index unit", "")).strip().lower()
    if unit in ("ms", "msec", "millisecond", "milliseconds"):
        return times
    if unit in ("s", "sec", "second", "seconds"):
        return times * 1000.0
    if "time" not in name and "trigger" not in name:
        return None  # frame numbers, not times
    return times if times.max() > _SECONDS_MAX else times * 1000.0


def _multivolume_frame_times(header: dict[str, Any], n_frames: int) -> np.ndarray | None:
    labels = header.get("MultiVolume.FrameLabels")
    if labels is None:
        return None
    try:
        times = np.asarray([float(v) for v in str(labels).replace(",", " ").split()], dtype=np.float64)
    except ValueError:
        return None
    if times.size != n_frames or (n_frames > 1 and np.any(np.diff(times) <= 0)):
        return None
    tag = str(header.get("MultiVolume.FrameIdentifyingDICOMTagName", "")).strip().lower()
    if tag not in ("triggertime", ""):
        return None  # frames labelled by something else (echo time, flip angle, b-value...): not a cine's times
    unit = str(header.get("MultiVolume.FrameIdentifyingDICOMTagUnits", "")).strip().lower()
    if unit in ("ms", "msec") or (not unit and tag == "triggertime"):
        return times
    if unit in ("s", "sec"):
        return times * 1000.0
    return None


def write_nrrd(stack: CineStack, path: str | os.PathLike[str], dtype: Any = None) -> None:
    """Write a 3D ``.nrrd`` (T = 1) or a 4D Slicer volume sequence (T > 1), gzip-compressed, atomically."""
    path = Path(path)
    if path.name.lower().endswith(".nhdr"):
        raise OutputError(path, "detached NRRD headers (.nhdr) are read but not written; write .nrrd or .seq.nrrd")
    disk_dtype = output_dtype(stack, dtype, "nrrd", path)
    array = cast_for_writing(stack.data, disk_dtype, path)
    axes_lps = stack.direction * np.asarray(stack.spacing)[None, :]
    header: dict[str, Any] = OrderedDict()
    header["space"] = "left-posterior-superior"
    header["space origin"] = np.asarray(stack.origin, dtype=np.float64)
    header["encoding"] = "gzip"
    if stack.n_frames == 1:
        data = np.transpose(array[0], (2, 1, 0))  # (x, y, z), written in Fortran order
        header["kinds"] = ["domain", "domain", "domain"]
        header["space directions"] = axes_lps.T
        if stack.frame_times_ms is not None:  # one frame of a cine keeps its cardiac phase, as NIfTI and DICOM outputs do
            header[FRAME_TIME_FIELD] = repr(float(stack.frame_times_ms[0]))
    else:
        if not path.name.lower().endswith(".seq.nrrd"):
            warnings.warn(
                f"{path}: a cine written as plain .nrrd opens in 3D Slicer as a vector volume (one component per frame), "
                "not as a sequence; name it .seq.nrrd to open it as a cine (calid reads both)",
                stacklevel=3,
            )
        data = np.transpose(array, (0, 3, 2, 1))  # (t, x, y, z)
        header["kinds"] = ["list", "domain", "domain", "domain"]
        header["space directions"] = np.vstack([np.full(3, np.nan), axes_lps.T])
        header["labels"] = ["time", "", "", ""]
        header["DataNodeClassName"] = "vtkMRMLScalarVolumeNode"
        header["axis 0 index type"] = "numeric"
        if stack.frame_times_ms is not None:
            header["axis 0 index values"] = " ".join(repr(float(t)) for t in stack.frame_times_ms)
            header["units"] = ["ms", "", "", ""]  # Slicer takes the sequence's index unit from here
        else:
            header["labels"] = ["frame", "", "", ""]
            header["axis 0 index values"] = " ".join(str(i) for i in range(stack.n_frames))
    record = metadata_record(stack)
    if record:
        header[RECORD_FIELD] = json.dumps(record)  # one line: JSON escapes line breaks
    custom = {k: "string" for k in header if k.startswith("axis ") or k in ("DataNodeClassName", FRAME_TIME_FIELD, RECORD_FIELD)}
    try:
        with atomic_path(path) as tmp:
            nrrd.write(str(tmp), np.asfortranarray(data), header, index_order="F", custom_field_map=custom)
    except (OSError, nrrd.NRRDError) as error:
        raise OutputError(path, f"cannot be written ({error})") from error
