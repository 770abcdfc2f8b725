"""NIfTI-1 3D/4D reading and writing with nibabel.

NIfTI stores its affine in RAS and in float32, and time only as a start and a
step. So that our own files round-trip *exactly* (float64 geometry, any frame
times, metadata), the writer also stores the geometry as JSON in a NIfTI
header extension (code 6, "comment", prefixed ``CaLID-geometry``), as plain
text that other tools show (nibabel's ``header.extensions``, ``nifti_tool``).
The reader uses it only when it agrees with the header's affine, so a file
whose affine was later changed by another tool is read from its header. (Files
written before kept the JSON zlib-compressed; they read the same.)
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from calid.atomic import atomic_path
from calid.data.io import cast_for_writing, check_spatial_shape, metadata_record, output_dtype, require_finite, restore_record
from calid.data.stack import CineStack, holding_dtype
from calid.errors import InputError, OutputError

EXTENSION_CODE = 6  # "comment": ignored by other readers
EXTENSION_PREFIX = b"CaLID-geometry "
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_SPACE_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}
_TIME_UNIT_TO_MS = {"msec": 1.0, "sec": 1000.0, "usec": 1e-3}


def read_nifti(path: str | os.PathLike[str]) -> CineStack:
    """Read a 3D (x, y, z) or 4D (x, y, z, t) NIfTI image."""
    path = Path(path)
    image = _load(path)
    shape = tuple(int(s) for s in image.shape)
    # Trailing singleton axes (x, y, z, 1) or (x, y, z, 1, t) occur in the wild; but a 5th axis
    # declared as components (a vector or matrix intent: displacement fields, colour, tensors)
    # holds several values per voxel, not frames.
    intent = image.header.get_intent()[0] if hasattr(image.header, "get_intent") else "none"
    if len(shape) >= 5 and shape[4] > 1 and intent not in ("none", "time series"):
        raise InputError(path, f"holds {shape[4]} values per voxel (NIfTI intent '{intent}'), not frames; save a grey-scale image")
    squeezed = list(shape[:3]) + [s for s in shape[3:] if s != 1]
    if len(shape) < 3 or len(squeezed) > 4:
        raise InputError(
            path,
            f"has {len(shape)} axes {shape}; expected a 3D (x, y, z) or 4D (x, y, z, t) image",
        )
    check_spatial_shape(shape, path)
    try:
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # truncated or corrupt data (EOFError, zlib.error, OSError ...)
        raise InputError(path, f"the image data cannot be read; the file is truncated or corrupt ({error})") from error
    source_dtype = image.get_data_dtype()
    if source_dtype.kind == "c":
        raise InputError(path, f"holds complex voxels ({source_dtype}); save a magnitude image")
    if source_dtype.fields is not None or source_dtype.kind == "V":
        raise InputError(path, f"holds colour or structured voxels ({source_dtype}); save a grey-scale image")
    # nibabel moves scl_slope / scl_inter from the header into the array proxy on load.
    slope, inter = float(getattr(image.dataobj, "slope", 1.0)), float(getattr(image.dataobj, "inter", 0.0))
    if (slope, inter) != (1.0, 0.0):
        source_dtype = np.dtype(np.float32)  # scaled integers: the values are not integers any more
    array = np.asarray(array, dtype=holding_dtype(source_dtype)).reshape(squeezed)
    require_finite(array, path)
    if array.ndim == 3:
        array = array[..., None]
    data_tzyx = np.transpose(array, (3, 2, 1, 0))

    header = image.header
    transform_note = None
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        # No orientation at all: do as ITK (and so Slicer) does, identity
        # direction and zero origin in LPS, rather than nibabel's centred guess.
        affine_lps = np.zeros((3, 4))
        affine_lps[:, :3] = np.diag(np.asarray(header.get_zooms()[:3], dtype=np.float64))
        no_orientation = True
    else:
        affine_ras, transform_note = _transform_as_itk_reads_it(image)
        affine_lps = LPS_FROM_RAS @ affine_ras[:3, :]
        no_orientation = False
    # Sizes in metres or microns are scaled to mm, as ITK does (Slicer would otherwise show 1000 times another size).
    to_mm = _SPACE_UNIT_TO_MM.get(header.get_xyzt_units()[0], 1.0)
    affine_lps = affine_lps * to_mm
    spacing = np.linalg.norm(affine_lps[:, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError(path, f"the affine has a zero-length axis: {image.affine.tolist()}")
    direction = affine_lps[:, :3] / spacing
    origin = affine_lps[:, 3]

    zooms = header.get_zooms()
    metadata: dict[str, Any] = {"source_file": path.name, "source_format": "nifti", "source_dtype": str(source_dtype)}
    if no_orientation:
        metadata["geometry_note"] = "the file has no orientation (qform and sform codes 0): identity direction and zero origin assumed"
        metadata["orientation_unknown"] = True  # written back without one (codes 0), not as scanner space
    elif transform_note is not None:
        metadata["geometry_note"] = transform_note
    pixdim = np.asarray(zooms[:3], dtype=np.float64) * to_mm
    if np.all(pixdim > 0) and not np.allclose(spacing, pixdim, rtol=1e-3):
        # Some pipelines write a placeholder affine (identity, zero origin) and keep
        # the true voxel size only in pixdim; a voxel size is never 1 mm by accident
        # in cine MRI, so pixdim wins and the disagreement is recorded.
        metadata["geometry_note"] = (
            f"voxel size from pixdim {pixdim.round(6).tolist()} mm; the affine's "
            f"{spacing.round(6).tolist()} mm disagreed (placeholder affine?)"
        )
        spacing = pixdim
    frame_times = None
    time_axis = next((i for i in range(3, len(shape)) if shape[i] != 1), 3)
    if data_tzyx.shape[0] > 1 and len(zooms) > time_axis and zooms[time_axis] > 0:
        _, time_unit = header.get_xyzt_units()
        # The header holds float32: its shortest decimal (0.03, not 0.0299999993) is what was meant.
        interval = _as_meant(zooms[time_axis])
        to_ms = _TIME_UNIT_TO_MS.get(time_unit)
        if to_ms is None:
            to_ms = _guessed_time_unit(interval)
            if to_ms is not None:
                time_note = (
                    f"the file sets no time unit; its frame interval {interval:g} was read in "
                    f"{'ms' if to_ms == 1.0 else 's'} ({interval * to_ms:g} ms: a cardiac cine's frames are 10-100 ms apart)"
                )
                metadata["geometry_note"] = "; ".join(filter(None, [metadata.get("geometry_note"), time_note]))
        if to_ms is not None:
            toffset = _as_meant(header["toffset"]) if "toffset" in header else 0.0
            frame_times = toffset * to_ms + interval * to_ms * np.arange(data_tzyx.shape[0])

    stored = _stored_geometry(image)
    if stored is not None and _agrees(stored, spacing, origin, direction, data_tzyx.shape):
        spacing = np.asarray(stored["spacing_xyz_mm"])
        origin = np.asarray(stored["origin_lps_mm"])
        direction = np.asarray(stored["direction_lps"])
        stored_times = stored.get("frame_times_ms")
        if stored_times is not None and len(stored_times) == data_tzyx.shape[0]:
            stored_times = np.asarray(stored_times, dtype=np.float64)
            # The extension keeps uneven frame times, which the header (one interval) cannot. It is
            # trusted only while the header still says the same first time and mean interval: a
            # program that retimed the file (and kept the extension, as nibabel does) is believed.
            if data_tzyx.shape[0] == 1 or (frame_times is not None and _same_timing(stored_times, frame_times)):
                frame_times = stored_times
        # What the reader says about this file stays; what an earlier reader said about the
        # original input (its geometry note, its format) does not describe this file.
        restore_record(metadata, stored.get("metadata"))
    if not _orthonormal_columns(direction):
        raise InputError(path, "the affine is sheared (axes not perpendicular); such images are not supported")
    # float32 headers give directions orthonormal only to ~1e-7: re-orthonormalise.
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    return CineStack(
        data=data_tzyx,
        spacing=tuple(spacing),
        origin=tuple(origin),
        direction=direction,
        frame_times_ms=frame_times,
        metadata=metadata,
        source=str(path),
    )


def _load(path: Path) -> Any:
    """Load a single-file NIfTI; gzip files are decompressed whole first so that a
    corrupt or truncated file fails its CRC check instead of giving wrong voxels."""
    try:
        payload = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            try:
                payload = gzip.decompress(payload)
            except (OSError, EOFError, zlib.error) as error:
                raise InputError(path, f"the file is truncated or corrupt (gzip: {error})") from error
        # From bytes, not nib.load: nibabel's file-name rules trip on suffixes like ".Nii".
        header_size = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else 0
        image_class = nib.Nifti2Image if header_size in (540, 540 << 24) else nib.Nifti1Image
        return image_class.from_bytes(payload)
    except InputError:
        raise
    except Exception as error:  # nibabel raises many types for broken headers
        raise InputError(path, f"cannot be read as NIfTI ({error})") from error


def _stored_geometry(image: nib.Nifti1Image) -> dict[str, Any] | None:
    for extension in image.header.extensions:
        content = extension.get_content()
        if isinstance(content, bytes) and content.startswith(EXTENSION_PREFIX):
            payload = content[len(EXTENSION_PREFIX) :]
            try:
                if payload.lstrip().startswith(b"{"):
                    payload = payload.rstrip(b"\0")  # (the padding to 16 bytes)
                else:  # zlib, as earlier versions wrote it: its checksum may end in a zero byte; the padding after it is ignored
                    payload = zlib.decompressobj().decompress(payload)
                return dict(json.loads(payload.decode("utf-8")))
            except (zlib.error, ValueError):
                return None
    return None


def _orthonormal_columns(matrix: np.ndarray, tolerance: float = 1e-3) -> bool:
    lengths = np.linalg.norm(matrix, axis=0)
    if np.any(lengths <= 0):
        return False
    unit = matrix / lengths
    return bool(np.allclose(unit.T @ unit, np.eye(3), atol=tolerance))


def _transform_as_itk_reads_it(image: Any) -> tuple[np.ndarray, str | None]:
    """The voxel-to-RAS affine that ITK, and so Slicer and ITK-SNAP, use, and a note when it is not
    the sform that nibabel's ``image.affine`` would give.

    ITK takes the sform when it is a rotation with scaling and either it is in scanner space
    (code 1), the qform is unset, or the two agree; otherwise the qform. Reading the other one
    would place the volume elsewhere than Slicer does, and the output would not overlay the input."""
    header = image.header
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    sform, qform = np.asarray(header.get_sform(), dtype=np.float64), np.asarray(header.get_qform(), dtype=np.float64)
    if sform_code > 0 and _orthonormal_columns(sform[:3, :3]):
        if qform_code == 0 or sform_code == 1 or np.allclose(sform, qform, atol=1e-3):
            return sform, None
    if qform_code > 0:
        why = "sheared" if sform_code > 0 and not _orthonormal_columns(sform[:3, :3]) else f"code {sform_code}, differs from the qform"
        note = None if sform_code == 0 else f"the qform (code {qform_code}) was used, as ITK and Slicer do; the sform ({why}) was not"
        return qform, note
    return sform, None  # only a sheared sform: refused below


def _as_meant(value: Any) -> float:
    """A float32 header value as the decimal number that was written into it."""
    return float(str(np.float32(value)))


def _guessed_time_unit(interval: float) -> float | None:
    """ms per unit of a frame interval whose file names no time unit, where only one reading is a cine's.

    Cardiac cine frames are 10-100 ms apart: 30 is read as ms, 0.03 as s; a value such as 1 (the
    placeholder many programs write) fits neither and gives no times."""
    if 5.0 <= interval <= 200.0:
        return 1.0
    if 0.005 <= interval <= 0.2:
        return 1000.0
    return None


def _same_timing(stored_ms: np.ndarray, header_ms: np.ndarray) -> bool:
    """Whether the header's times (first time, one interval) are those written for ``stored_ms``."""
    interval = float(np.mean(np.diff(stored_ms)))
    # The header holds float32 values, in whatever unit: a relative tolerance, and 1 µs absolute.
    return bool(
        np.isclose(header_ms[0], stored_ms[0], rtol=1e-5, atol=1e-3)
        and np.isclose(float(np.mean(np.diff(header_ms))), interval, rtol=1e-5, atol=1e-3)
    )


def _agrees(stored: dict[str, Any], spacing: np.ndarray, origin: np.ndarray, direction: np.ndarray, shape: tuple[int, ...]) -> bool:
    try:
        return bool(
            list(stored["shape_tzyx"]) == list(shape)
            and np.allclose(stored["spacing_xyz_mm"], spacing, rtol=1e-4, atol=1e-5)
            and np.allclose(stored["origin_lps_mm"], origin, rtol=1e-5, atol=1e-3)
            and np.allclose(stored["direction_lps"], direction, atol=1e-4)
        )
    except (KeyError, TypeError, ValueError):
        return False


def write_nifti(stack: CineStack, path: str | os.PathLike[str], dtype: Any = None) -> None:
    """Write a 3D (T = 1) or 4D NIfTI-1 file atomically, with time in ms."""
    path = Path(path)
    disk_dtype = output_dtype(stack, dtype, "nifti", path)
    array = cast_for_writing(stack.data, disk_dtype, path)
    array_xyzt = np.transpose(array, (3, 2, 1, 0))
    if stack.n_frames == 1:
        array_xyzt = array_xyzt[..., 0]
    affine = np.eye(4)
    affine[:3, :3] = np.linalg.inv(LPS_FROM_RAS) @ (stack.direction * np.asarray(stack.spacing)[None, :])
    affine[:3, 3] = np.linalg.inv(LPS_FROM_RAS) @ np.asarray(stack.origin)
    # The type given outright: nibabel refuses 64-bit integer arrays otherwise (an int64 input is kept as int64).
    image = nib.Nifti1Image(np.ascontiguousarray(array_xyzt), affine, dtype=disk_dtype)
    header = image.header
    header.set_data_dtype(disk_dtype)
    # Scanner coordinates, unless the source had no orientation at all: claiming one would make
    # tools that show such files differently (nibabel, FSL) show the output flipped against it.
    unchanged = np.allclose(stack.direction, np.eye(3)) and np.allclose(stack.origin, 0.0)
    code = 0 if stack.metadata.get("orientation_unknown") and unchanged else 1
    image.set_sform(affine, code=code)
    image.set_qform(affine, code=code)
    if stack.n_frames > 1:
        interval = stack.frame_interval_ms
        if stack.frame_times_ms is not None and interval is not None and np.ptp(np.diff(stack.frame_times_ms)) > 0.01 * interval:
            warnings.warn(
                f"{path}: the frames are not evenly spaced in time; NIfTI holds one interval ({interval:g} ms, the mean), which other "
                "programs will show (CaLID reads the true times back from its own header extension). Write .seq.nrrd to keep them for every program.",
                stacklevel=3,
            )
        zooms = list(header.get_zooms()[:3]) + [interval if interval is not None else 1.0]
        header.set_zooms(zooms)
        header.set_xyzt_units("mm", "msec" if interval is not None else "unknown")
        if stack.frame_times_ms is not None:
            header["toffset"] = float(stack.frame_times_ms[0])
    else:
        header.set_xyzt_units("mm", "msec")
    payload = stack.geometry_dict()
    payload["metadata"] = metadata_record(stack)
    content = EXTENSION_PREFIX + json.dumps(payload).encode("utf-8")
    header.extensions.append(nib.nifti1.Nifti1Extension(EXTENSION_CODE, content))
    try:
        with atomic_path(path) as tmp:
            nib.save(image, str(tmp))
    except OSError as error:
        raise OutputError(path, f"cannot be written ({error})") from error
