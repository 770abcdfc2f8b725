"""DICOM cine series: read a folder of single-frame MR images, write one from a stack.

Reading groups the images of one series by slice position and orders each
slice's images by trigger time (then instance number). The slice axis is the
normal of ``ImageOrientationPatient`` (row x column direction); slice spacing
comes from the spread of ``ImagePositionPatient`` along that normal, never
from ``SliceLocation`` or ``SliceThickness`` (both are unreliable across
vendors). Headers are parsed with pydicom; pixel data are decoded by pydicom
and, for compressed transfer syntaxes it cannot decode, by SimpleITK (GDCM).

Patient identity is not carried into the stack's metadata: only series
descriptions and UIDs are kept, so derived files do not leak names.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from calid.atomic import atomic_directory
from calid.data.io import cast_for_writing, metadata_record, output_dtype, restore_record
from calid.data.stack import CineStack, describe_upsampling, holding_dtype, upsampling_steps
from calid.errors import InputError, OutputError

#: Private block where calid keeps its record of how a series was made (as JSON, VR UT), as it does in
#: NIfTI and NRRD files: which frames of which cine it holds, the upsampling settings.
RECORD_GROUP, RECORD_CREATOR, RECORD_ELEMENT = 0x0011, "CaLID", 0x01

#: Two images closer than this along the normal (mm) are at the same slice position.
POSITION_TOLERANCE_MM = 0.01
#: Largest relative deviation of a slice gap from the mean gap for a "uniform" stack.
SPACING_RELATIVE_TOLERANCE = 0.01


@dataclass
class _Image:
    path: Path
    series_uid: str
    series_number: str
    series_description: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    trigger_time: float | None
    temporal_position: int | None
    instance_number: int | None
    header: Dataset


def read_dicom_folder(folder: str | os.PathLike[str], series: str | int | None = None) -> CineStack:
    """Read one cine series (or a 3D stack) from a folder of DICOM files (searched recursively)."""
    folder = Path(folder)
    images, skipped, unreadable, problems = _scan(folder)
    note = ""
    if unreadable:
        note = f" ({len(unreadable)} DICOM file(s) could not be read as images with a geometry, e.g. {unreadable[0]})"
    if not images and problems:
        raise problems[0][1]
    if not images:
        detail = f" ({skipped} file(s) were not DICOM images)" if skipped else ""
        others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".nhdr")))
        if others:  # a folder of NIfTI / NRRD images given where one image is read
            detail += f"; it holds {len(others)} NIfTI / NRRD image(s) ({others[0]}, ...): give one of them, not the folder"
        raise InputError(folder, f"contains no DICOM MR images{detail}{note}")
    by_series: dict[str, list[_Image]] = defaultdict(list)
    for image in images:
        by_series[image.series_uid].append(image)
    chosen_uids = _choose_series(folder, by_series, series)
    for uid, problem in problems:  # an unusable image of another series does not stop this one
        if uid in chosen_uids:
            raise problem
    chosen = [image for uid in chosen_uids for image in by_series[uid]]
    try:
        stack = _assemble(folder, chosen)
    except InputError as error:
        if note:
            raise InputError(error.source, error.problem + note) from error
        raise
    if len(chosen_uids) > 1:
        numbers = [by_series[uid][0].series_number or "?" for uid in chosen_uids]
        stack.metadata["dicom"]["SeriesInstanceUID"] = list(chosen_uids)
        stack.metadata["dicom"]["SeriesNumber"] = numbers
        stack.metadata["geometry_note"] = f"{len(chosen_uids)} series of one slice each (series {', '.join(numbers)}) read as one stack, ordered along the slice normal"
    return stack


def looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` after the 128-byte preamble), whatever its name."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _scan(folder: Path) -> tuple[list[_Image], int, list[str], list[tuple[str, InputError]]]:
    """The images with a geometry; how many files were skipped; the names of unreadable DICOM
    files; and (series UID, error) of images that cannot be used, raised only if their series is read."""
    images: list[_Image] = []
    skipped = 0
    unreadable: list[str] = []
    problems: list[tuple[str, InputError]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        # Hidden files and folders, e.g. the temporary folder of an interrupted write, are not images of the series.
        if path.name.upper() == "DICOMDIR" or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
            skipped += 1
            if looks_like_dicom(path):
                unreadable.append(path.name)
            continue
        series_uid = str(header.get("SeriesInstanceUID", "<no series UID>"))
        if "PixelSpacing" not in header and "PerFrameFunctionalGroupsSequence" in header:
            problems.append((series_uid, InputError(path, "enhanced (multi-frame) DICOM is not supported; convert it to NIfTI first (e.g. with dcm2niix)")))
            continue
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            skipped += 1  # reports, presentation states ... or a damaged image: named if an error follows
            unreadable.append(path.name)
            continue
        try:
            position = [float(v) for v in header.ImagePositionPatient]
            orientation = np.asarray([float(v) for v in header.ImageOrientationPatient], dtype=np.float64)
            spacing = tuple(float(v) for v in header.PixelSpacing)
        except (AttributeError, ValueError, TypeError) as error:
            problems.append((series_uid, InputError(path, f"has a malformed image geometry header ({error})")))
            continue
        problem = None
        if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2:
            problem = "ImagePositionPatient needs 3 values, ImageOrientationPatient 6 and PixelSpacing 2"
        else:
            row_norm, column_norm = np.linalg.norm(orientation[:3]), np.linalg.norm(orientation[3:])
            if row_norm < 1e-6 or column_norm < 1e-6 or abs(np.dot(orientation[:3], orientation[3:])) > 1e-3 * row_norm * column_norm:
                problem = f"ImageOrientationPatient {orientation.tolist()} is not two perpendicular directions"
            elif min(spacing) <= 0:
                problem = f"PixelSpacing {list(spacing)} must be positive"
        if problem is not None:
            problems.append((series_uid, InputError(path, problem)))
            continue
        try:
            images.append(
                _Image(
                    path=path,
                    series_uid=series_uid,
                    series_number=str(header.get("SeriesNumber", "")),
                    series_description=str(header.get("SeriesDescription", "")),
                    position=np.asarray(position, dtype=np.float64),
                    orientation=orientation,
                    pixel_spacing=(spacing[0], spacing[1]),
                    rows=int(header.Rows),
                    columns=int(header.Columns),
                    trigger_time=float(header.TriggerTime) if header.get("TriggerTime") not in (None, "") else None,
                    temporal_position=_optional_int(header.get("TemporalPositionIdentifier")),
                    instance_number=int(header.InstanceNumber) if header.get("InstanceNumber") not in (None, "") else None,
                    header=header,
                )
            )
        except (AttributeError, ValueError, TypeError) as error:
            problems.append((series_uid, InputError(path, f"has an incomplete or malformed image geometry header ({error})")))
    return images, skipped, unreadable, problems


def _optional_int(value: Any) -> int | None:
    """An optional integer tag: None when absent or malformed (an ordering hint, not worth refusing an image for)."""
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _describe_series(uid: str, members: list[_Image]) -> str:
    first = members[0]
    return f"  series {first.series_number or '?'} '{first.series_description}' ({len(members)} images) UID {uid}"


#: Fewest single-slice series that are taken, without being asked, as one short-axis stack.
MIN_SLICES_OF_A_SERIES_STACK = 3


def _is_single_slice(members: list[_Image]) -> bool:
    first = members[0]
    return all(np.linalg.norm(image.position - first.position) <= POSITION_TOLERANCE_MM for image in members)


def _single_slice_stacks(by_series: dict[str, list[_Image]]) -> list[list[str]]:
    """Groups of series that each hold one slice position of the same stack (one series per slice, as
    many scanners export a short-axis cine): same frame of reference, orientation, image size, pixel
    size and number of frames, at least MIN_SLICES_OF_A_SERIES_STACK different positions; each group
    ordered along the slice normal."""
    groups: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for uid, members in by_series.items():
        if not _is_single_slice(members):
            continue
        first = members[0]
        key = (
            str(first.header.get("FrameOfReferenceUID", "")), tuple(np.round(first.orientation, 3)), first.rows, first.columns,
            tuple(np.round(first.pixel_spacing, 4)), len(members),
        )
        groups[key].append(uid)
    stacks = []
    for uids in groups.values():
        first = by_series[uids[0]][0]
        normal = np.cross(first.orientation[:3], first.orientation[3:])
        position = {uid: float(np.dot(by_series[uid][0].position, normal)) for uid in uids}
        ordered = sorted(uids, key=position.__getitem__)
        gaps = np.diff([position[uid] for uid in ordered])
        if len(uids) >= MIN_SLICES_OF_A_SERIES_STACK and np.all(gaps > POSITION_TOLERANCE_MM):  # a repeated slice is not a stack
            stacks.append(ordered)
    return stacks


def _choose_series(folder: Path, by_series: dict[str, list[_Image]], series: str | int | None) -> list[str]:
    """The UIDs of the series to read: the only one, a selection (``7`` or ``7,8,9``: several series
    that are one slice each), or, unasked, the one group of single-slice series that forms a stack."""
    listing = "\n".join(_describe_series(uid, m) for uid, m in by_series.items())
    if series is None:
        if len(by_series) == 1:
            return list(by_series)
        stacks = _single_slice_stacks(by_series)
        if len(stacks) == 1:
            return stacks[0]
        several = f"; {len(stacks)} groups of them could each be a stack of one slice per series" if len(stacks) > 1 else ""
        raise InputError(
            folder,
            f"holds {len(by_series)} image series{several}; choose one with --series (series= in Python): "
            f"a series' number, its UID or the end of it, a unique part of its description, or several (7,8,9) that are one slice each:\n{listing}",
        )
    chosen = []
    for wanted in (part.strip() for part in str(series).split(",")):
        matches = [uid for uid, m in by_series.items() if uid == wanted or m[0].series_number == wanted]
        if not matches and len(wanted) >= 8 and wanted.replace(".", "").isdigit():
            # The end of a UID, as copied from a listing (not its start or middle: the UIDs of one tool share those).
            matches = [uid for uid in by_series if uid.endswith(wanted)]
        if not matches:
            matches = [uid for uid, m in by_series.items() if wanted.lower() in m[0].series_description.lower()]
        if len(matches) != 1:
            what = "matches no series" if not matches else f"matches {len(matches)} series"
            raise InputError(folder, f"series selector {wanted!r} {what}; the folder holds:\n{listing}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


def _assemble(folder: Path, images: list[_Image]) -> CineStack:
    first = images[0]
    for image in images[1:]:
        if not np.allclose(image.orientation, first.orientation, atol=1e-4):
            raise InputError(image.path, "has a different image orientation from the rest of the series (mixed stacks)")
        if (image.rows, image.columns) != (first.rows, first.columns):
            raise InputError(image.path, f"is {image.rows}x{image.columns} pixels, the series' first image {first.rows}x{first.columns}")
        if not np.allclose(image.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise InputError(image.path, "has a different pixel spacing from the rest of the series")
    row_direction = first.orientation[:3] / np.linalg.norm(first.orientation[:3])  # x: along a row
    # y: down a column, made exactly perpendicular to the row (Gram-Schmidt): orientations are often
    # stored with few decimals, and the stack needs orthonormal directions.
    column_direction = first.orientation[3:] - float(np.dot(first.orientation[3:], row_direction)) * row_direction
    column_direction = column_direction / np.linalg.norm(column_direction)
    normal = np.cross(row_direction, column_direction)

    # Cluster positions along the normal into slices.
    distances = np.asarray([float(np.dot(image.position, normal)) for image in images])
    order = np.argsort(distances, kind="stable")
    slices: list[list[int]] = []
    for index in order:
        if slices and abs(distances[index] - distances[slices[-1][0]]) <= POSITION_TOLERANCE_MM:
            slices[-1].append(int(index))
        else:
            slices.append([int(index)])
    if len(slices) >= 2:
        positions = np.asarray([distances[s[0]] for s in slices])
        gaps = np.diff(positions)
        mean_gap = float(gaps.mean())
        if np.any(np.abs(gaps - mean_gap) > SPACING_RELATIVE_TOLERANCE * mean_gap):
            raise InputError(
                folder,
                "slice positions are not evenly spaced: gaps of "
                + ", ".join(f"{g:.2f}" for g in gaps)
                + " mm along the slice normal (missing or extra slices?)",
            )
        slice_spacing = float((positions[-1] - positions[0]) / (len(positions) - 1))
    else:
        slice_spacing = float(first.header.get("SpacingBetweenSlices", first.header.get("SliceThickness", 1.0)) or 1.0)

    origin = images[slices[0][0]].position
    for members in slices:
        offset = images[members[0]].position - origin
        in_plane = offset - np.dot(offset, normal) * normal
        if np.linalg.norm(in_plane) > max(0.05, 0.01 * slice_spacing):
            raise InputError(
                images[members[0]].path,
                f"this slice is shifted {np.linalg.norm(in_plane):.2f} mm in-plane relative to the first slice (sheared stack is not supported)",
            )

    counts = [len(members) for members in slices]
    if len(set(counts)) != 1:
        listing = ", ".join(f"{distances[s[0]]:.2f} mm: {len(s)}" for s in slices)
        raise InputError(folder, f"slices have different numbers of frames (position: images) {listing}; duplicated or missing images?")
    n_frames = counts[0]

    def frame_key(index: int) -> tuple[float, int, int]:
        # Trigger time orders the cardiac phases; without it, the temporal position (which some
        # scanners, and calid's writer, record), and only then the instance number.
        image = images[index]
        trigger = image.trigger_time if image.trigger_time is not None else float("inf")
        position = image.temporal_position if image.temporal_position is not None else 0
        return (trigger, position, image.instance_number if image.instance_number is not None else 0)

    ordered = [sorted(members, key=frame_key) for members in slices]
    for members in ordered:
        keys = [frame_key(i) for i in members]
        if len(set(keys)) != len(keys):
            raise InputError(
                images[members[0]].path,
                f"{len(keys) - len(set(keys))} image(s) at slice position {distances[members[0]]:.2f} mm share trigger time, temporal position and instance number (duplicated images)",
            )
        triggers_here = [images[i].trigger_time for i in members]
        if None not in triggers_here and 1 < len(set(triggers_here)) < len(triggers_here):
            # A cine has one image per slice and cardiac phase. (All-equal trigger times, as some
            # real-time cines write, are ordered by instance number instead.)
            repeated = next(t for t in triggers_here if triggers_here.count(t) > 1)
            raise InputError(
                images[members[0]].path,
                f"{triggers_here.count(repeated)} images at slice position {distances[members[0]]:.2f} mm share trigger time {repeated:g} ms: "
                "duplicated images, or two kinds of image in one series (e.g. magnitude and phase)? A cine has one image per slice and trigger time",
            )

    rows, columns = first.rows, first.columns
    data = np.empty((n_frames, len(slices), rows, columns), dtype=np.float32)
    source_dtypes: set[str] = set()
    rescales: set[tuple[float, float]] = set()
    for z, members in enumerate(ordered):
        for t, index in enumerate(members):
            pixels, dtype, rescale = _read_pixels(images[index].path, images[index].header)
            rescales.add(rescale)
            if pixels.shape != (rows, columns):
                raise InputError(images[index].path, f"pixel data shape {pixels.shape} does not match Rows x Columns {rows}x{columns}")
            if pixels.dtype != data.dtype and pixels.dtype == np.float64:
                data = data.astype(np.float64)  # 32-bit integers: float32 would round them
            data[t, z] = pixels
            source_dtypes.add(dtype)
    if not np.isfinite(data).all():
        raise InputError(folder, "pixel data contain NaN or infinite values")

    frame_times = None
    triggers = np.asarray(
        [[images[i].trigger_time if images[i].trigger_time is not None else np.nan for i in members] for members in ordered]
    )
    if not np.isnan(triggers).any():
        mean_times = triggers.mean(axis=0)
        if n_frames == 1 or np.all(np.diff(mean_times) > 0):
            frame_times = mean_times
    source_dtype = source_dtypes.pop() if len(source_dtypes) == 1 else "float32"
    header = first.header
    metadata: dict[str, Any] = {
        "source_file": folder.name,
        "source_format": "dicom",
        "source_dtype": source_dtype,
        "dicom": {
            "SeriesInstanceUID": first.series_uid,
            "SeriesNumber": first.series_number,
            "SeriesDescription": first.series_description,
            "StudyInstanceUID": str(header.get("StudyInstanceUID", "")),
            "FrameOfReferenceUID": str(header.get("FrameOfReferenceUID", "")),
            "SliceThickness": float(header.SliceThickness) if header.get("SliceThickness") not in (None, "") else None,
        },
    }
    if len(rescales) == 1 and rescales != {(1.0, 0.0)}:
        # One rescale for the whole series: a DICOM output stores the acquired slices on it again, bit for bit.
        metadata["dicom"]["rescale"] = list(rescales.pop())
    restore_record(metadata, _read_record(header))
    return CineStack(
        data=data,
        spacing=(first.pixel_spacing[1], first.pixel_spacing[0], slice_spacing),
        origin=tuple(origin),
        direction=np.stack([row_direction, column_direction, normal], axis=1),
        frame_times_ms=frame_times,
        metadata=metadata,
        source=str(folder),
    )


def _as_read(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The voxel values a reader (this module's) gets from stored pixels and their rescale."""
    if (slope, intercept) == (1.0, 0.0):
        return stored.astype(holding_dtype(stored.dtype))
    # Rescaled in double precision and rounded once, as SimpleITK and pydicom do: float32
    # arithmetic would be one unit in the last place off for a quarter of the voxels.
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


#: A grid is used for generated slices only when it has at least 6 bits' worth of steps over the data's
#: range: a float image whose acquired values happen to be 0 and 1 would otherwise lose every generated value.
MIN_GRID_LEVELS = 64


def _exact_16_bit_grid(stack: CineStack) -> tuple[np.ndarray, float, float] | None:
    """16-bit pixels, slope and intercept on which the stack's acquired slices (every slice of a stack
    without a consistent record of them) are stored bit for bit: the rescale of the DICOM series it was
    read from, else whole numbers; generated slices are rounded to the same grid. None when neither
    holds the acquired slices, or when the whole stack does not fit 16 bits on it or spans too few steps."""
    step = stack.acquired_slice_step() or 1
    record = stack.metadata.get("upsampling")
    if not isinstance(record, dict) or record.get("acquired_slice_indices") != list(range(0, stack.n_slices, step)):
        step = 1  # no record, or one that does not match this stack: every slice is kept exactly
    candidates = [(1.0, 0.0)]
    source = stack.metadata.get("dicom", {}).get("rescale") if isinstance(stack.metadata.get("dicom"), dict) else None
    if isinstance(source, (list, tuple)) and len(source) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in source) and source[0] > 0:
        candidates.insert(0, (_as_written(float(source[0])), _as_written(float(source[1]))))
    low, high = float(stack.data.min()), float(stack.data.max())
    for slope, intercept in candidates:
        first, last = (low - intercept) / slope, (high - intercept) / slope
        if not (math.isfinite(first) and math.isfinite(last)):
            continue
        kind = np.uint16 if round(first) >= 0 else np.int16
        info = np.iinfo(kind)
        if round(first) < info.min or round(last) > info.max:
            continue  # no clipping: values beyond the type are quantised over the range instead
        if step > 1 and last - first < MIN_GRID_LEVELS:
            continue  # generated slices would be rounded coarsely
        stored = np.empty(stack.data.shape, dtype=kind)
        for t in range(stack.n_frames):  # frame by frame: a float64 copy of a whole dense cine can be gigabytes
            stored[t] = np.rint((stack.data[t].astype(np.float64) - intercept) / slope)
            if not np.array_equal(_as_read(stored[t, ::step], slope, intercept), stack.data[t, ::step]):
                break
        else:
            return stored, slope, intercept
    return None


def _read_record(header: Dataset) -> Any:
    """calid's record from a series it wrote; None for any other series or a damaged record."""
    try:
        value = header.private_block(RECORD_GROUP, RECORD_CREATOR)[RECORD_ELEMENT].value
        if isinstance(value, bytes):  # transcoded to implicit VR (as many archives store images): VR UN, padded
            value = value.decode("utf-8").rstrip("\x00 ")
        return json.loads(str(value))
    except (KeyError, ValueError):
        return None


#: What a DICOM output's record keeps: how it was made and which frames it holds. A DICOM output is a
#: new, anonymised study: nothing that may name the patient or a path (the source's UIDs, file and
#: node names, model paths, warnings that quote the input's path) goes into it.
DICOM_RECORD_KEYS = ("upsampling", "source_frames", "source_frame_count", "labels", "slice_thickness_mm")


def _anonymous_record(stack: CineStack) -> dict[str, Any]:
    record = {key: value for key, value in metadata_record(stack).items() if key in DICOM_RECORD_KEYS}
    if isinstance(record.get("upsampling"), dict):
        upsampling = {key: value for key, value in record["upsampling"].items() if key != "warning"}
        if isinstance(upsampling.get("model"), str):
            upsampling["model"] = Path(upsampling["model"].replace("\\", "/")).name  # a model file's name, not where it lies
        if "earlier_upsampling" in upsampling:  # each earlier step's mode and factor only, whatever a file held
            upsampling["earlier_upsampling"] = upsampling_steps(upsampling)[:-1]
        record["upsampling"] = upsampling
    return record


def _read_pixels(path: Path, header: Dataset) -> tuple[np.ndarray, str, tuple[float, float]]:
    """Pixel values with the modality rescale applied, the stored integer type, and the rescale (slope, intercept)."""
    try:
        dataset = pydicom.dcmread(str(path))
        stored = dataset.pixel_array
        slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
        if (slope, intercept) == (1.0, 0.0):
            return stored.astype(holding_dtype(stored.dtype)), str(stored.dtype), (1.0, 0.0)
        return _as_read(stored, slope, intercept), "float32", (slope, intercept)
    except Exception as pydicom_error:  # missing decoder plugin, truncated pixel data ...
        try:
            import SimpleITK as sitk

            image = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(image)
            return np.asarray(array, dtype=holding_dtype(array.dtype)).reshape(array.shape[-2:]), str(array.dtype), (1.0, 0.0)
        except Exception as sitk_error:
            raise InputError(path, f"pixel data cannot be decoded ({pydicom_error}; {sitk_error})") from sitk_error


def _as_written(value: float) -> float:
    """The float a reader gets back from a decimal string (DS) of at most 16 characters."""
    return float(str(DSfloat(value, auto_format=True)))


def _write_file(path: Path, ds: Dataset) -> None:
    """One DICOM file with its preamble and file meta, explicit VR little endian, with pydicom 3 or 2.4
    (3D Slicer up to at least 5.10 ships pydicom 2.4, which its own DICOM modules need)."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False  # pydicom 2 encodes by these, not by the transfer syntax
        pydicom.dcmwrite(str(path), ds, write_like_original=False)


def write_dicom_folder(
    stack: CineStack,
    folder: str | os.PathLike[str],
    dtype: Any = None,
    series_description: str | None = None,
) -> None:
    """Write one MR image per (slice, frame) into a new folder, atomically.

    Voxel values are stored as 16-bit integers. Integer data that fit are stored as they are. Float
    data whose acquired slices lie on the source series' rescale or on whole numbers are stored on that
    grid (the acquired slices bit for bit, the generated ones rounded to it); other data are stored with
    ``RescaleSlope`` / ``RescaleIntercept`` spanning their range (precision: range / 65000), with a warning.
    """
    folder = Path(folder)
    disk_dtype = output_dtype(stack, dtype)
    if disk_dtype.kind in "iu":
        # DICOM pixels here are 16-bit: 8-bit data widen, 32-bit data must fit.
        sixteen_bit = np.dtype(np.int16 if disk_dtype.kind == "i" else np.uint16)
        stored = cast_for_writing(stack.data, sixteen_bit, folder)
        slope, intercept = 1.0, 0.0
    elif (exact := _exact_16_bit_grid(stack)) is not None:
        # Float voxels whose acquired slices are whole numbers (labels, images converted to float
        # elsewhere) or on their source series' rescale: stored bit for bit, not quantised over their range.
        stored, slope, intercept = exact
    else:
        low, high = float(stack.data.min()), float(stack.data.max())
        # DS values hold at most 16 characters: quantise with the values as written.
        slope = _as_written((high - low) / 65000.0 if high > low else 1.0)
        intercept = _as_written(low)
        stored = np.rint((stack.data - intercept) / slope).clip(0, 65535).astype(np.uint16)
        if high > low:  # (a constant image is stored exactly: intercept its value, every pixel 0)
            warnings.warn(
                f"{folder}: DICOM stores 16-bit integers, and no 16-bit grid (whole numbers, or the source series' rescale) holds these "
                f"voxel values' acquired slices with steps fine enough for the rest: they are stored to within {slope / 2:.3g} of their value, "
                "not bit for bit; NIfTI or NRRD keep them exactly",
                stacklevel=2,
            )
    signed = stored.dtype.kind == "i"

    dicom_meta = stack.metadata.get("dicom", {}) if isinstance(stack.metadata.get("dicom"), dict) else {}
    # A new study: the files are anonymised (no patient data are carried over), and a source study UID
    # under another patient identity is refused or misfiled by PACS. The frame of reference is kept,
    # so that viewers still overlay the output on the source series.
    study_uid = generate_uid()
    frame_of_reference = dicom_meta.get("FrameOfReferenceUID") or generate_uid()
    series_uid = generate_uid()
    # Each output is a study of its own, but outputs copied into one folder (an image and its labels,
    # two modes) are told apart by number too: one from the UID's random digits, from 1000 up.
    series_number = 1000 + int(series_uid.replace(".", "")[-8:]) % 9000
    now = datetime.datetime.now()
    recorded = stack.metadata.get("upsampling")
    upsampling: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    # How the series was made, where a viewer lists series (all CaLID outputs are otherwise alike).
    made = f"CaLID {describe_upsampling(upsampling)}" if upsampling_steps(upsampling) else "CaLID"
    if isinstance(stack.metadata.get("labels"), dict):  # calid segment's labels: not to be taken for the image
        made = f"{made} labels"
    description = series_description or str(stack.metadata.get("description", made))
    row_direction, column_direction = stack.direction[:, 0], stack.direction[:, 1]
    dicom_normal = np.cross(row_direction, column_direction)  # DICOM's slice axis, whatever the stack's handedness
    times = stack.frame_times_ms
    # The source's thickness for a converted series; an upsampled one's slices are as thick as they are apart.
    acquired_thickness = None if "upsampling" in stack.metadata else dicom_meta.get("SliceThickness")
    thickness = stack.metadata.get("slice_thickness_mm") or acquired_thickness or stack.slice_spacing
    record = _anonymous_record(stack)
    record_text = json.dumps(record) if record else None

    try:
        with atomic_directory(folder) as tmp:
            for z in range(stack.n_slices):
                position = stack.slice_origin(z)
                for t in range(stack.n_frames):
                    instance = z * stack.n_frames + t + 1
                    meta = FileMetaDataset()
                    meta.MediaStorageSOPClassUID = MRImageStorage
                    meta.MediaStorageSOPInstanceUID = generate_uid()
                    meta.TransferSyntaxUID = ExplicitVRLittleEndian
                    ds = Dataset()
                    ds.file_meta = meta
                    ds.SOPClassUID = MRImageStorage
                    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
                    ds.StudyInstanceUID = study_uid
                    ds.SeriesInstanceUID = series_uid
                    ds.FrameOfReferenceUID = frame_of_reference
                    ds.Modality = "MR"
                    ds.PatientName = "Anonymous"
                    ds.PatientID = "CaLID"
                    # Type 2 attributes of the MR image object: present, empty where unknown (strict readers require them).
                    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                                    "Manufacturer", "PositionReferenceIndicator", "ScanOptions", "EchoTime", "EchoTrainLength"):
                        setattr(ds, keyword, "")
                    ds.ScanningSequence = "RM"  # research mode: generated images have no pulse sequence of their own
                    ds.SequenceVariant = "NONE"
                    ds.MRAcquisitionType = "2D"
                    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
                    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
                    ds.SeriesDescription = description[:64]
                    ds.SeriesNumber = series_number
                    ds.InstanceNumber = instance
                    ds.ImageType = ["DERIVED", "SECONDARY"]
                    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
                    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_direction, *column_direction)]
                    ds.PixelSpacing = [f"{stack.spacing[1]:.8g}", f"{stack.spacing[0]:.8g}"]
                    ds.SliceThickness = f"{float(thickness):.6g}"
                    ds.SpacingBetweenSlices = f"{stack.slice_spacing:.8g}"
                    ds.SliceLocation = f"{float(np.dot(position, dicom_normal)):.6f}"
                    if times is not None:
                        ds.TriggerTime = f"{times[t]:.6f}"
                    ds.CardiacNumberOfImages = stack.n_frames
                    ds.TemporalPositionIdentifier = t + 1
                    ds.NumberOfTemporalPositions = stack.n_frames
                    ds.SamplesPerPixel = 1
                    ds.PhotometricInterpretation = "MONOCHROME2"
                    ds.Rows, ds.Columns = stack.shape[2], stack.shape[3]
                    ds.BitsAllocated = ds.BitsStored = 16
                    ds.HighBit = 15
                    ds.PixelRepresentation = 1 if signed else 0
                    ds.RescaleSlope = DSfloat(slope, auto_format=True)
                    ds.RescaleIntercept = DSfloat(intercept, auto_format=True)
                    if record_text:
                        ds.private_block(RECORD_GROUP, RECORD_CREATOR, create=True).add_new(RECORD_ELEMENT, "UT", record_text)
                    ds.PixelData = np.ascontiguousarray(stored[t, z]).tobytes()
                    _write_file(tmp / f"IM_{z:04d}_{t:04d}.dcm", ds)
    except OSError as error:
        raise OutputError(folder, f"cannot be written ({error})") from error
