"""Edge cases of real-world files: odd suffixes, scaled voxels, missing orientation, bad headers."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from calid.data.datasets import split_subjects, subject_id
from calid.data.io import read_stack, write_stack
from calid.data.preprocess import PreprocessConfig, preprocess, undo_preprocess
from calid.errors import InputError, OutputError

from conftest import oblique_stack


@pytest.mark.parametrize("name", ["p1.Nii", "p1.NII.GZ", "p1.Seq.Nrrd"])
def test_mixed_case_suffixes_write_complete_files(tmp_path, name):
    stack = oblique_stack(frames=2)
    path = write_stack(stack, tmp_path / name)
    assert path.stat().st_size > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left
    np.testing.assert_array_equal(read_stack(path).data, stack.data)


def test_scaled_integer_nifti_keeps_its_values_on_write(tmp_path):
    values = (np.arange(6 * 6 * 3, dtype=np.float32) * 0.25).reshape(6, 6, 3)
    image = nib.Nifti1Image(values, np.eye(4))
    image.header.set_data_dtype(np.int16)  # nibabel stores int16 with scl_slope, as scanners' converters do
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, str(path))
    assert nib.load(str(path)).dataobj.slope != 1.0
    stack = read_stack(path)
    assert stack.metadata["source_dtype"] == "float32"
    back = read_stack(write_stack(stack, tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(back.data, stack.data)
    assert stack.data.max() == pytest.approx(0.25 * (6 * 6 * 3 - 1), rel=1e-3)


def test_nifti_without_orientation_follows_itk(tmp_path):
    image = nib.Nifti1Image(np.ones((5, 4, 3), dtype=np.int16), None)
    image.header.set_zooms((1.5, 1.5, 10.0))
    image.header["qform_code"] = 0
    image.header["sform_code"] = 0
    path = tmp_path / "bare.nii"
    nib.save(image, str(path))
    stack = read_stack(path)
    np.testing.assert_allclose(stack.direction, np.eye(3))
    np.testing.assert_allclose(stack.origin, 0.0)
    assert stack.spacing == pytest.approx((1.5, 1.5, 10.0))
    assert "no orientation" in stack.metadata["geometry_note"]


def test_complex_nifti_and_colour_nrrd_are_refused(tmp_path):
    path = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), dtype=np.complex64), np.eye(4)), str(path))
    with pytest.raises(InputError, match="complex"):
        read_stack(path)
    colour = tmp_path / "rgb.nrrd"
    header = {"space": "left-posterior-superior", "kinds": ["RGB-color", "domain", "domain", "domain"], "space directions": np.vstack([np.full(3, np.nan), np.eye(3)]), "space origin": np.zeros(3)}
    nrrd.write(str(colour), np.zeros((3, 4, 4, 2), dtype=np.uint8), header, index_order="F")
    with pytest.raises(InputError, match="colour or vector"):
        read_stack(colour)


def test_seq_nrrd_states_time_unit_and_nhdr_is_not_written(tmp_path):
    stack = oblique_stack(frames=3)
    path = write_stack(stack, tmp_path / "cine.seq.nrrd")
    _, header = nrrd.read(str(path))
    assert header["units"][0] == "ms"
    with pytest.raises(OutputError, match="nhdr"):
        write_stack(stack, tmp_path / "cine.nhdr")
    data, header = nrrd.read(str(path))
    for unit, scale in (("sec", 1000.0), ("seconds", 1000.0), ("msec", 1.0)):  # other spellings of the unit
        header["units"] = [unit] + list(header["units"][1:])
        header["labels"] = ["cardiac phase"] + list(header["labels"][1:])  # no "time" in the name: the unit alone says it
        header["axis 0 index values"] = " ".join(f"{t / scale:.9g}" for t in stack.frame_times_ms)
        nrrd.write(str(tmp_path / f"{unit}.seq.nrrd"), data, header)
        np.testing.assert_allclose(read_stack(tmp_path / f"{unit}.seq.nrrd").frame_times_ms, stack.frame_times_ms, rtol=1e-6)


def test_malformed_dicom_geometry_is_named(tmp_path):
    folder = write_stack(oblique_stack(frames=1, slices=3), tmp_path / "dicom")
    victim = sorted(folder.iterdir())[1]
    ds = pydicom.dcmread(str(victim))
    ds.ImagePositionPatient = [1.0, 2.0]
    ds.save_as(str(victim))
    with pytest.raises(InputError, match=f"{victim.name}.*ImagePositionPatient needs 3"):
        read_stack(folder)
    # Beside another, sound series: that one is still read; the damaged one still says what is wrong.
    import shutil

    sound = write_stack(oblique_stack(frames=1, slices=4, seed=2), tmp_path / "sound")
    for path in sound.iterdir():
        ds = pydicom.dcmread(str(path))
        ds.SeriesNumber = 7
        ds.save_as(str(folder / f"sound_{path.name}"))
    shutil.rmtree(sound)
    assert read_stack(folder, series="7").n_slices == 4
    with pytest.raises(InputError, match=f"{victim.name}.*ImagePositionPatient needs 3"):
        read_stack(folder, series=str(pydicom.dcmread(str(victim)).SeriesNumber))


def test_truncated_dicom_file_is_reported(tmp_path):
    folder = write_stack(oblique_stack(frames=2, slices=3), tmp_path / "dicom")
    victim = sorted(folder.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(InputError, match="could not be read"):
        read_stack(folder)


def test_crop_mask_marks_only_pixels_restored_from_the_crop():
    stack = oblique_stack(frames=1, slices=2, rows=60, columns=50)
    y, x = np.mgrid[0:60, 0:50]
    stack = stack.with_data(np.broadcast_to(100 + 40 * np.sin(x / 6.0) + 30 * np.cos(y / 7.0), stack.shape).astype(np.float32))
    processed, params = preprocess(stack, PreprocessConfig(target_spacing_mm=1.9, crop_size=(20, 20), percentiles=(0, 100)))
    restored = undo_preprocess(processed, params)
    mask = params.crop_mask()
    assert 0 < mask.sum() < mask.size
    error = np.abs(restored.data - stack.data)[..., mask]
    assert error.max() < 0.02 * 140  # no pixel blended with the padding


def test_subjects_in_folders_are_split_by_folder(tmp_path):
    for patient in ("P001", "P002", "P003"):
        for name in ("cine_sax.nii.gz", "cine_sax_2.nii.gz"):
            (tmp_path / patient).mkdir(exist_ok=True)
            (tmp_path / patient / name).write_bytes(b"")
    files = sorted(tmp_path.rglob("*.nii.gz"))
    ids = [subject_id(f, tmp_path) for f in files]
    assert sorted(set(ids)) == ["P001", "P002", "P003"]
    train, val = split_subjects(ids, val_fraction=0.34, seed=0)
    assert set(train).isdisjoint(val) and len(val) == 1
    with pytest.warns(UserWarning, match="only 1 subject"):
        split_subjects(["sa"], val_fraction=0.2)


def test_nifti_vector_images_are_refused_not_read_as_frames(tmp_path):
    """A 5th axis declared as components (here a 3-vector per voxel) is not time."""
    image = nib.Nifti1Image(np.ones((6, 5, 4, 1, 3), np.float32), np.eye(4))
    image.header.set_intent("vector")
    nib.save(image, tmp_path / "field.nii.gz")
    with pytest.raises(InputError, match="3 values per voxel"):
        read_stack(tmp_path / "field.nii.gz")
    plain = nib.Nifti1Image(np.ones((6, 5, 4, 1, 3), np.float32), np.eye(4))  # no intent: (x, y, z, 1, t) as written in the wild
    nib.save(plain, tmp_path / "frames.nii.gz")
    assert read_stack(tmp_path / "frames.nii.gz").n_frames == 3


def test_uneven_frame_times_survive_in_nifti_with_a_warning(tmp_path):
    """NIfTI has one time step: other programs see the mean; CaLID keeps the true times in its extension."""
    stack = oblique_stack(frames=4, slices=3)
    uneven = stack.with_data(stack.data, frame_times_ms=np.array([0.0, 200.0, 240.0, 280.0]))
    with pytest.warns(UserWarning, match="not evenly spaced"):
        write_stack(uneven, tmp_path / "uneven.nii.gz")
    np.testing.assert_allclose(read_stack(tmp_path / "uneven.nii.gz").frame_times_ms, [0.0, 200.0, 240.0, 280.0])
    assert nib.load(tmp_path / "uneven.nii.gz").header.get_zooms()[3] == pytest.approx(280.0 / 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_stack(stack, tmp_path / "even.nii.gz")  # evenly spaced: no warning


def test_a_cine_written_as_plain_nrrd_warns_that_slicer_opens_it_as_a_vector_volume(tmp_path):
    """Slicer picks its reader by the name: .seq.nrrd is a sequence, .nrrd a (vector) volume."""
    import warnings

    cine = oblique_stack(frames=3, slices=4)
    with pytest.warns(UserWarning, match=r"vector volume.*\.seq\.nrrd"):
        write_stack(cine, tmp_path / "cine.nrrd")
    np.testing.assert_array_equal(read_stack(tmp_path / "cine.nrrd").data, cine.data)  # calid reads it all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_stack(cine, tmp_path / "cine.seq.nrrd")
        write_stack(cine.select_frames([0]), tmp_path / "volume.nrrd")


def test_64_bit_integer_nifti_is_written_back_and_half_floats_are_refused_by_name(tmp_path):
    values = np.arange(6 * 5 * 3, dtype=np.int64).reshape(6, 5, 3) - 40
    image = nib.Nifti1Image(values, np.diag([1.5, 1.5, 8.0, 1.0]), dtype=np.int64)
    nib.save(image, str(tmp_path / "int64.nii.gz"))
    stack = read_stack(tmp_path / "int64.nii.gz")
    assert stack.metadata["source_dtype"] == "int64"
    for name in ("out.nii.gz", "out.nrrd"):  # the input's own type, as for every other type
        back_path = write_stack(stack, tmp_path / name)
        back = read_stack(back_path)
        assert back.metadata["source_dtype"] == "int64" and back.same_geometry(stack)
        np.testing.assert_array_equal(back.data, stack.data)
    for name in ("half.nii.gz", "half.nrrd", "half.seq.nrrd"):  # neither format has a 16-bit float
        with pytest.raises(OutputError, match=f"{name}.*no 16-bit float type.*float32"):
            write_stack(stack, tmp_path / name, dtype="float16")
        assert not (tmp_path / name).exists()


def test_a_reading_note_describes_the_file_read_not_the_original_input(tmp_path):
    """calid keeps the original input's metadata in its NIfTI files; the note about the input's
    geometry (here: its sform was not used) must not come back when the clean output is read."""
    image = nib.Nifti1Image(np.ones((5, 4, 3), dtype=np.int16), np.diag([1.5, 1.5, 8.0, 1.0]))
    sform = np.diag([1.5, 1.5, 8.0, 1.0])
    sform[:3, 3] = (5.0, 0.0, 0.0)  # another origin: the qform wins, as in ITK
    image.set_sform(sform, code=2)
    image.set_qform(np.diag([1.5, 1.5, 8.0, 1.0]), code=2)
    nib.save(image, str(tmp_path / "two-forms.nii.gz"))
    stack = read_stack(tmp_path / "two-forms.nii.gz")
    assert "sform" in stack.metadata.get("geometry_note", "")
    written = nib.load(str(write_stack(stack, tmp_path / "clean.nii.gz")))
    assert np.allclose(written.get_sform(), written.get_qform())
    back = read_stack(tmp_path / "clean.nii.gz")
    assert "geometry_note" not in back.metadata and back.same_geometry(stack)
    assert back.metadata["source_file"] == "clean.nii.gz"


def test_two_images_at_one_slice_and_trigger_time_are_refused_not_read_as_extra_frames(tmp_path):
    """A magnitude and a phase image (or a re-exported copy) in one series: the same position
    and trigger time, another instance number. Read as extra frames they would interleave."""
    folder = write_stack(oblique_stack(frames=3, slices=3), tmp_path / "dicom")
    originals = sorted(folder.iterdir())
    assert read_stack(folder).n_frames == 3
    highest = max(int(pydicom.dcmread(str(path)).InstanceNumber) for path in originals)
    for offset, path in enumerate(originals, start=1):
        ds = pydicom.dcmread(str(path))
        ds.InstanceNumber = highest + offset
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(str(folder / f"copy_{path.name}"))
    with pytest.raises(InputError, match=r"2 images at slice position .* share trigger time .* ms.*magnitude and phase"):
        read_stack(folder)
    # A cine that writes one trigger time for all its frames is still read, in instance order.
    untimed = write_stack(oblique_stack(frames=3, slices=2, seed=4), tmp_path / "untimed")
    for path in untimed.iterdir():
        ds = pydicom.dcmread(str(path))
        ds.TriggerTime = 0
        ds.save_as(str(path))
    assert read_stack(untimed).n_frames == 3


def test_nrrd_with_voxel_sizes_only_is_read_as_itk_reads_it(tmp_path):
    """teem's unu and older tools write 'spacings' and 'axis mins' instead of 'space directions'."""
    import SimpleITK as sitk

    voxels = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    cases = (
        ("mins.nrrd", {"spacings": [1.2, 1.3, 7.0], "axis mins": [10.0, 20.0, 30.0]}),
        ("bare.nrrd", {"spacings": [1.2, 1.3, 7.0]}),
        ("centred.nrrd", {"spacings": [1.2, 1.3, 7.0], "axis mins": [10.0, 20.0, 30.0], "centerings": ["node", "cell", "node"]}),
    )
    for name, header in cases:
        nrrd.write(str(tmp_path / name), voxels, header)
        stack, itk = read_stack(tmp_path / name), sitk.ReadImage(str(tmp_path / name))
        assert stack.spacing == pytest.approx(itk.GetSpacing()) and stack.origin == pytest.approx(itk.GetOrigin())
        np.testing.assert_allclose(stack.direction.ravel(), itk.GetDirection())
        np.testing.assert_array_equal(stack.data[0], sitk.GetArrayFromImage(itk))
        assert "identity orientation assumed" in stack.metadata["geometry_note"]
    nrrd.write(str(tmp_path / "none.nrrd"), voxels, {})
    with pytest.raises(InputError, match="none.nrrd.*neither 'space directions' nor 'spacings'"):
        read_stack(tmp_path / "none.nrrd")
    nrrd.write(str(tmp_path / "flat.nrrd"), voxels, {"spacings": [1.2, 0.0, 7.0]})
    with pytest.raises(InputError, match="flat.nrrd.*three positive voxel sizes"):
        read_stack(tmp_path / "flat.nrrd")


def test_one_frame_cut_from_a_cine_keeps_its_time_in_every_format(tmp_path):
    import SimpleITK as sitk

    frame = oblique_stack(frames=4, slices=3).select_frames([2])
    assert frame.frame_times_ms is not None
    for name in ("frame.nrrd", "frame.seq.nrrd", "frame.nii.gz", "frame-dicom"):
        back = read_stack(write_stack(frame, tmp_path / name))
        np.testing.assert_allclose(back.frame_times_ms, frame.frame_times_ms, err_msg=name)
        assert back.same_geometry(frame)
    assert sitk.ReadImage(str(tmp_path / "frame.nrrd")).GetSize() == (frame.shape[3], frame.shape[2], frame.shape[1])  # still a plain 3D volume
    untimed = read_stack(write_stack(frame.with_data(frame.data, frame_times_ms=None), tmp_path / "untimed.nrrd"))
    assert untimed.frame_times_ms is None


def test_a_nifti_retimed_by_another_program_is_read_with_its_new_times(tmp_path):
    """calid's header extension keeps uneven frame times; a program that changes the header's timing
    but keeps the extension (nibabel does) must be believed, as every other reader believes it."""
    written = write_stack(oblique_stack(frames=4, slices=3), tmp_path / "cine.nii.gz")
    image = nib.load(str(written))
    assert image.header.extensions, "calid's extension is what this test is about"
    header = image.header.copy()
    header.set_zooms(header.get_zooms()[:3] + (40.0,))
    header["toffset"] = 5.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, header), str(tmp_path / "retimed.nii.gz"))
    np.testing.assert_allclose(read_stack(tmp_path / "retimed.nii.gz").frame_times_ms, [5.0, 45.0, 85.0, 125.0])
    header.set_xyzt_units("mm", "sec")
    header.set_zooms(header.get_zooms()[:3] + (0.05,))
    header["toffset"] = 0.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, header), str(tmp_path / "seconds.nii.gz"))
    np.testing.assert_allclose(read_stack(tmp_path / "seconds.nii.gz").frame_times_ms, [0.0, 50.0, 100.0, 150.0], rtol=1e-6)
    np.testing.assert_allclose(read_stack(written).frame_times_ms, oblique_stack(frames=4).frame_times_ms)  # untouched: its own times


@pytest.mark.parametrize(("interval", "expected_ms"), [(30.0, 30.0), (0.03, 30.0), (1.0, None)])
def test_a_nifti_without_a_time_unit_is_read_in_the_unit_a_cine_can_have(tmp_path, interval, expected_ms):
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "unknown")
    image = nib.Nifti1Image(np.zeros((6, 5, 3, 4), dtype=np.int16), np.diag([1.5, 1.5, 8.0, 1.0]), header)
    image.header.set_zooms((1.5, 1.5, 8.0, interval))
    image.header.set_xyzt_units("mm", "unknown")
    nib.save(image, str(tmp_path / "untimed.nii.gz"))
    stack = read_stack(tmp_path / "untimed.nii.gz")
    if expected_ms is None:  # 1 is the placeholder many programs write: no time is made up
        assert stack.frame_times_ms is None and "time unit" not in stack.metadata.get("geometry_note", "")
    else:
        np.testing.assert_allclose(stack.frame_times_ms, np.arange(4) * expected_ms, rtol=1e-6)
        assert f"frame interval {interval:g} was read in {'ms' if interval > 1 else 's'}" in stack.metadata["geometry_note"]
        back = read_stack(write_stack(stack, tmp_path / "timed.nii.gz"))
        assert nib.load(str(tmp_path / "timed.nii.gz")).header.get_xyzt_units()[1] == "msec"
        np.testing.assert_allclose(back.frame_times_ms, stack.frame_times_ms, rtol=1e-6)


def test_dicom_frames_without_trigger_times_are_ordered_by_temporal_position(tmp_path):
    """Some exports carry Temporal Position Identifier but no Trigger Time, with instance numbers
    that do not follow time: ordered by instance number, the cine came back scrambled."""
    cine = oblique_stack(frames=4, slices=3)
    folder = write_stack(cine, tmp_path / "dicom")
    for path in folder.iterdir():
        ds = pydicom.dcmread(str(path))
        del ds.TriggerTime
        slice_index = int(np.argmin([abs(np.dot(np.asarray(ds.ImagePositionPatient) - cine.origin, cine.direction[:, 2]) - z * 8.5) for z in range(3)]))
        ds.InstanceNumber = slice_index * 4 + (4 - int(ds.TemporalPositionIdentifier))  # time runs backwards in instance numbers
        ds.save_as(str(path))
    back = read_stack(folder)
    assert back.frame_times_ms is None
    np.testing.assert_array_equal(back.data, cine.data)


def test_dicom_rescale_is_applied_in_double_precision_as_other_readers_do(tmp_path):
    cine = oblique_stack(frames=2, slices=3)
    folder = write_stack(cine, tmp_path / "dicom")
    for path in folder.iterdir():
        ds = pydicom.dcmread(str(path))
        ds.RescaleSlope, ds.RescaleIntercept = "1.23456789", "3.3"
        ds.save_as(str(path))
    stack = read_stack(folder)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(path))
        expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32)  # float64, rounded once
        t = int(ds.TemporalPositionIdentifier) - 1
        z = int(np.argmin([abs(np.dot(np.asarray(ds.ImagePositionPatient) - cine.origin, cine.direction[:, 2]) - k * 8.5) for k in range(3)]))
        np.testing.assert_array_equal(stack.data[t, z], expected)


def test_slicer_multivolume_nrrd_frame_labels_are_read_as_frame_times(tmp_path):
    """Slicer's MultiVolume importer saves the list axis first and the trigger times in custom fields."""
    voxels = np.random.default_rng(0).random((4, 6, 5, 3)).astype(np.float32)  # (t, x, y, z) on disk
    header = {
        "kinds": ["list", "domain", "domain", "domain"],
        "space": "left-posterior-superior",
        "space directions": [[np.nan] * 3, [1.5, 0, 0], [0, 1.5, 0], [0, 0, 8.0]],
        "space origin": [0.0, 0.0, 0.0],
        "MultiVolume.FrameLabels": "12,45.5,79,112.5",
        "MultiVolume.FrameIdentifyingDICOMTagName": "TriggerTime",
        "MultiVolume.FrameIdentifyingDICOMTagUnits": "ms",
        "MultiVolume.NumberOfFrames": "4",
    }
    nrrd.write(str(tmp_path / "multivolume.nrrd"), voxels, header)
    stack = read_stack(tmp_path / "multivolume.nrrd")
    assert stack.n_frames == 4
    np.testing.assert_allclose(stack.frame_times_ms, [12.0, 45.5, 79.0, 112.5])
    np.testing.assert_array_equal(stack.data[2], np.transpose(voxels[2], (2, 1, 0)))
    header["MultiVolume.FrameIdentifyingDICOMTagName"] = "EchoTime"  # a multi-echo series: not a cine's times
    nrrd.write(str(tmp_path / "echoes.nrrd"), voxels, header)
    assert read_stack(tmp_path / "echoes.nrrd").frame_times_ms is None


def test_a_nifti_time_step_in_seconds_gives_whole_milliseconds(tmp_path):
    """0.03 s is 0.0299999993 in a float32 header: the frame times are 30 ms apart, not 29.9999993."""
    image = nib.Nifti1Image(np.zeros((6, 5, 3, 4), dtype=np.int16), np.diag([1.5, 1.5, 8.0, 1.0]))
    image.header.set_zooms((1.5, 1.5, 8.0, 0.03))
    image.header.set_xyzt_units("mm", "sec")
    image.header["toffset"] = 0.01
    nib.save(image, str(tmp_path / "seconds.nii.gz"))
    times = read_stack(tmp_path / "seconds.nii.gz").frame_times_ms
    assert times.tolist() == pytest.approx([10.0, 40.0, 70.0, 100.0], abs=1e-9)
    write_stack(read_stack(tmp_path / "seconds.nii.gz"), tmp_path / "cine.seq.nrrd")
    assert nrrd.read_header(str(tmp_path / "cine.seq.nrrd"))["axis 0 index values"].split() == ["10.0", "40.0", "70.0", "100.0"]
