"""Read and write cine stacks in any supported format, chosen by the path.

* NIfTI ``.nii`` / ``.nii.gz`` (3D or 4D)
* NRRD ``.nrrd`` / ``.nhdr`` (3D) and Slicer's volume sequence ``.seq.nrrd`` (4D)
* DICOM: a folder of single-frame MR images (one cine series, or choose one with ``series``)

Every reader returns a :class:`~calid.data.stack.CineStack` in LPS coordinates
and records ``metadata["source_dtype"]`` so that writers can give results back
in the input's data type.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from calid.atomic import missing_folder
from calid.data.stack import CineStack
from calid.errors import InputError, OutputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
SUPPORTED_FORMATS_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seq.nrrd, .nhdr) or a DICOM folder"
WRITABLE_FORMATS_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seq.nrrd) or a DICOM folder"


def detect_format(path: str | os.PathLike[str], for_writing: bool = False) -> str:
    """``"nifti"``, ``"nrrd"`` or ``"dicom"`` for a path (a folder means DICOM)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(NRRD_SUFFIXES):
        return "nrrd"
    if path.is_dir() or (for_writing and path.suffix == "") or name.endswith(".dcm"):
        return "dicom"
    if for_writing:
        raise OutputError(path, f"unknown file type; write {WRITABLE_FORMATS_TEXT} (a name without a suffix)")
    raise InputError(path, f"unknown file type; use {SUPPORTED_FORMATS_TEXT}")


#: What a reader says about the file it read. A record read back from a file calid wrote never
#: overrides these: an earlier reader's words about the original input do not describe this file.
READER_KEYS = frozenset({"source_file", "source_format", "source_dtype", "geometry_note", "orientation_unknown"})


def metadata_record(stack: CineStack) -> dict[str, Any]:
    """The part of a stack's metadata that calid writes into its files beside the voxels (how it was
    made, which frames of which cine it holds), without what JSON cannot hold."""
    record = json_safe(dict(stack.metadata))
    return record if isinstance(record, dict) else {}


def restore_record(metadata: dict[str, Any], record: Any) -> None:
    """Add a record read back from a file to a reader's metadata; the reader's own keys stay. An
    entry of the wrong kind (a header edited by hand, a tool that rewrote it) is left out, so that
    it cannot mislead what reads it (frame pairing, Simpson's weights, a DICOM description)."""
    if isinstance(record, dict):
        metadata.update(
            {key: value for key, value in record.items() if key not in READER_KEYS and key not in metadata and _well_formed(key, value)}
        )


def _well_formed(key: str, value: Any) -> bool:
    if key in ("upsampling", "plane", "labels", "dicom", "preprocess"):
        return isinstance(value, dict)
    if key == "source_frames":
        return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if key == "source_frame_count":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if key == "source_cine":
        return isinstance(value, str)
    if key == "slice_thickness_mm":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return True


def json_safe(value: Any) -> Any:
    """Drop what JSON cannot hold rather than fail a write over metadata."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): json_safe(v) for k, v in value.items() if _is_jsonable(v)}
        return None


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return isinstance(value, dict)


#: File name endings of the images calid reads and writes (longest first).
IMAGE_SUFFIXES = (".nii.gz", ".seq.nrrd", ".nii", ".nrrd", ".nhdr")


def image_stem(path: str | os.PathLike[str]) -> str:
    """A file's name without its image suffix (P001.ed.nii.gz -> P001.ed; a DICOM folder keeps its name)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_stack(
    path: str | os.PathLike[str],
    series: str | int | None = None,
    min_slices: int = 2,
) -> CineStack:
    """Read a cine (T, Z, Y, X) or a 3D stack (T = 1) from a file or DICOM folder.

    Args:
        path: the file, or a folder of DICOM files.
        series: DICOM only: which series to read when the folder holds several
            (SeriesInstanceUID, SeriesNumber or a unique part of SeriesDescription).
        min_slices: refuse stacks with fewer slices (upsampling needs at least 2).
    """
    _require_path(path, "read_stack(path)")
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file() and path.stat().st_size == 0:  # an interrupted copy or download: say so, not a decoder's complaint
        raise InputError(path, "is empty (0 bytes)")
    fmt = detect_format(path)
    if series is not None and fmt != "dicom":  # rather than read the one image and leave the choice unheeded
        raise InputError("--series", f"chooses among the series of a DICOM folder; {path.name} is a {fmt.upper() if fmt == 'nrrd' else 'NIfTI'} file holding one image")
    if fmt == "nifti":
        from calid.data.nifti_io import read_nifti

        stack = read_nifti(path)
    elif fmt == "nrrd":
        from calid.data.nrrd_io import read_nrrd

        stack = read_nrrd(path)
    else:
        from calid.data.dicom_io import read_dicom_folder

        if path.is_file():
            if series is None:  # one file of a series named: that series, not whatever else is in its folder
                series = _series_of_dicom_file(path)
                if series is None:
                    raise InputError(path, "is not a readable DICOM image with a SeriesInstanceUID; name its folder to read every series there")
            path = path.parent
        stack = read_dicom_folder(path, series=series)
    if stack.n_slices < min_slices:
        raise InputError(
            path,
            f"has {stack.n_slices} slice(s); a short-axis stack of at least {min_slices} parallel slices is needed",
        )
    stack.source_path = os.path.abspath(path)
    return stack


def _series_of_dicom_file(path: Path) -> str | None:
    import pydicom

    try:
        uid = pydicom.dcmread(str(path), stop_before_pixels=True).get("SeriesInstanceUID")
    except Exception:  # not readable as DICOM
        return None
    return str(uid) if uid else None


def check_output_path(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that :func:`write_stack` would refuse after it: an unknown
    or read-only format, a folder that does not exist, a DICOM folder that is not empty, or
    (without ``overwrite``) an existing file."""
    path = Path(path)
    fmt = detect_format(path, for_writing=True)
    if fmt == "nrrd" and path.name.lower().endswith(".nhdr"):
        raise OutputError(path, "detached NRRD headers (.nhdr) are read but not written; write .nrrd or .seq.nrrd")
    if fmt == "dicom":
        # A DICOM series goes into a new or empty folder only (atomic_directory): the files of two
        # series are never mixed, and a user's folder is never emptied, --overwrite or not.
        if path.exists() and not path.is_dir():
            raise OutputError(path, "exists and is not a folder (a DICOM output is a folder); choose another output path")
        if path.is_dir() and any(path.iterdir()):
            raise OutputError(path, "is a folder that is not empty; a DICOM series is written into a new or empty folder")
    elif path.is_dir():
        raise OutputError(path, "is a folder; give a file name (e.g. dense.nii.gz)")
    elif path.exists() and not overwrite:
        raise OutputError(path, "exists already; choose another output path or pass --overwrite")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise missing_folder(path, parent)
    if not os.access(parent, os.W_OK):
        raise OutputError(path, f"the folder {parent} is not writable")
    return path


def write_stack(
    stack: CineStack,
    path: str | os.PathLike[str],
    dtype: str | np.dtype[Any] | None = None,
    overwrite: bool | None = None,
) -> Path:
    """Write ``stack`` atomically; the format follows the path (a folder or no suffix: DICOM).

    Args:
        dtype: voxel type on disk. Default: ``metadata["source_dtype"]`` when the
            stack came from a file (outputs keep the input's type), else float32.
            Integer types refuse values that do not fit instead of wrapping round.
        overwrite: False: an existing target is an error. None (default): an existing
            file is replaced, except the file the stack was read from and a read-only
            file (an acquired scan is never lost by a slip). True: any file is replaced.
    """
    if not isinstance(stack, CineStack):
        raise TypeError(f"write_stack(stack, path): stack must be a CineStack (calid.read_stack(...) gives one), not {type(stack).__name__}")
    _require_path(path, "write_stack(stack, path)")
    path = Path(path)
    if path.exists() and not path.is_dir():  # folders (DICOM): atomic_directory's rules
        if overwrite is False:
            raise OutputError(path, "exists already (refusing to overwrite)")
        read_from = stack.source_path or stack.source  # absolute when read_stack made the stack
        if overwrite is None and read_from and Path(read_from).exists() and path.resolve() == Path(read_from).resolve():
            raise OutputError(path, "is the file this stack was read from: refusing to replace it (write elsewhere, or pass overwrite=True)")
        if overwrite is None and not path.stat().st_mode & 0o222:
            raise OutputError(path, "is read-only: refusing to replace it (pass overwrite=True to replace it anyway)")
    fmt = detect_format(path, for_writing=True)
    if fmt == "nifti":
        from calid.data.nifti_io import write_nifti

        write_nifti(stack, path, dtype=dtype)
    elif fmt == "nrrd":
        from calid.data.nrrd_io import write_nrrd

        write_nrrd(stack, path, dtype=dtype)
    else:
        from calid.data.dicom_io import write_dicom_folder

        write_dicom_folder(stack, path, dtype=dtype)
    return path


def _require_path(path: Any, call: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{call}: path must be a file or folder path (str or pathlib.Path), not {type(path).__name__}")


def output_dtype(stack: CineStack, dtype: str | np.dtype[Any] | None, fmt: str | None = None, target: str | os.PathLike[str] | None = None) -> np.dtype[Any]:
    """The on-disk dtype: the one asked for, else the source's, else float32; refused when the
    file format ``fmt`` (nifti, nrrd, dicom) cannot store it."""
    if dtype is None:
        dtype = stack.metadata.get("source_dtype", "float32")
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        raise OutputError("--dtype", f"unknown data type {dtype!r} (e.g. int16, uint8, float32)") from error
    if resolved.kind not in "iuf":
        raise OutputError("--dtype", f"data type {resolved} is not supported for writing (use an integer or float type)")
    if resolved.kind == "f" and resolved.itemsize == 2 and fmt in ("nifti", "nrrd"):
        raise OutputError(target if target is not None else "--dtype", f"{'NIfTI' if fmt == 'nifti' else 'NRRD'} has no 16-bit float type; write float32 (--dtype float32)")
    return resolved


def cast_for_writing(data: np.ndarray, dtype: np.dtype[Any], target: str | os.PathLike[str]) -> np.ndarray:
    """Cast float voxels to ``dtype``; integers are rounded, and out-of-range values are an error."""
    if dtype.kind == "f":
        if dtype.itemsize < 4 and np.abs(data).max(initial=0.0) > np.finfo(dtype).max:
            raise OutputError(target, f"values up to {np.abs(data).max():g} do not fit in {dtype}")
        return data.astype(dtype)
    info = np.iinfo(dtype)
    rounded = np.rint(data)
    low, high = float(rounded.min()), float(rounded.max())
    if low < info.min or high > info.max:
        raise OutputError(
            target,
            f"values span [{low:g}, {high:g}] and do not fit in {dtype} [{info.min}, {info.max}]; "
            "nothing was written (write as float32, or rescale the image first)",
        )
    return rounded.astype(dtype)


def check_spatial_shape(shape: tuple[int, ...], source: str | os.PathLike[str], what: str = "image") -> None:
    """Refuse zero-size axes with the file's name."""
    if 0 in shape:
        raise InputError(source, f"{what} has an empty axis (shape {tuple(int(s) for s in shape)})")


def require_finite(data: np.ndarray, source: str | os.PathLike[str]) -> None:
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(source, f"contains {bad} NaN or infinite voxel value(s)")
