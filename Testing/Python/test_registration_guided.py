"""Registration-guided CaLID: the denoiser sees the neighbours moved to the middle by the registration.

The moved pairs (what the network sees), the training items that carry them (with latent-cache
keys of their own), their table and its cache file, the trainer end to end on a tiny network,
and the engine, which must feed the network exactly the moved neighbours it was trained on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from calid.data.datasets import SubjectVolume, TripletDataset
from calid.inference.registration import RegistrationSettings, midpoints, moved_to_middle
from calid.models import named_config
from calid.training.registered import MovedNeighbourTable
from calid.training.trainer import TrainConfig, Trainer
from test_training import tiny_vae_file

PIXEL_MM = 1.5


def disk(centre_x_mm: float, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] * PIXEL_MM
    inside = (yy - 36) ** 2 + (xx - centre_x_mm) ** 2 <= 10.0**2
    return (ndimage.gaussian_filter(inside.astype(np.float32), 1.0) * 2.0 - 1.0).astype(np.float32)


def centroid_x_mm(image: np.ndarray) -> float:
    return float(ndimage.center_of_mass(np.clip(image + 1.0, 0, None))[1]) * PIXEL_MM


def test_both_neighbours_are_moved_to_the_middle_and_their_mean_is_the_registration_slice():
    first, second = disk(30.0), disk(39.0)
    moved = moved_to_middle(first[None], second[None], PIXEL_MM)
    assert moved.shape == (1, 2) + first.shape and moved.dtype == np.float32
    # Each neighbour on its own now shows the disk half way (the acquired ones are 9 mm apart).
    for image in moved[0]:
        assert abs(centroid_x_mm(image) - 34.5) < 0.6
    assert abs(centroid_x_mm(first) - 34.5) > 4
    # The registration slice is exactly their blend at t = 1/2.
    np.testing.assert_array_equal(midpoints(first[None], second[None], PIXEL_MM)[0], 0.5 * moved[0, 0] + 0.5 * moved[0, 1])
    assert moved_to_middle(first[None][:0], second[None][:0], PIXEL_MM).shape == (0, 2) + first.shape


def volumes(count: int = 2, frames: int = 2, slices: int = 5, size: int = 32) -> list[SubjectVolume]:
    rng = np.random.default_rng(3)
    out = []
    for index in range(count):
        data = np.stack([np.stack([disk(16.0 + 3.0 * z + t + index, size) for z in range(slices)]) for t in range(frames)])
        data = np.clip(data + rng.normal(0, 0.02, data.shape), -1, 1).astype(np.float32)
        out.append(SubjectVolume(subject=f"s{index}", data=data, source=f"s{index}.nii.gz"))
    return out


def test_training_items_carry_the_moved_neighbours_with_keys_of_their_own(tmp_path):
    subjects = volumes()
    plain = TripletDataset(subjects, gaps=(1, 2), transposes=True, swap_neighbours=True, seed=5)
    table = MovedNeighbourTable(subjects, PIXEL_MM, plain.index)
    guided = TripletDataset(subjects, gaps=(1, 2), transposes=True, swap_neighbours=True, seed=5, moved_neighbours=table)
    seen: dict[tuple[int, ...], torch.Tensor] = {}
    for epoch in range(3):
        plain.set_epoch(epoch)
        guided.set_epoch(epoch)
        for item in range(len(guided)):
            a, b = plain[item], guided[item]
            # The middle slice is the acquired one, with the same key as without guidance.
            assert torch.equal(a["middle"], b["middle"]) and torch.equal(a["keys"][1], b["keys"][1])
            v, t, n, gap = guided.index[item]
            pair = table(v, t, n, gap).astype(np.float32)
            for position in (0, 2):
                key = tuple(b["keys"][position].tolist())
                code = key[3]
                assert code & TripletDataset.MOVED and key[2] == n and code >> 5 == gap
                # The key says which neighbour this tensor is (bit 4: the next one) and how it was turned.
                image = torch.from_numpy(pair[1 if code & 16 else 0])
                if code & 1:
                    image = image.flip(-1)
                if code & 2:
                    image = image.flip(-2)
                if code & 4:
                    image = image.transpose(-1, -2)
                tensor = b["previous" if position == 0 else "next"][0]
                assert torch.equal(tensor, image)
                # One key, one tensor: a latent cache can never hand back another image's latent.
                if key in seen:
                    assert torch.equal(seen[key], tensor)
                seen[key] = tensor
                assert not torch.equal(tensor, a["previous" if position == 0 else "next"][0])
    assert {k[3] >> 5 for k in seen} == {1, 2}


def test_the_table_is_kept_on_disk_for_the_same_data_only_and_a_lazy_table_agrees(tmp_path):
    subjects = volumes(count=1)
    entries = TripletDataset(subjects).index
    folder = tmp_path / "cache"
    first = MovedNeighbourTable(subjects, PIXEL_MM, entries, cache_folder=folder)
    assert first.cache_file is not None and first.cache_file.is_file() and first.saved and not first.loaded_from_cache and first.key
    again = MovedNeighbourTable(subjects, PIXEL_MM, entries, cache_folder=folder)
    assert again.loaded_from_cache and again.key == first.key and again.seconds == 0.0
    lazy = MovedNeighbourTable(subjects, PIXEL_MM)
    for entry in entries:
        np.testing.assert_array_equal(again(*entry), first(*entry))
        np.testing.assert_array_equal(lazy(*entry), first(*entry))
        direct = moved_to_middle(subjects[0].data[entry[1], entry[2] - 1][None], subjects[0].data[entry[1], entry[2] + 1][None], PIXEL_MM)[0]
        np.testing.assert_allclose(first(*entry).astype(np.float32), direct, atol=2e-3)  # stored as float16
    # Other data, or another pixel size: a file of its own; the first one stays for its data.
    changed = [dataclasses.replace(subjects[0], data=subjects[0].data[::-1].copy())]
    for other in (MovedNeighbourTable(changed, PIXEL_MM, entries, cache_folder=folder), MovedNeighbourTable(subjects, 2.0, entries, cache_folder=folder)):
        assert not other.loaded_from_cache and other.cache_file != first.cache_file
    assert len(list(folder.glob("moved-neighbours-*.npz"))) == 3
    assert MovedNeighbourTable(subjects, PIXEL_MM, entries, cache_folder=folder).loaded_from_cache
    # A damaged file (cut short, or not an npz at all) costs only the registrations.
    for damage in (first.cache_file.read_bytes()[:1000], b"not an npz file"):
        first.cache_file.write_bytes(damage)
        damaged = MovedNeighbourTable(subjects, PIXEL_MM, entries, cache_folder=folder)
        assert not damaged.loaded_from_cache and damaged.saved
        np.testing.assert_array_equal(damaged(*entries[0]), first(*entries[0]))
    # A folder that cannot be written: a warning, and the table still serves this run.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    with pytest.warns(UserWarning, match="cannot write"):
        unsaved = MovedNeighbourTable(subjects, PIXEL_MM, entries, cache_folder=blocked)
    assert not unsaved.saved
    np.testing.assert_array_equal(unsaved(*entries[0]), first(*entries[0]))


def test_the_option_is_for_2d_models_at_a_known_pixel_size():
    config = named_config("tiny")
    guided = config.replace(denoiser=dataclasses.replace(config.denoiser, registered_neighbours=True))
    assert type(config).from_dict(guided.to_dict()).denoiser.registered_neighbours
    with pytest.raises(ValueError, match="registered_neighbours is for 2D"):
        named_config("tiny-2d+t").replace(denoiser=dataclasses.replace(config.denoiser, registered_neighbours=True))
    with pytest.raises(ValueError, match="target_spacing_mm"):
        guided.replace(preprocess=dataclasses.replace(config.preprocess, target_spacing_mm=None))


def test_a_registration_guided_model_trains_and_the_engine_feeds_it_the_moved_neighbours(tmp_path):
    vae_file = str(tiny_vae_file(tmp_path))
    config = TrainConfig(
        stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "run"), model="tiny", vae_model=vae_file, batch_size=4, steps=4,
        validate_every=2, checkpoint_every=2, warmup_steps=1, val_fraction=0.34, val_steps=1, cache_dir=str(tmp_path / "cache"),
        registered_neighbours=True, concat_neighbour_latents=True, prediction="sample",
    )
    trainer = Trainer(config)
    assert trainer.registration_seconds > 0 and trainer.data_description["moved_neighbours"]["pixel_mm"] == 1.8
    # Validation scores the model on moved neighbours too, as the engine will feed it.
    plain_run = Trainer(dataclasses.replace(config, out_dir=str(tmp_path / "plain"), registered_neighbours=None))
    item, plain_item = trainer.val_set[0], plain_run.val_set[0]
    assert torch.equal(item["middle"], plain_item["middle"]) and not torch.equal(item["previous"], plain_item["previous"])
    np.testing.assert_allclose(item["previous"][0].numpy(), moved_to_middle(plain_item["previous"].numpy(), plain_item["next"].numpy(), 1.8)[0, 0], atol=2e-3)
    # Its latents never mix with a plain run's on the same data.
    assert trainer.latent_cache is not None and plain_run.latent_cache is not None
    assert trainer.latent_cache.folder != plain_run.latent_cache.folder
    trainer.fit()
    assert len(list((tmp_path / "cache").glob("moved-neighbours-*.npz"))) == 1
    # A second run on the same data reads the registered pairs back instead of registering again.
    assert Trainer(dataclasses.replace(config, out_dir=str(tmp_path / "again"))).registration_seconds == 0.0

    from calid.inference.pipeline import load_pipeline

    guided = load_pipeline(tmp_path / "run" / "model.safetensors", device="cpu")
    assert guided.config.denoiser.registered_neighbours
    from calid.models.card import model_card_text

    assert "registration-guided" in model_card_text(tmp_path / "run" / "model.safetensors")
    # The same weights told to take the neighbours as they come.
    plain = load_pipeline(tmp_path / "run" / "model.safetensors", device="cpu")
    assert plain.model is not None
    plain.model.config = plain.config.replace(denoiser=dataclasses.replace(plain.config.denoiser, registered_neighbours=False))
    size = guided.config.image_size
    previous = np.stack([disk(18.0, size), disk(22.0, size)])
    following = np.stack([disk(27.0, size), disk(25.0, size)])
    moved = moved_to_middle(previous, following, 1.8)
    for mode in ("calid", "calid+"):
        expected = plain.interpolate_slices(moved[:, 0], moved[:, 1], mode, steps=2)
        np.testing.assert_allclose(guided.interpolate_slices(previous, following, mode, steps=2), expected, atol=1e-5)
        assert np.abs(plain.interpolate_slices(previous, following, mode, steps=2) - expected).max() > 1e-3
    # The engine registers with the settings the model file records (those of its training).
    assert guided.model is not None
    recorded = guided.model.info["info"]["training_data"]["moved_neighbours"]["registration"]
    assert recorded == RegistrationSettings().to_dict()
    coarse = RegistrationSettings(iterations=3, levels=1)
    guided.model.info["info"]["training_data"]["moved_neighbours"]["registration"] = coarse.to_dict()
    moved_coarse = moved_to_middle(previous, following, 1.8, coarse)
    np.testing.assert_allclose(guided.interpolate_slices(previous, following, "calid", steps=2), plain.interpolate_slices(moved_coarse[:, 0], moved_coarse[:, 1], "calid", steps=2), atol=1e-5)
    guided.model.info["info"]["training_data"]["moved_neighbours"]["registration"] = recorded
    # The baselines keep the acquired neighbours.
    np.testing.assert_array_equal(guided.interpolate_slices(previous, following, "latent-linear"), plain.interpolate_slices(previous, following, "latent-linear"))
    # Whole stacks too: the bisection goes through the same path, acquired slices pass through, geometry kept.
    from conftest import oblique_stack

    stack = oblique_stack(frames=1, slices=3, rows=40, columns=36)
    dense = guided.upsample(stack, factor=4, mode="calid", steps=1)
    np.testing.assert_array_equal(dense.data[:, ::4], stack.data)
    np.testing.assert_allclose(dense.spacing[2] * 4, stack.spacing[2])
    np.testing.assert_allclose(dense.origin, stack.origin)


def test_options_that_do_not_fit_are_refused_before_any_registration(tmp_path):
    from calid.errors import InputError

    vae_file = str(tiny_vae_file(tmp_path))
    common = dict(stage="ldm", data=("phantom:2",), model="tiny", vae_model=vae_file, batch_size=4, steps=2, validate_every=100, checkpoint_every=2, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InputError, match="registered_neighbours is for 2D"):
        Trainer(TrainConfig(out_dir=str(tmp_path / "t"), registered_neighbours=True, temporal=True, **common))
    # A plain run resumed as a registration-guided one: refused at once, nothing registered or cached.
    Trainer(TrainConfig(out_dir=str(tmp_path / "plain"), **common)).fit()
    with pytest.raises(InputError, match="other denoiser options"):
        Trainer(TrainConfig(out_dir=str(tmp_path / "plain"), registered_neighbours=True, **common), resume=True)
    assert not list((tmp_path / "cache").glob("moved-neighbours-*.npz"))
