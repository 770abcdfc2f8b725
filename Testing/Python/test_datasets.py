from __future__ import annotations

import numpy as np
import pytest
import torch

from calid.data.datasets import (
    ClipDataset,
    TripletDataset,
    find_image_files,
    load_subjects,
    split_subjects,
    subject_id,
    volumes_from_stacks,
)
from calid.data.io import write_stack
from calid.data.preprocess import PreprocessConfig
from calid.errors import InputError
from calid.models.config import named_config

from conftest import SHARED_DATA, oblique_stack, shared_file

SMALL = PreprocessConfig(target_spacing_mm=None, crop_size=(16, 16))


def test_subject_ids_join_files_of_one_subject():
    assert subject_id("a/patient001_4d.nii.gz") == "patient001"
    assert subject_id("patient001_frame01.nii.gz") == "patient001"
    assert subject_id("SCD0000101_4d.nii.gz") == "SCD0000101"
    assert subject_id("case7.seq.nrrd") == "case7"


def test_split_is_deterministic_disjoint_and_complete():
    ids = [f"s{i:03d}" for i in range(40)] * 2
    train, val = split_subjects(ids, val_fraction=0.2, seed=1)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(set(ids))
    assert len(val) == 8
    assert split_subjects(ids, val_fraction=0.2, seed=1) == (train, val)
    assert split_subjects(ids, val_fraction=0.2, seed=2) != (train, val)
    fixed_train, fixed_val = split_subjects(ids, val_subjects=["s001", "s002"])
    assert fixed_val == ["s001", "s002"] and "s001" not in fixed_train
    with pytest.raises(InputError, match="s999"):
        split_subjects(ids, val_subjects=["s999"])


def test_triplets_are_true_neighbours_with_consistent_flips():
    stack = oblique_stack(frames=2, slices=5, rows=16, columns=16)
    volumes = volumes_from_stacks([stack], SMALL)
    plain = TripletDataset(volumes, gaps=(1, 2), flips=False)
    assert len(plain) == 2 * 3 + 2 * 1  # gap 1: slices 1..3, gap 2: slice 2, for 2 frames
    item = plain[0]
    data = volumes[0].data
    t, n, g = item["frame"], item["slice"], item["gap"]
    for key, k in (("previous", n - g), ("middle", n), ("next", n + g)):
        assert item[key].shape == (1, 16, 16) and item[key].dtype == torch.float32
        np.testing.assert_array_equal(item[key][0].numpy(), data[t, k].astype(np.float32))
    flipped = TripletDataset(volumes, gaps=(1,), flips=True, seed=3)
    seen_flip = False
    for epoch in range(20):
        flipped.set_epoch(epoch)
        got = flipped[0]
        again = flipped[0]
        assert all(torch.equal(got[k], again[k]) for k in ("previous", "middle", "next"))  # reproducible
        reference = plain[0]
        for dims in ([-1], [-2], [-1, -2], []):
            candidate = [reference[k].flip(dims) if dims else reference[k] for k in ("previous", "middle", "next")]
            if all(torch.equal(got[k], c) for k, c in zip(("previous", "middle", "next"), candidate)):
                seen_flip |= bool(dims)
                break
        else:
            pytest.fail("the three slices were not flipped together")
    assert seen_flip


def test_keys_say_exactly_which_slice_and_flips_each_tensor_shows():
    stack = oblique_stack(frames=3, slices=6, rows=16, columns=16)
    volumes = volumes_from_stacks([stack, stack], SMALL)
    dataset = TripletDataset(volumes, gaps=(1, 2), flips=True, swap_neighbours=True, seed=5, transposes=True)
    seen_codes, seen_swap = set(), False
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for item in range(len(dataset)):
            got = dataset[item]
            assert got["keys"].shape == (3, 4) and got["keys"].dtype == torch.long
            for name, (v, t, k, code) in zip(("previous", "middle", "next"), got["keys"].tolist()):
                dims = [d for bit, d in ((1, -1), (2, -2)) if code & bit]
                expected = torch.from_numpy(volumes[v].data[t, k].astype(np.float32))[None]
                expected = expected.flip(dims) if dims else expected
                assert torch.equal(got[name], expected.transpose(-1, -2) if code & 4 else expected), (item, name)
                seen_codes.add(code)
            seen_swap |= got["keys"][0, 2] > got["keys"][2, 2]
    assert seen_codes == set(range(8)) and seen_swap  # all 8 rotations / reflections
    with pytest.raises(InputError, match="square"):
        TripletDataset(volumes_from_stacks([oblique_stack(rows=16, columns=12)], PreprocessConfig(target_spacing_mm=None, crop_size=(16, 12))), transposes=True)


def test_clip_dataset_wraps_around_the_cycle():
    stack = oblique_stack(frames=3, slices=3, rows=16, columns=16)
    volumes = volumes_from_stacks([stack], SMALL)
    clips = ClipDataset(volumes, clip_length=5, flips=False)
    item = clips[2]  # start frame 2
    assert item["middle"].shape == (1, 5, 16, 16)
    expected_frames = [2, 0, 1, 2, 0]
    for i, f in enumerate(expected_frames):
        np.testing.assert_array_equal(item["middle"][0, i].numpy(), volumes[0].data[f, 1].astype(np.float32))


def test_cache_is_used_instead_of_rereading(tmp_path):
    path = write_stack(oblique_stack(frames=2, slices=4, rows=16, columns=16), tmp_path / "subj01_4d.nii.gz")
    cache = tmp_path / "cache"
    first = load_subjects([path], SMALL, cache_dir=cache)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and first[0].subject == "subj01"
    np.save(files[0], np.zeros_like(first[0].data))  # tamper: a second load must come from here
    second = load_subjects([path], SMALL, cache_dir=cache)
    assert not second[0].data.any()
    other = load_subjects([path], PreprocessConfig(target_spacing_mm=None, crop_size=(8, 8)), cache_dir=cache)
    assert other[0].data.shape[-2:] == (8, 8)  # another config is another cache entry


def test_a_label_map_among_the_training_images_is_refused_and_label_files_in_a_folder_are_named(tmp_path):
    """A segmentation given as training data would teach the network label maps, silently."""
    from calid.training.trainer import gather_volumes

    image = oblique_stack(frames=2, slices=4, rows=16, columns=16)
    labels = image.with_data(np.digitize(image.data, np.quantile(image.data, [0.4, 0.6, 0.8])).astype(np.float32))
    wrong = write_stack(labels, tmp_path / "subj02_4d.nii.gz", dtype="uint8")  # a label map under an image's name
    with pytest.raises(InputError, match=r"subj02_4d\.nii\.gz: holds only the values 0-3: it is a label map"):
        load_subjects([wrong], SMALL)
    folder = tmp_path / "data"
    folder.mkdir()
    write_stack(image, folder / "subj01_4d.nii.gz")
    write_stack(labels, folder / "subj01_4d_gt.nii.gz", dtype="uint8")
    with pytest.warns(UserWarning, match=r"1 label file\(s\) left out of training by their names \(subj01_4d_gt\.nii\.gz\)"):
        volumes = gather_volumes((str(folder),), named_config("tiny"), tmp_path / "cache")
    assert [v.subject for v in volumes] == ["subj01"]


def test_real_data_split_never_shares_a_subject(tmp_path):
    shared_file("acdc_cine", "patient001_4d.nii.gz")
    files = find_image_files(SHARED_DATA / "acdc_cine") + find_image_files(SHARED_DATA / "acdc_edes_labels")
    assert not any("_gt" in f.name for f in files)
    subjects = [subject_id(f) for f in files]
    train, val = split_subjects(subjects, val_fraction=0.15, seed=0)
    assert set(train).isdisjoint(val) and len(val) >= 5
    val_files = [f for f in files if subject_id(f) in val][:2]
    train_files = [f for f in files if subject_id(f) in train][:2]
    config = PreprocessConfig(target_spacing_mm=1.8, crop_size=(64, 64))
    val_set = TripletDataset(load_subjects(val_files, config, cache_dir=tmp_path), flips=False)
    train_set = TripletDataset(load_subjects(train_files, config, cache_dir=tmp_path))
    assert set(val_set.subjects).isdisjoint(train_set.subjects)
    assert len(train_set) > 0 and len(val_set) > 0
    sample = train_set[len(train_set) // 2]
    assert sample["middle"].abs().max() <= 1.0 and sample["middle"].std() > 0.05


def test_files_without_geometry_are_read_at_the_pixel_size_of_the_others(tmp_path):
    """A cine saved with NIfTI's default 1 x 1 x 1 mm would be resampled to the wrong scale;
    training takes its pixels at the median size of the files that have a geometry."""
    from dataclasses import replace

    from calid.data.datasets import typical_pixel_spacing
    from calid.models import named_config
    from calid.training.trainer import gather_volumes

    real = replace(oblique_stack(frames=2, slices=4, rows=40, columns=36, seed=4), spacing=(1.5, 1.5, 10.0))
    folder = tmp_path / "cines"
    folder.mkdir()
    write_stack(real, folder / "a_4d.nii.gz")
    write_stack(replace(real, spacing=(1.7, 1.7, 10.0)), folder / "b_4d.nii.gz")
    write_stack(replace(real, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3)), folder / "c_4d.nii.gz")
    files = find_image_files(folder)
    assert typical_pixel_spacing(files) == pytest.approx(1.6)
    config = PreprocessConfig(target_spacing_mm=1.6, crop_size=(32, 32))
    kept, = load_subjects([folder / "c_4d.nii.gz"], config)
    assumed, = load_subjects([folder / "c_4d.nii.gz"], config, placeholder_spacing_mm=1.5, cache_dir=tmp_path / "cache")
    reference, = load_subjects([folder / "a_4d.nii.gz"], config)
    assert kept.assumed_spacing_mm is None and assumed.assumed_spacing_mm == 1.5
    np.testing.assert_allclose(assumed.data, reference.data, atol=2e-3)  # same pixels, same scale as the real file
    assert np.abs(kept.data.astype(np.float32) - reference.data).max() > 0.5  # read as 1 mm: shrunk
    again, = load_subjects([folder / "c_4d.nii.gz"], config, placeholder_spacing_mm=1.5, cache_dir=tmp_path / "cache")  # from the cache
    assert again.assumed_spacing_mm == 1.5 and np.array_equal(again.data, assumed.data)

    model = named_config("tiny").replace(image_size=32, preprocess=config)
    by_median = {v.subject: v.assumed_spacing_mm for v in gather_volumes((str(folder),), model, tmp_path / "c2")}
    assert by_median == {"a": None, "b": None, "c": pytest.approx(1.6)}
    assert all(v.assumed_spacing_mm is None for v in gather_volumes((str(folder),), model, tmp_path / "c3", "keep"))
    assert {v.subject: v.assumed_spacing_mm for v in gather_volumes((str(folder),), model, tmp_path / "c5", "1.5")}["c"] == 1.5
    with pytest.raises(InputError, match="placeholder-spacing.*median, keep or a pixel size"):
        gather_volumes((str(folder),), model, tmp_path / "c4", "big")
    with pytest.raises(InputError, match="placeholder-spacing.*not plausible"):
        gather_volumes((str(folder),), model, tmp_path / "c4", "50")
    assert replace(real, spacing=(1.0, 1.0, 1.0)).has_placeholder_spacing and not real.has_placeholder_spacing


def test_packed_volumes_round_trip_to_within_half_a_grey_level(tmp_path):
    from calid.data.datasets import read_packed_volumes, write_packed_volumes

    stacks = []
    for index in range(2):
        stack = oblique_stack(frames=4, slices=3, rows=20, columns=20, seed=index)
        stack.metadata["subject"] = f"case{index}"
        stacks.append(stack)
    volumes = volumes_from_stacks(stacks, SMALL)
    volumes[1].assumed_spacing_mm = 1.43
    packed = write_packed_volumes(tmp_path / "data.npz", volumes, SMALL)
    back = read_packed_volumes(packed, SMALL)
    assert [v.subject for v in back] == ["case0", "case1"]
    assert [v.assumed_spacing_mm for v in back] == [None, 1.43]
    for original, restored in zip(volumes, back):
        assert restored.data.shape == original.data.shape
        original32, restored32 = original.data.astype(np.float32), restored.data.astype(np.float32)
        # half a step of 2/255, plus float16 rounding of values near 1
        assert np.abs(restored32 - original32).max() <= 1 / 255 + 1e-3
        assert (restored32[original32 == -1.0] == -1.0).all() and (restored32[original32 == 1.0] == 1.0).all()  # the clipped floor stays exact
    before = packed.read_bytes()
    read_packed_volumes(packed)
    assert packed.read_bytes() == before


def test_packed_volumes_refuse_other_preprocessing_and_other_files(tmp_path):
    from calid.data.datasets import read_packed_volumes, write_packed_volumes

    stack = oblique_stack(frames=2, slices=3, rows=20, columns=20)
    packed = write_packed_volumes(tmp_path / "data.npz", volumes_from_stacks([stack], SMALL), SMALL)
    with pytest.raises(InputError, match=r"data\.npz.*pack the images again"):
        read_packed_volumes(packed, PreprocessConfig(target_spacing_mm=1.8, crop_size=(16, 16)))
    np.savez(tmp_path / "other.npz", values=np.zeros(3))
    with pytest.raises(InputError, match="other.npz.*not a CaLID packed data file"):
        read_packed_volumes(tmp_path / "other.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    with pytest.raises(InputError, match="array.npz.*one array"):
        read_packed_volumes(tmp_path / "array.npz")
    (tmp_path / "cut.npz").write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.npz.*cannot read"):
        read_packed_volumes(tmp_path / "cut.npz")
    with pytest.raises(InputError, match="must end in .npz"):
        write_packed_volumes(tmp_path / "data.zip", volumes_from_stacks([stack], SMALL), SMALL)
    assert not (tmp_path / "data.zip").exists()
