from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from calid.data.io import read_stack, write_stack
from calid.data.stack import CineStack
from calid.inference.baselines import upsample_linear
from calid.errors import InputError, OutputError

from conftest import oblique_stack, shared_file

FILE_FORMATS = [".nii", ".nii.gz", ".nrrd", ".seq.nrrd"]


def assert_same_stack(a: CineStack, b: CineStack, atol_mm: float = 1e-9, data_equal: bool = True) -> None:
    assert a.shape == b.shape
    if data_equal:
        np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-12, atol=atol_mm)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=atol_mm)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-9 if atol_mm <= 1e-9 else 1e-6)
    if a.frame_times_ms is None:
        assert b.frame_times_ms is None
    else:
        np.testing.assert_allclose(a.frame_times_ms, b.frame_times_ms, atol=1e-6)


@pytest.mark.parametrize("suffix", FILE_FORMATS)
@pytest.mark.parametrize("frames", [1, 4])
def test_generated_stack_round_trips_exactly(tmp_path, suffix, frames):
    stack = oblique_stack(frames=frames)
    if frames == 1:
        stack = stack.with_data(stack.data, frame_times_ms=None)
    path = write_stack(stack, tmp_path / f"stack{suffix}")
    back = read_stack(path)
    assert_same_stack(stack, back)
    assert back.metadata["source_dtype"] == "int16"


def test_nifti_header_matches_geometry_for_other_readers(tmp_path):
    """nibabel's RAS affine and SimpleITK's LPS geometry of our file are the stack's geometry."""
    stack = oblique_stack(frames=1).with_data(oblique_stack(frames=1).data, frame_times_ms=None)
    path = write_stack(stack, tmp_path / "x.nii.gz")
    affine = nib.load(str(path)).affine
    ras_from_lps = np.diag([-1.0, -1.0, 1.0])
    for ijk in ([0, 0, 0], [4, 7, 3]):
        expected_lps = stack.index_to_physical(ijk)
        np.testing.assert_allclose(affine[:3, :3] @ ijk + affine[:3, 3], ras_from_lps @ expected_lps, atol=1e-3)
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(image.GetOrigin(), stack.origin, atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), stack.spacing, rtol=1e-5)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), stack.direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), stack.data[0])


def test_nifti_4d_time_axis_is_in_milliseconds(tmp_path):
    stack = oblique_stack(frames=4)
    path = write_stack(stack, tmp_path / "cine.nii.gz")
    header = nib.load(str(path)).header
    assert header.get_xyzt_units() == ("mm", "msec")
    assert header.get_zooms()[3] == pytest.approx(37.5)
    assert float(header["toffset"]) == pytest.approx(12.0)


def test_nrrd_3d_read_by_simpleitk_has_our_geometry(tmp_path):
    stack = oblique_stack(frames=1).with_data(oblique_stack(frames=1).data, frame_times_ms=None)
    path = write_stack(stack, tmp_path / "x.nrrd")
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(image.GetOrigin(), stack.origin, atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), stack.spacing, rtol=1e-9)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), stack.direction, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), stack.data[0])


def test_seq_nrrd_has_slicer_sequence_fields(tmp_path):
    stack = oblique_stack(frames=4)
    path = write_stack(stack, tmp_path / "cine.seq.nrrd")
    data, header = nrrd.read(str(path), index_order="F")
    assert header["kinds"] == ["list", "domain", "domain", "domain"]
    assert data.shape == (4, stack.shape[3], stack.shape[2], stack.shape[1])
    assert header["axis 0 index type"] == "numeric"
    assert [float(v) for v in header["axis 0 index values"].split()] == pytest.approx(stack.frame_times_ms.tolist())
    # frame 2, slice 1, row 3, column 4
    assert data[2, 4, 3, 1] == stack.data[2, 1, 3, 4]


def test_seq_nrrd_with_list_axis_last_and_ras_space_is_read(tmp_path):
    """Newer Slicer versions write the list axis last; RAS space is converted to LPS."""
    stack = oblique_stack(frames=3)
    ras = np.diag([-1.0, -1.0, 1.0])
    axes_ras = ras @ (stack.direction * np.asarray(stack.spacing))
    header = {
        "space": "right-anterior-superior",
        "space origin": ras @ np.asarray(stack.origin),
        "space directions": np.vstack([axes_ras.T, np.full(3, np.nan)]),
        "kinds": ["domain", "domain", "domain", "list"],
        "labels": ["", "", "", "time"],
        "axis 3 index type": "numeric",
        "axis 3 index values": "0.012 0.0495 0.087",
    }
    path = tmp_path / "slicer.seq.nrrd"
    data = np.transpose(stack.data.astype(np.int16), (3, 2, 1, 0))
    nrrd.write(str(path), data, header, index_order="F", custom_field_map={"axis 3 index type": "string", "axis 3 index values": "string"})
    back = read_stack(path)
    assert_same_stack(stack, back, atol_mm=1e-6)


def test_dicom_round_trip_and_independent_reader(tmp_path):
    stack = oblique_stack(frames=3)
    folder = write_stack(stack, tmp_path / "dicom")
    files = sorted(folder.iterdir())
    assert len(files) == stack.n_frames * stack.n_slices
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # as a plain mkdir: other users can open the series
    assert files[0].stat().st_mode & 0o777 == 0o666 & ~umask
    back = read_stack(folder)
    assert_same_stack(stack, back, atol_mm=1e-5)
    # SimpleITK / GDCM sees the same geometry for the first frame's slices.
    first_frame = [str(f) for f in files if pydicom.dcmread(str(f), stop_before_pixels=True).TemporalPositionIdentifier == 1]
    reader = sitk.ImageSeriesReader()
    # In GDCM's own order (it sorts by position along the normal), not by the SliceLocation we wrote.
    reader.SetFileNames([f for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)) if f in set(first_frame)])
    image = reader.Execute()
    np.testing.assert_allclose(image.GetOrigin(), stack.origin, atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), stack.spacing, rtol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), stack.data[0], atol=1e-3)


@pytest.mark.parametrize("name", ["dense.nii.gz", "dense.nrrd", "dense.seq.nrrd", "dense_dicom"])
def test_how_a_stack_was_made_survives_every_output_format(tmp_path, name):
    """The upsampling record (mode, factor, warnings) and the frame numbers of a selection are read back
    from every format calid writes, so that a result can be told from an acquisition and paired with its cine."""
    stack = oblique_stack(frames=2)
    stack.metadata.update({
        "upsampling": {"mode": "calid+", "factor": 4, "warning": "line one\nline two"},
        "source_frames": [3, 17],
        "source_frame_count": 30,
        "geometry_note": "said about an earlier input",
    })
    back = read_stack(write_stack(stack, tmp_path / name))
    kept = dict(stack.metadata["upsampling"])
    if name.endswith("dicom"):
        del kept["warning"]  # warnings may quote the input's path: not in an anonymised study
    assert back.metadata["upsampling"] == kept
    assert back.metadata["source_frames"] == [3, 17] and back.metadata["source_frame_count"] == 30
    # What a reader said about the earlier input does not describe this file.
    assert "geometry_note" not in back.metadata


def test_dicom_record_carries_no_source_identity(tmp_path):
    """A DICOM output is a new anonymised study: the record inside it keeps no UIDs, names or paths of
    the source (a warning about an input without geometry quotes its path; a model file lies somewhere)."""
    source = write_stack(oblique_stack(frames=2), tmp_path / "DOE^JANE")
    converted = read_stack(source)
    converted.metadata["upsampling"] = {"mode": "calid", "factor": 2, "model": str(tmp_path / "Doe_Jane_models" / "tuned.safetensors"),
                                        "warning": f"{tmp_path / 'Doe_Jane' / 'cine.nii'} carries no geometry"}
    converted.metadata["segmentation_model"] = str(tmp_path / "Doe_Jane_models" / "seg.safetensors")
    converted.metadata["source_node"] = "Doe Jane cine"
    folder = write_stack(converted, tmp_path / "out")
    text = b"".join(path.read_bytes() for path in folder.iterdir())
    for identifying in ("StudyInstanceUID", "SeriesInstanceUID"):
        assert converted.metadata["dicom"][identifying].encode() not in text
    assert b"DOE^JANE" not in text and b"Doe_Jane" not in text and b"Doe Jane" not in text
    header = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    assert header.private_block(0x0011, "CaLID")[0x01].VR == "UT"
    back = read_stack(folder)
    assert back.metadata["upsampling"] == {"mode": "calid", "factor": 2, "model": "tuned.safetensors"}


def test_dicom_record_survives_a_transcode_to_implicit_vr(tmp_path):
    """Archives often store images as implicit VR little endian: the private element comes back as
    VR UN (bytes), and the record must still read."""
    stack = oblique_stack(frames=2)
    stack.metadata["source_frames"] = [4, 9]
    folder = write_stack(stack, tmp_path / "series")
    for path in folder.iterdir():
        dataset = pydicom.dcmread(str(path))
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        dataset.save_as(str(path), enforce_file_format=True)
    assert pydicom.dcmread(str(next(folder.iterdir())))[0x0011, 0x1001].VR == "UN"
    assert read_stack(folder).metadata["source_frames"] == [4, 9]


@pytest.mark.parametrize("entry, value", [("upsampling", None), ("upsampling", [1, 2]), ("source_frames", "0,11"), ("source_frames", [0, -3]),
                                          ("source_frame_count", 0), ("slice_thickness_mm", "8 mm")])
def test_a_record_entry_of_the_wrong_kind_is_left_out(tmp_path, entry, value):
    """A header edited by hand: an entry in the wrong form must not mislead what reads it (select_frames, the pairing, Simpson's weights)."""
    stack = oblique_stack(frames=2)
    stack.metadata.update({"source_frames": [0, 5], "upsampling": {"factor": 2, "mode": "linear"}})
    path = write_stack(stack, tmp_path / "cine.nrrd")
    header = nrrd.read_header(str(path))
    record = json.loads(header["calid metadata"])
    record[entry] = value
    raw = path.read_bytes()
    start = raw.index(b"calid metadata:=")
    path.write_bytes(raw[:start] + b"calid metadata:=" + json.dumps(record).encode() + raw[raw.index(b"\n", start):])
    back = read_stack(path)
    assert entry not in back.metadata
    assert all(back.metadata[key] == stack.metadata[key] for key in ("source_frames", "upsampling") if key != entry)
    back.select_frames([1])  # reads the record without tripping over it


def test_a_damaged_record_is_ignored_and_the_image_still_reads(tmp_path):
    stack = oblique_stack(frames=2)
    stack.metadata["source_frames"] = [0, 5]
    path = write_stack(stack, tmp_path / "cine.nrrd")
    header = nrrd.read_header(str(path))
    assert "calid metadata" in header
    raw = path.read_bytes()
    start = raw.index(b"calid metadata:=")
    broken = raw[:start] + b"calid metadata:={not json" + raw[raw.index(b"\n", start):]
    path.write_bytes(broken)
    back = read_stack(path)
    assert_same_stack(stack, back)
    assert "source_frames" not in back.metadata


def test_the_nifti_record_is_readable_json_and_older_compressed_records_still_read(tmp_path):
    import zlib

    stack = oblique_stack(frames=3)
    stack = stack.with_data(stack.data, frame_times_ms=np.array([0.0, 40.0, 130.0]))  # uneven: kept by the record only
    stack.metadata["upsampling"] = {"mode": "linear", "factor": 2}
    with pytest.warns(UserWarning, match="not evenly spaced"):
        path = write_stack(stack, tmp_path / "cine.nii.gz")
    extension = nib.load(str(path)).header.extensions[0]
    assert extension.get_code() == 6  # "comment": other tools show it as text
    record = json.loads(extension.get_content()[len(b"CaLID-geometry "):].rstrip(b"\0"))
    assert record["metadata"]["upsampling"] == {"mode": "linear", "factor": 2}
    # As earlier versions wrote it: the same JSON, zlib-compressed; one whose checksum ends in a zero
    # byte (1 stream in 256), which the padding to 16 bytes must not be confused with.
    for attempt in range(100000):
        record["metadata"]["note"] = str(attempt)
        compressed = zlib.compress(json.dumps(record).encode())
        if compressed.endswith(b"\0"):
            break
    assert compressed.endswith(b"\0")
    image = nib.load(str(path))
    image.header.extensions.clear()
    image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"CaLID-geometry " + compressed))
    older = tmp_path / "older.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, image.header), str(older))
    back = read_stack(older)
    assert back.metadata["upsampling"] == {"mode": "linear", "factor": 2} and back.metadata["note"] == record["metadata"]["note"]
    np.testing.assert_array_equal(back.frame_times_ms, stack.frame_times_ms)


def test_dicom_float_data_are_stored_with_rescale(tmp_path):
    stack = oblique_stack(frames=2)
    stack = stack.with_data(stack.data / 7.0 - 3.25, metadata={})
    with pytest.warns(UserWarning, match=r"d: DICOM stores 16-bit integers, and no 16-bit grid .* not bit for bit"):
        back = read_stack(write_stack(stack, tmp_path / "d"))
    span = float(stack.data.max() - stack.data.min())
    np.testing.assert_allclose(back.data, stack.data, atol=span / 65000.0)


@pytest.mark.parametrize("offset", [0.0, -1024.0])
def test_dicom_float_data_holding_whole_numbers_are_stored_exactly(tmp_path, offset):
    """Float files holding whole numbers (ACDC's float32 images, labels, CT-like negative values):
    written as 16-bit integers with slope 1, so they read back bit for bit, not quantised over their range."""
    stack = oblique_stack(frames=2)
    stack = stack.with_data(stack.data.astype(np.float32) + np.float32(offset), metadata={"source_dtype": "float32"})
    folder = write_stack(stack, tmp_path / "d")
    header = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    assert float(header.RescaleSlope) == 1.0 and header.PixelRepresentation == (1 if offset < 0 else 0)
    np.testing.assert_array_equal(read_stack(folder).data, stack.data)


def test_dicom_output_keeps_acquired_slices_on_their_source_rescale_or_whole_numbers(tmp_path):
    """A DICOM cine with a Rescale Slope / Intercept (as some scanners write), and a float file holding
    whole numbers, upsampled: the generated slices are not on the grid of the acquired ones, which must
    still come back bit for bit from a DICOM output (as from NIfTI), with no warning."""
    import warnings

    stack = oblique_stack(frames=2)
    integers = stack.with_data(np.rint(stack.data).astype(np.float32), metadata={"source_dtype": "int16"})
    series = write_stack(integers, tmp_path / "scanner")
    for path in series.iterdir():  # stored values v, read as 2.5 v - 100
        image = pydicom.dcmread(str(path))
        image.RescaleSlope, image.RescaleIntercept = "2.5", "-100"
        image.save_as(str(path))
    rescaled = read_stack(series)
    assert rescaled.metadata["dicom"]["rescale"] == [2.5, -100.0]
    np.testing.assert_array_equal(rescaled.data, integers.data * np.float32(2.5) - np.float32(100))
    float_whole = integers.with_data(integers.data, metadata={"source_dtype": "float32"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no quantisation warning
        for name, source in (("rescaled", rescaled), ("float", float_whole)):
            copied = read_stack(write_stack(source, tmp_path / f"{name}-copy"))
            np.testing.assert_array_equal(copied.data, source.data)
            dense = upsample_linear(source, 2)
            assert not np.array_equal(dense.data, np.rint(dense.data))  # generated slices off the grid
            back = read_stack(write_stack(dense, tmp_path / f"{name}-dense"))
            np.testing.assert_array_equal(back.data[:, ::2], source.data)
            np.testing.assert_allclose(back.data[:, 1::2], dense.data[:, 1::2], atol=1.25 if name == "rescaled" else 0.5)
    # not on a grid too coarse for the generated slices (acquired 0 and 1), nor clipped to the acquired slices' type, nor
    # by a record that does not match the stack: such data are quantised over their range instead, and a warning says so
    binary = upsample_linear(integers.with_data((integers.data > integers.data.mean()).astype(np.float32), metadata={"source_dtype": "float32"}), 4)
    below = upsample_linear(float_whole, 2)
    below.data[0, 1] = -50.0  # below the acquired slices' unsigned range: stored signed, not clipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = read_stack(write_stack(below, tmp_path / "below"))
    assert back.data[0, 1].min() == -50.0 and np.array_equal(back.data[:, ::2], float_whole.data)
    overshoot = below.with_data(below.data.copy())
    overshoot.data[0, 1] = 70000.5  # beyond 16 bits on any grid
    # (its even slices whole, its odd ones not, and a record of every other slice acquired that does not fit its slice count)
    dense = upsample_linear(float_whole, 2)
    wrong_record = dense.with_data(dense.data[:, :-1].copy())
    assert wrong_record.acquired_slice_step() == 2 and wrong_record.metadata["upsampling"]["acquired_slice_indices"] != list(range(0, wrong_record.n_slices, 2))
    constant = float_whole.with_data(np.full(float_whole.shape, 7.25, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stored exactly: no warning
        np.testing.assert_array_equal(read_stack(write_stack(constant, tmp_path / "constant")).data, constant.data)
    for name, stack in (("binary", binary), ("overshoot", overshoot), ("wrong-record", wrong_record)):
        with pytest.warns(UserWarning, match="not bit for bit"):
            back = read_stack(write_stack(stack, tmp_path / name))
        span = float(stack.data.max() - stack.data.min())
        np.testing.assert_allclose(back.data, stack.data, atol=span / 65000.0)


REAL_FILES = [
    ("acdc_cine", "patient001_4d.nii.gz"),
    ("acdc_cine", "patient040_4d.nii.gz"),
    ("acdc_edes_labels", "patient001_frame01.nii.gz"),
    ("acdc_edes_labels", "patient001_frame01_gt.nii.gz"),
    ("sunnybrook_sample", "SCD0000101_4d.nii.gz"),
]


@pytest.mark.parametrize("folder, name", REAL_FILES)
def test_real_files_round_trip_through_every_format(tmp_path, folder, name):
    source = shared_file(folder, name)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    stack = read_stack(source)
    if stack.n_frames > 4:
        stack = stack.select_frames(range(4))
    for suffix in FILE_FORMATS:
        assert_same_stack(stack, read_stack(write_stack(stack, tmp_path / f"x{suffix}")))
    assert_same_stack(stack.right_handed(), read_stack(write_stack(stack, tmp_path / "dicom")), atol_mm=1e-5)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before, "the input file was modified"


def test_real_sunnybrook_geometry_matches_nibabel_affine():
    path = shared_file("sunnybrook_sample", "SCD0000101_4d.nii.gz")
    stack = read_stack(path)
    affine = nib.load(str(path)).affine
    ijk = np.array([17.0, 101.0, 7.0])
    ras = affine[:3, :3] @ ijk + affine[:3, 3]
    np.testing.assert_allclose(stack.index_to_physical(ijk), np.diag([-1.0, -1.0, 1.0]) @ ras, atol=1e-4)
    assert stack.frame_interval_ms == pytest.approx(40.0)
    assert stack.slice_spacing == pytest.approx(10.0, abs=1e-4)
    assert stack.shape == (20, 12, 128, 128)


def test_placeholder_affine_takes_voxel_size_from_pixdim():
    path = shared_file("acdc_edes_labels", "patient001_frame01.nii.gz")
    stack = read_stack(path)
    assert stack.spacing == pytest.approx((1.5625, 1.5625, 10.0))
    assert "pixdim" in stack.metadata["geometry_note"]


# ----------------------------------------------------------------- bad input
def test_truncated_nifti_is_refused_naming_the_file(tmp_path):
    stack = oblique_stack(frames=2)
    good = write_stack(stack, tmp_path / "good.nii.gz")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(InputError, match="broken.nii.gz.*(truncated|cannot be read)"):
        read_stack(broken)
    for name in ("empty.nii.gz", "empty.nrrd"):  # an interrupted copy: said in so many words
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(InputError, match=rf"{name}: is empty \(0 bytes\)"):
            read_stack(tmp_path / name)


def test_garbage_and_unknown_files_are_refused(tmp_path):
    garbage = tmp_path / "noise.nii"
    garbage.write_bytes(b"not an image at all" * 10)
    with pytest.raises(InputError, match="noise.nii"):
        read_stack(garbage)
    unknown = tmp_path / "scan.png"
    unknown.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unknown file type"):
        read_stack(unknown)
    with pytest.raises(InputError, match="no such file"):
        read_stack(tmp_path / "missing.nii.gz")
    with pytest.raises(OutputError, match="unknown file type"):  # an output, not an input, problem
        write_stack(oblique_stack(), tmp_path / "out.png")
    rgb = nib.Nifti1Image(np.zeros((4, 4, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4))
    nib.save(rgb, str(tmp_path / "colour.nii.gz"))
    with pytest.raises(InputError, match="colour or structured voxels"):
        read_stack(tmp_path / "colour.nii.gz")


def test_wrong_dimensionality_and_single_slice_are_refused(tmp_path):
    two_d = tmp_path / "slice2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), dtype=np.int16), np.eye(4)), str(two_d))
    with pytest.raises(InputError, match="slice2d.nii.gz.*axes"):
        read_stack(two_d)
    one_slice = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1, 5), dtype=np.int16), np.eye(4)), str(one_slice))
    with pytest.raises(InputError, match="one.nii.gz.*1 slice"):
        read_stack(one_slice)
    five_d = tmp_path / "five.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2, 2), dtype=np.int16), np.eye(4)), str(five_d))
    with pytest.raises(InputError, match="five.nii.gz"):
        read_stack(five_d)


def test_nan_and_zero_size_are_refused(tmp_path):
    data = np.ones((6, 6, 3), dtype=np.float32)
    data[2, 2, 1] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(InputError, match="nan.nii.gz.*NaN"):
        read_stack(path)
    empty = tmp_path / "empty.nrrd"
    nrrd.write(str(empty), np.zeros((4, 0, 3), dtype=np.int16), {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)})
    with pytest.raises(InputError, match="empty.nrrd"):
        read_stack(empty)


def test_integer_overflow_on_write_is_an_error_and_writes_nothing(tmp_path):
    stack = oblique_stack(frames=1)
    stack = stack.with_data(stack.data + 40000.0)  # does not fit int16
    for target in (tmp_path / "o.nii.gz", tmp_path / "o.seq.nrrd", tmp_path / "o_dicom"):
        with pytest.raises(OutputError, match="do not fit in int16"):
            write_stack(stack, target)
        assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary files left behind either


def test_failed_write_leaves_existing_output_untouched(tmp_path):
    stack = oblique_stack(frames=1)
    target = write_stack(stack, tmp_path / "keep.nii.gz")
    before = target.read_bytes()
    with pytest.raises(OutputError):
        write_stack(stack.with_data(stack.data * 1000.0), target)
    assert target.read_bytes() == before
    with pytest.raises(OutputError, match="refusing to overwrite"):
        write_stack(stack, target, overwrite=False)


def _dicom_folder(tmp_path: Path, name: str = "series", frames: int = 2, slices: int = 4) -> Path:
    return write_stack(oblique_stack(frames=frames, slices=slices), tmp_path / name)


def test_dicom_missing_slice_gives_non_uniform_spacing_error(tmp_path):
    folder = _dicom_folder(tmp_path)
    for path in folder.glob("IM_0001_*.dcm"):
        path.unlink()
    with pytest.raises(InputError, match="not evenly spaced"):
        read_stack(folder)


def test_dicom_duplicated_image_is_refused(tmp_path):
    folder = _dicom_folder(tmp_path)
    shutil.copy(folder / "IM_0002_0001.dcm", folder / "IM_9999_0001.dcm")
    with pytest.raises(InputError, match="(duplicated|different numbers of frames)"):
        read_stack(folder)


def test_dicom_several_series_are_listed_and_selectable(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    first = _dicom_folder(root, "a", frames=2)
    second = write_stack(oblique_stack(frames=1, slices=3, seed=5), root / "b")
    for path in second.iterdir():  # give the second series its own number and description
        ds = pydicom.dcmread(str(path))
        ds.SeriesNumber = 7
        ds.SeriesDescription = "SAX cine late"
        ds.save_as(str(path))
    with pytest.raises(InputError, match="holds 2 image series") as caught:
        read_stack(root)
    assert "SAX cine late" in str(caught.value)
    assert read_stack(root, series="late").shape[:2] == (1, 3)
    assert read_stack(root, series=7).shape[:2] == (1, 3)
    uid = pydicom.dcmread(str(next(first.iterdir()))).SeriesInstanceUID
    assert read_stack(root, series=uid).shape[:2] == (2, 4)
    assert read_stack(root, series=uid[-10:]).shape[:2] == (2, 4)  # the end of the UID, as copied from the listing
    with pytest.raises(InputError, match="matches no series"):
        read_stack(root, series=uid[:12])  # the start: the UIDs of one tool share it
    with pytest.raises(InputError, match="matches no series"):
        read_stack(root, series="nothing like it")


def test_dicom_outputs_copied_into_one_folder_are_told_apart(tmp_path):
    """An image and its labels written by calid, then put into one folder (as for a PACS upload):
    each series has a number of its own, the labels say they are labels, and the listing names --series."""
    root = tmp_path / "together"
    root.mkdir()
    image = upsample_linear(oblique_stack(frames=2, slices=3), 2)
    labels = image.with_data(np.rint(np.clip(image.data / image.data.max() * 3, 0, 3)))
    labels.metadata["labels"] = {"1": "RV cavity", "2": "LV myocardium", "3": "LV cavity"}
    written = [write_stack(image, root / "image"), write_stack(labels, root / "labels", dtype="uint8")]
    headers = [pydicom.dcmread(str(next(folder.iterdir()))) for folder in written]
    numbers = [int(h.SeriesNumber) for h in headers]
    assert all(1000 <= n < 10000 for n in numbers)
    if numbers[0] == numbers[1]:
        pytest.skip("the two series numbers, drawn from random UIDs, coincided (1 chance in 9000)")
    assert headers[0].SeriesDescription == "CaLID linear x2" and headers[1].SeriesDescription == "CaLID linear x2 labels"
    with pytest.raises(InputError, match=r"choose one with --series \(series= in Python\)"):
        read_stack(root)
    assert read_stack(root, series=str(numbers[1])).metadata["labels"]["3"] == "LV cavity"
    assert np.array_equal(read_stack(root, series=str(numbers[0])).data, read_stack(written[0]).data)


def test_dicom_mixed_orientations_in_one_series_are_refused(tmp_path):
    folder = _dicom_folder(tmp_path)
    path = folder / "IM_0000_0000.dcm"
    ds = pydicom.dcmread(str(path))
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(str(path))
    with pytest.raises(InputError, match="different image orientation"):
        read_stack(folder)


def test_dicom_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM MR images"):
        read_stack(tmp_path)


def test_gzip_corruption_in_data_is_reported(tmp_path):
    stack = oblique_stack(frames=2)
    raw = write_stack(stack, tmp_path / "raw.nii")
    payload = bytearray(gzip.compress(raw.read_bytes()))
    payload[len(payload) // 2 : len(payload) // 2 + 64] = b"\x00" * 64
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(bytes(payload))
    with pytest.raises(InputError, match="corrupt.nii.gz"):
        read_stack(corrupt)


@pytest.mark.parametrize("keep_trigger_time", [True, False])
def test_dicom_order_comes_from_headers_not_file_names(tmp_path, keep_trigger_time):
    """Shuffled file names; without TriggerTime the frames follow InstanceNumber."""
    stack = oblique_stack(frames=3, slices=4)
    folder = write_stack(stack, tmp_path / "dicom")
    files = sorted(folder.iterdir())
    names = [f"{i:08x}" for i in np.random.default_rng(1).permutation(len(files))]
    for path, name in zip(files, names):
        ds = pydicom.dcmread(str(path))
        if not keep_trigger_time:
            del ds.TriggerTime
        ds.SliceLocation = "0"  # must not be used for sorting or spacing
        path.unlink()
        ds.save_as(str(folder / name))
    back = read_stack(folder)
    np.testing.assert_array_equal(back.data, stack.data)
    assert back.slice_spacing == pytest.approx(stack.slice_spacing, abs=1e-5)
    assert (back.frame_times_ms is not None) == keep_trigger_time


def test_a_file_output_over_an_existing_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "out.nii.gz"
    folder.mkdir()
    with pytest.raises(OutputError, match="out.nii.gz: is a folder"):
        write_stack(oblique_stack(frames=1), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"] and not any(folder.iterdir())


def _nifti_with_forms(path, qform, qform_code, sform, sform_code):
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    image = nib.Nifti1Image(data, np.eye(4))
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize(
    "case, qform_code, sform_code, sheared_sform, expected",
    [
        ("registered sform (code 2) beside the scanner qform", 1, 2, False, "qform"),
        ("scanner sform (code 1) beside another qform", 1, 1, False, "sform"),
        ("sform only (code 2)", 0, 2, False, "sform"),
        ("sheared sform beside a valid qform", 1, 2, True, "qform"),
    ],
)
def test_nifti_qform_or_sform_is_chosen_as_itk_and_slicer_choose(tmp_path, case, qform_code, sform_code, sheared_sform, expected):
    """Where the two transforms disagree, the one ITK (Slicer, ITK-SNAP) uses: the output then
    overlays the input in Slicer."""
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    qform = np.eye(4)
    qform[:3, :3] = rotation @ np.diag([1.5, 1.5, 8.0])
    qform[:3, 3] = [10.0, -20.0, 30.0]
    sform = qform.copy()
    sform[:3, 3] += [5.0, 7.0, -9.0]  # registered elsewhere
    if sheared_sform:
        sform[0, 1] += 0.6
    path = _nifti_with_forms(tmp_path / "forms.nii.gz", qform, qform_code, sform, sform_code)
    stack = read_stack(path)
    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(stack.origin, itk.GetOrigin(), atol=1e-4)  # ITK's own reading, independently
    np.testing.assert_allclose(stack.direction.reshape(-1), itk.GetDirection(), atol=1e-5)
    used = qform if expected == "qform" else sform
    np.testing.assert_allclose(stack.origin, [-used[0, 3], -used[1, 3], used[2, 3]], atol=1e-4)
    if expected == "qform":
        assert "qform (code 1) was used" in stack.metadata["geometry_note"]
    back = read_stack(write_stack(stack, tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(back.origin, itk.GetOrigin(), atol=1e-4)


def test_nifti_without_orientation_is_written_back_without_one(tmp_path):
    """Codes 0 in, codes 0 out: claiming scanner space would make nibabel and FSL show the output
    flipped against the input, which they show without an orientation."""
    data = np.random.default_rng(0).integers(0, 100, size=(6, 5, 4, 3)).astype(np.int16)
    image = nib.Nifti1Image(data, np.diag([1.4, 1.4, 9.0, 1.0]))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    image.header.set_zooms((1.4, 1.4, 9.0, 30.0))
    source = tmp_path / "bare.nii.gz"
    nib.save(image, str(source))
    stack = read_stack(source)
    assert stack.metadata["orientation_unknown"] is True
    out = write_stack(stack, tmp_path / "copy.nii.gz")
    written = nib.load(str(out))
    assert int(written.header["qform_code"]) == 0 and int(written.header["sform_code"]) == 0
    np.testing.assert_allclose(written.affine, nib.load(str(source)).affine, atol=1e-6)  # nibabel places both alike
    np.testing.assert_array_equal(read_stack(out).data, stack.data)
    turned = stack.with_data(stack.data, direction=np.diag([1.0, -1.0, -1.0]))  # given an orientation since: claimed
    assert int(nib.load(str(write_stack(turned, tmp_path / "turned.nii.gz"))).header["qform_code"]) == 1


def test_dicom_orientation_with_few_decimals_is_read_and_written_as_a_new_study(tmp_path):
    axial = oblique_stack(frames=2, slices=4)
    folder = write_stack(axial.with_data(axial.data, direction=np.eye(3)), tmp_path / "series")
    for path in folder.iterdir():  # row and column 3e-4 from perpendicular, as rounded headers give
        ds = pydicom.dcmread(str(path))
        ds.ImageOrientationPatient = [1, 0, 0, 0.0003, 1, 0]
        ds.SliceThickness = 7.0  # thinner than the slices are apart
        ds.save_as(str(path))
    stack = read_stack(folder)
    np.testing.assert_allclose(stack.direction.T @ stack.direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(stack.direction[:, 0], [1, 0, 0])
    source = pydicom.dcmread(str(next(folder.iterdir())))
    out = write_stack(stack, tmp_path / "out")
    written = pydicom.dcmread(str(next(out.iterdir())))
    assert written.StudyInstanceUID != source.StudyInstanceUID  # anonymised files, a study of their own
    assert written.FrameOfReferenceUID == source.FrameOfReferenceUID  # still overlays the source
    # The MR image object's type 1 attributes have values, its type 2 ones are present.
    assert written.ScanningSequence == "RM" and written.SequenceVariant == "NONE" and written.MRAcquisitionType == "2D"
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName", "Manufacturer", "PositionReferenceIndicator", "EchoTime"):
        assert keyword in written, keyword
    assert stack.slice_spacing != pytest.approx(7.0)
    assert float(written.SliceThickness) == pytest.approx(7.0)  # the acquired thickness, kept by a conversion


def _one_series_per_slice(stack: CineStack, root: Path, first_number: int = 100, frame_of_reference: str = "1.2.826.0.1.3680043.8.498.1") -> list[Path]:
    """A cine exported as many scanners do: one series per slice position, all in one frame of reference."""
    folders = []
    root.mkdir(exist_ok=True)
    for z in range(stack.n_slices):
        one = stack.with_data(stack.data[:, z : z + 1], origin=tuple(stack.slice_origin(z)))
        folder = write_stack(one, root / f"sax_{first_number + z}")
        for path in folder.iterdir():
            ds = pydicom.dcmread(str(path))
            ds.SeriesNumber = first_number + z
            ds.SeriesDescription = f"cine sax slice {z + 1}"
            ds.FrameOfReferenceUID = frame_of_reference
            ds.save_as(str(path))
        folders.append(folder)
    return folders


def test_dicom_one_series_per_slice_is_read_as_one_stack(tmp_path):
    stack = oblique_stack(frames=3, slices=5)
    root = tmp_path / "exam"
    _one_series_per_slice(stack, root)
    # A long-axis cine in the same exam: one slice too, another orientation, not part of the stack.
    long_axis = oblique_stack(frames=3, slices=1)
    long_axis = long_axis.with_data(long_axis.data, direction=np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    write_stack(long_axis, root / "lax_4ch")
    back = read_stack(root)
    assert_same_stack(stack, back, atol_mm=1e-5)
    assert "5 series of one slice each (series 100, 101, 102, 103, 104)" in back.metadata["geometry_note"]
    assert back.metadata["dicom"]["SeriesNumber"] == ["100", "101", "102", "103", "104"]
    chosen = read_stack(root, series="101,102,103")  # several series named: one slice each
    np.testing.assert_array_equal(chosen.data, stack.data[:, 1:4])
    np.testing.assert_allclose(chosen.origin, stack.slice_origin(1), atol=1e-5)
    # A second stack of the same kind (another frame of reference) makes the choice ambiguous: asked for, not guessed.
    _one_series_per_slice(oblique_stack(frames=3, slices=4, seed=1), root, first_number=200, frame_of_reference="1.2.826.0.1.3680043.8.498.2")
    with pytest.raises(InputError, match="2 groups of them"):
        read_stack(root)
    np.testing.assert_array_equal(read_stack(root, series="100,101,102,103,104").data, stack.data)


def test_cli_names_the_series_it_combined(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "exam"
    _one_series_per_slice(oblique_stack(frames=2, slices=3), root)
    done = subprocess.run([sys.executable, "-m", "calid", "convert", str(root), str(tmp_path / "cine.nii.gz")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 series of one slice each (series 100, 101, 102)" in done.stderr
    assert read_stack(tmp_path / "cine.nii.gz").n_slices == 3


@pytest.mark.parametrize("unit, to_mm", [("meter", 1000.0), ("micron", 0.001), ("mm", 1.0)])
def test_nifti_sizes_in_metres_or_microns_are_read_in_mm(tmp_path, unit, to_mm):
    """As ITK (and so Slicer) reads them; a size taken as mm would be 1000 times off."""
    affine = np.diag([0.0015, 0.0015, 0.01, 1.0]) / to_mm * 1.5 * 1000 / 1.5  # 1.5 x 1.5 x 10 mm in the file's unit
    affine[3, 3] = 1.0
    affine[:3, 3] = np.array([-100.0, 50.0, 20.0]) / to_mm
    image = nib.Nifti1Image(np.zeros((5, 4, 3), dtype=np.int16), affine)
    image.header.set_xyzt_units(unit, "msec")
    nib.save(image, str(tmp_path / "units.nii.gz"))
    stack = read_stack(tmp_path / "units.nii.gz")
    np.testing.assert_allclose(stack.spacing, (1.5, 1.5, 10.0), rtol=1e-5)
    np.testing.assert_allclose(stack.origin, (100.0, -50.0, 20.0), rtol=1e-5)
    itk = sitk.ReadImage(str(tmp_path / "units.nii.gz"))
    np.testing.assert_allclose(itk.GetSpacing(), stack.spacing, rtol=1e-5)
    np.testing.assert_allclose(itk.GetOrigin(), stack.origin, rtol=1e-5, atol=1e-4)


def test_a_dicom_file_named_reads_its_own_series_and_hidden_folders_are_ignored(tmp_path):
    root = tmp_path / "exam"
    root.mkdir()
    first = write_stack(oblique_stack(frames=2, slices=3), root / "cine")
    write_stack(oblique_stack(frames=2, slices=4, seed=3), root / "other")
    with pytest.raises(InputError, match="holds 2 image series"):
        read_stack(root)
    one_file = sorted(first.iterdir())[0]
    flat = tmp_path / "flat"  # both series' files in one folder, as a PACS export puts them
    flat.mkdir()
    for folder in (root / "cine", root / "other"):
        for path in folder.iterdir():
            shutil.copy(path, flat / f"{folder.name}_{path.name}")
    named = read_stack(flat / f"cine_{one_file.name}")
    assert named.n_slices == 3  # the named file's series, not an error about the other one
    hidden = flat / ".cine.partial.tmp"  # an interrupted write's temporary folder: copies of the same images
    shutil.copytree(root / "cine", hidden)
    np.testing.assert_array_equal(read_stack(flat, series=named.metadata["dicom"]["SeriesInstanceUID"]).data, named.data)


def test_a_selection_read_back_still_names_the_cine_its_frames_are_of(tmp_path):
    cine = write_stack(oblique_stack(frames=6), tmp_path / "cine.nii.gz")
    selection = write_stack(read_stack(cine).select_frames([1, 4]), tmp_path / "ed_es.nrrd")
    back = read_stack(selection)
    assert back.metadata["source_file"] == "ed_es.nrrd" and back.metadata["source_cine"] == "cine.nii.gz"
    assert back.recorded_frames() == [1, 4] and back.metadata["source_frame_count"] == 6
    again = read_stack(write_stack(back.select_frames([1]), tmp_path / "es.nii.gz"))  # a selection of the selection
    assert again.metadata["source_cine"] == "cine.nii.gz" and again.recorded_frames() == [4]


def test_write_stack_never_replaces_the_file_a_stack_came_from_unless_told(tmp_path, monkeypatch):
    path = write_stack(oblique_stack(frames=2), tmp_path / "acquired.nii.gz")
    stack, before = read_stack(path), path.read_bytes()
    with pytest.raises(OutputError, match="acquired.nii.gz: is the file this stack was read from"):
        write_stack(stack, path)
    # read by a relative name, written after the working directory changed (a script's os.chdir): still the same file
    monkeypatch.chdir(tmp_path)
    relative = read_stack("acquired.nii.gz")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    with pytest.raises(OutputError, match="is the file this stack was read from"):
        write_stack(relative.select_frames([0]), "../acquired.nii.gz")
    assert path.read_bytes() == before
    other = write_stack(stack, tmp_path / "copy.nii.gz")
    other.chmod(0o444)
    with pytest.raises(OutputError, match="copy.nii.gz: is read-only"):
        write_stack(stack, other)
    assert path.read_bytes() == before
    write_stack(stack, tmp_path / "copy2.nii.gz")
    write_stack(stack, tmp_path / "copy2.nii.gz")  # an earlier output of this session: replaced, as before
    write_stack(stack, path, overwrite=True)  # asked for: replaced
    with pytest.raises(TypeError, match="stack must be a CineStack"):
        write_stack(stack.data, tmp_path / "x.nii.gz")
    with pytest.raises(TypeError, match="path must be a file or folder path"):
        write_stack(stack, None)
    with pytest.raises(TypeError, match="read_stack\\(path\\): path must be"):
        read_stack(stack.data)
