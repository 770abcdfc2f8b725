from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calid.data.io import write_stack
from calid.data.phantom import PhantomConfig, make_phantom
from calid.errors import InputError
from calid.models import build_vae, load_model, named_config, save_model
from calid.models.checkpoint import read_raw_header
from calid.training.trainer import TrainConfig, Trainer


def tiny_vae_file(tmp_path):
    config = named_config("tiny")
    torch.manual_seed(0)
    return save_model(tmp_path / "vae.safetensors", config, build_vae(config))


def run(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Trainer:
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    trainer.fit()
    return trainer


def weights(path):
    return load_file(str(path))


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_resume_continues_exactly(tmp_path, stage):
    common = dict(data=("phantom:3",), model="tiny", batch_size=4, validate_every=3, checkpoint_every=3, warmup_steps=2, val_fraction=0.34, val_steps=2, perceptual_weight=0.0, adversarial_start=2)
    if stage == "ldm":
        common["vae_model"] = str(tiny_vae_file(tmp_path))
        common["condition_dropout"] = 0.2
    straight = run(TrainConfig(stage=stage, out_dir=str(tmp_path / "straight"), steps=6, cache_dir=str(tmp_path / "cache"), **common))
    run(TrainConfig(stage=stage, out_dir=str(tmp_path / "split"), steps=3, cache_dir=str(tmp_path / "cache"), **common))
    resumed = run(TrainConfig(stage=stage, out_dir=str(tmp_path / "split"), steps=6, cache_dir=str(tmp_path / "cache"), **common), resume=True)
    assert resumed.step == straight.step == 6
    a = weights(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    b = weights(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert set(a) == set(b)
    for key in a:
        if not key.startswith("rng."):
            assert torch.equal(a[key], b[key]), key
    # the exported model is the EMA and loads as a model file, with its decoder floor calibrated
    from calid.models.networks import FLOOR_SNAP_CANDIDATES

    model = load_model(tmp_path / "split" / "model.safetensors")
    assert model.kind == ("vae" if stage == "vae" else "calid")
    assert model.config.vae.floor_snap in FLOOR_SNAP_CANDIDATES
    if stage == "ldm":
        assert model.config.default_steps == 2  # validated at val_steps: the engine's default for this model
    assert (tmp_path / "split" / "validation.csv").read_text().count("\n") >= 2


def test_latent_cache_returns_the_encoders_latents_and_reuses_them(tmp_path):
    from calid.training.trainer import LatentCache

    trainer = Trainer(TrainConfig(stage="ldm", data=("phantom:2",), out_dir=str(tmp_path / "run"), model="tiny", vae_model=str(tiny_vae_file(tmp_path)), batch_size=4, val_fraction=0.0))
    assert trainer.latent_cache is not None
    items = [trainer.train_set[i] for i in range(6)]
    images = torch.cat([torch.stack([it[k] for it in items]) for k in ("previous", "middle", "next")])
    keys = torch.cat([torch.stack([it["keys"][j] for it in items]) for j in range(3)])
    with torch.no_grad():
        direct = trainer.vae.encode(images)[0]
    first = trainer.latent_cache(images, keys)
    torch.testing.assert_close(first, direct, rtol=1e-4, atol=1e-5)
    unique = len({tuple(row) for row in keys.tolist()})
    assert trainer.latent_cache.misses == len(keys) and len(trainer.latent_cache.latents) == unique
    # the same tensors again (in another order): all from memory, identical values
    order = torch.randperm(len(keys))
    again = trainer.latent_cache(images[order], keys[order])
    assert trainer.latent_cache.hits == len(keys) and torch.equal(again, first[order])
    # a cache without memory still answers correctly and keeps nothing
    bounded = LatentCache(lambda x: trainer.vae.encode(x)[0], max_bytes=0)
    torch.testing.assert_close(bounded(images, keys), direct, rtol=1e-4, atol=1e-5)
    assert not bounded.latents and bounded.stored_bytes == 0


def test_latent_cache_persists_across_runs_and_only_for_the_same_vae_and_data(tmp_path):
    """A resumed run reads the latents that earlier runs wrote (each shard once), gets the same
    values the encoder gives, and never reads latents of another VAE or other training data."""
    vae_file = str(tiny_vae_file(tmp_path))
    common = dict(stage="ldm", model="tiny", batch_size=4, validate_every=100, checkpoint_every=100, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    first = run(TrainConfig(data=("phantom:2",), out_dir=str(tmp_path / "a"), steps=3, vae_model=vae_file, **common))
    assert first.latents_loaded == 0
    kept = dict(first.latent_cache.latents)
    assert kept and first.latent_cache.unsaved == 0  # the final checkpoint wrote them all
    shards = list((tmp_path / "cache").glob("latents-*/shard-*.safetensors"))
    assert len(shards) == 1

    second = Trainer(TrainConfig(data=("phantom:2",), out_dir=str(tmp_path / "a"), steps=6, vae_model=vae_file, **common), resume=True)
    assert second.latents_loaded == len(kept) and second.latent_cache.unsaved == 0
    for key, latent in kept.items():
        assert torch.equal(second.latent_cache.latents[key], latent), key
    # and they are the encoder's latents of the tensors the keys name
    items = [second.train_set[i] for i in range(len(second.train_set))]
    for item in items:
        for image, key in zip((item["previous"], item["middle"], item["next"]), item["keys"].tolist()):
            if tuple(key) in kept:
                with torch.no_grad():
                    direct = second.vae.encode(image.unsqueeze(0))[0][0]
                torch.testing.assert_close(kept[tuple(key)], direct, rtol=1e-4, atol=1e-5)
    second.fit()
    assert len(list((tmp_path / "cache").glob("latents-*/shard-*.safetensors"))) <= 2  # only new latents are written

    # another VAE, or other training data: its own folder, nothing read from the first
    torch.manual_seed(1)
    other_vae = str(save_model(tmp_path / "other-vae.safetensors", named_config("tiny"), build_vae(named_config("tiny"))))
    assert Trainer(TrainConfig(data=("phantom:2",), out_dir=str(tmp_path / "b"), steps=3, vae_model=other_vae, **common)).latents_loaded == 0
    assert Trainer(TrainConfig(data=("phantom:3",), out_dir=str(tmp_path / "c"), steps=3, vae_model=vae_file, **common)).latents_loaded == 0
    # a damaged shard costs only its encodings: the second run's shard still loads
    shards[0].write_bytes(b"not a safetensors file")
    added_by_second = len(second.latent_cache.latents) - len(kept)
    assert Trainer(TrainConfig(data=("phantom:2",), out_dir=str(tmp_path / "d"), steps=3, vae_model=vae_file, **common)).latents_loaded == added_by_second


def test_trainer_refuses_resume_without_checkpoint_and_bad_data(tmp_path):
    from calid.errors import InputError

    with pytest.raises(InputError, match="no checkpoint to resume"):
        Trainer(TrainConfig(stage="vae", data=("phantom:2",), out_dir=str(tmp_path), model="tiny", batch_size=2, perceptual_weight=0.0), resume=True)
    with pytest.raises(InputError, match="not found"):
        Trainer(TrainConfig(stage="vae", data=(str(tmp_path / "nothing"),), out_dir=str(tmp_path), model="tiny"))
    with pytest.raises(InputError, match="needs the trained VAE"):
        Trainer(TrainConfig(stage="ldm", data=("phantom:2",), out_dir=str(tmp_path), model="tiny"))
    # A run folder made by a refused call is removed (it would look like a run to resume); one that
    # existed before is left as it was.
    for options in ({"data": (str(tmp_path / "nothing"),)}, {"data": ("phantom:3",), "val_subjects": ("phantom099",)}):
        with pytest.raises(InputError):
            Trainer(TrainConfig(stage="vae", out_dir=str(tmp_path / "new" / "run"), model="tiny", batch_size=2, perceptual_weight=0.0, **options))
        assert not (tmp_path / "new").exists()
    assert tmp_path.is_dir()


def _calid(*args):
    return [sys.executable, "-m", "calid", *args]


def test_time_limit_stops_with_a_checkpoint_that_resumes(tmp_path):
    common = dict(stage="vae", data=("phantom:3",), out_dir=str(tmp_path / "run"), model="tiny", batch_size=2, val_fraction=0.34,
                  perceptual_weight=0.0, adversarial_weight=0.0, validate_every=100, checkpoint_every=100)
    stopped = run(TrainConfig(steps=50, time_limit_minutes=1e-6, **common))  # up after the first step
    assert stopped.time_limit_reached and stopped.step == 1
    checkpoint = tmp_path / "run" / "checkpoints" / "last.safetensors"
    assert checkpoint.is_file() and (tmp_path / "run" / "model.safetensors").is_file()
    # Stopped before its first validation: validated once, so that the next stage finds best.safetensors.
    assert read_raw_header(tmp_path / "run" / "best.safetensors")["info"]["step"] == 1
    resumed = run(TrainConfig(steps=3, **common), resume=True)
    assert resumed.step == 3 and not resumed.time_limit_reached
    with pytest.raises(InputError, match="time-limit"):
        Trainer(TrainConfig(steps=3, time_limit_minutes=0, **common))


def test_training_from_a_packed_data_file(tmp_path):
    """calid pack preprocesses once; calid train reads the .npz like the images it came from."""
    from calid.training.trainer import gather_volumes

    pack = tmp_path / "phantoms.npz"
    done = subprocess.run(_calid("pack", "--data", "phantom:3", "--config", "tiny", "--out", str(pack)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "packed 3 volume(s)" in done.stdout
    again = subprocess.run(_calid("pack", "--data", "phantom:3", "--config", "tiny", "--out", str(pack)), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    from_images = gather_volumes(("phantom:3",), named_config("tiny"), tmp_path / "cache")
    from_pack = gather_volumes((str(pack),), named_config("tiny"), tmp_path / "cache")
    assert [v.subject for v in from_pack] == [v.subject for v in from_images]
    for a, b in zip(from_images, from_pack):
        assert abs(a.data.astype("float32") - b.data.astype("float32")).max() <= 1 / 255 + 1e-3
    with pytest.raises(InputError, match="phantoms.npz.*pack the images again"):
        gather_volumes((str(pack),), named_config("small"), tmp_path / "cache")
    trainer = run(TrainConfig(stage="vae", data=(str(pack),), out_dir=str(tmp_path / "run"), model="tiny", steps=2, batch_size=2, val_fraction=0.34, perceptual_weight=0.0))
    assert trainer.step == 2 and (tmp_path / "run" / "model.safetensors").is_file()
    # a model file's own preprocessing can be packed for fine-tuning it
    for_model = tmp_path / "for-model.npz"
    done = subprocess.run(_calid("pack", "--data", "phantom:2", "--model", str(tiny_vae_file(tmp_path)), "--out", str(for_model)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(gather_volumes((str(for_model),), named_config("tiny"), tmp_path / "cache")) == 2


def test_training_from_a_packed_file_needs_neither_simpleitk_nor_vtk(tmp_path):
    """A training machine (a cluster node, a rented GPU) gets the packed file and the Python
    packages training uses; the registration's SimpleITK and the surfaces' VTK are not among them."""
    pack = tmp_path / "phantoms.npz"
    assert subprocess.run(_calid("pack", "--data", "phantom:3", "--config", "tiny", "--out", str(pack)), capture_output=True, timeout=600).returncode == 0
    without = "import sys; sys.modules['SimpleITK'] = sys.modules['vtk'] = None; from calid.cli import main; sys.exit(main(sys.argv[1:]))"
    arguments = ["train", "vae", "--data", str(pack), "--out", str(tmp_path / "run"), "--config", "tiny", "--steps", "2", "--batch-size", "2", "--val-fraction", "0.34"]
    done = subprocess.run([sys.executable, "-c", without, *arguments], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
    from calid.data.io import write_stack
    from calid.data.phantom import PhantomConfig, make_phantom

    cine = write_stack(make_phantom(1, PhantomConfig(n_frames=1, matrix=32, n_slices=3)).sparse, tmp_path / "cine.nii.gz")
    blocked = subprocess.run([sys.executable, "-c", without, "upsample", str(cine), str(tmp_path / "x2.nii.gz"), "--mode", "registration"],
                             capture_output=True, text=True, timeout=600)
    assert blocked.returncode != 0 and "SimpleITK" in blocked.stderr  # the blocking is real


def test_a_packed_file_refuses_another_placeholder_spacing(tmp_path):
    """Files without geometry are resampled when they are packed: a later --placeholder-spacing
    that disagrees cannot be applied and is refused, naming the file and the packed size."""
    from dataclasses import replace

    from calid.data.datasets import write_packed_volumes
    from calid.data.io import write_stack
    from calid.data.phantom import PhantomConfig, make_phantom
    from calid.training.trainer import gather_volumes

    images = tmp_path / "images"
    phantoms = [make_phantom(50 + i, PhantomConfig(n_frames=2, matrix=48, pixel_spacing_mm=1.5)).sparse for i in range(3)]
    images.mkdir()
    write_stack(phantoms[0], images / "real.nii.gz")
    for i, stack in enumerate(phantoms[1:], 1):
        write_stack(replace(stack, spacing=(1.0, 1.0, 1.0)), images / f"bare{i}.nii.gz")
    config = named_config("tiny")
    volumes = gather_volumes((str(images),), config, tmp_path / "cache", placeholder_spacing="1.5")
    assert sorted(v.assumed_spacing_mm or 0 for v in volumes) == [0, 1.5, 1.5]
    pack = write_packed_volumes(tmp_path / "bare.npz", volumes, config.preprocess)
    assert len(gather_volumes((str(pack),), config, tmp_path / "cache")) == 3  # the default keeps what was packed
    assert len(gather_volumes((str(pack),), config, tmp_path / "cache", placeholder_spacing="1.5")) == 3  # the same size: fine
    for other in ("2", "keep"):
        with pytest.raises(InputError, match=r"bare\.npz.*packed at 1\.5 mm.*pack the images again"):
            gather_volumes((str(pack),), config, tmp_path / "cache", placeholder_spacing=other)
    # packed with their 1 mm kept: a size given later is refused too, also when read back from the cache
    for attempt in range(2):
        kept = gather_volumes((str(images),), config, tmp_path / "cache", placeholder_spacing="keep")
        assert sorted(v.without_geometry for v in kept) == [False, True, True] and all(v.assumed_spacing_mm is None for v in kept)
    kept_pack = write_packed_volumes(tmp_path / "kept.npz", kept, config.preprocess)
    assert len(gather_volumes((str(kept_pack),), config, tmp_path / "cache", placeholder_spacing="keep")) == 3
    with pytest.raises(InputError, match=r"kept\.npz.*packed at 1 \(kept\) mm"):
        gather_volumes((str(kept_pack),), config, tmp_path / "cache", placeholder_spacing="1.5")



def test_sigterm_stops_training_with_a_usable_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = _calid("train", "vae", "--data", "phantom:2", "--out", str(out), "--config", "tiny", "--steps", "100000", "--batch-size", "2", "--perceptual-weight", "0", "--val-fraction", "0.5", "--validate-every", "100000")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "log.csv").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # stopped, not done: a script must not go on to the next stage
    stopped_at = int(re.search(r"stopped at step (\d+) of 100000", stdout).group(1))  # not a misleading "done"
    assert stopped_at >= 1 and "continue with the same command and --resume" in stdout
    assert "stop requested" in stdout + stderr
    from calid.training.trainer import checkpoint_extra_for_stage

    assert checkpoint_extra_for_stage(out / "checkpoints" / "last.safetensors", "vae")["step"] == stopped_at
    fresh = Trainer(TrainConfig(stage="vae", data=("phantom:2",), out_dir=str(tmp_path / "fresh"), model="tiny", batch_size=2, perceptual_weight=0.0, val_fraction=0.5))
    state = load_file(str(out / "checkpoints" / "last.safetensors"))
    assert any(not torch.equal(state[f"model.{name}"], value) for name, value in fresh.trained.state_dict().items() if f"model.{name}" in state)  # trained
    assert load_model(out / "model.safetensors").kind == "vae"
    resumed = subprocess.run(_calid("train", "vae", "--data", "phantom:2", "--out", str(out), "--config", "tiny", "--steps", str(stopped_at + 1), "--batch-size", "2",
                                    "--perceptual-weight", "0", "--val-fraction", "0.5", "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at} -> {stopped_at + 1}" in resumed.stdout and f"done at step {stopped_at + 1}" in resumed.stdout
    # resumed again with nothing left to train: said so, and the exported model keeps its metrics
    metrics_before = load_model(out / "model.safetensors").info["info"]["metrics"]
    again = subprocess.run(_calid("train", "vae", "--data", "phantom:2", "--out", str(out), "--config", "tiny", "--steps", "1", "--batch-size", "2",
                                  "--perceptual-weight", "0", "--val-fraction", "0.5", "--resume"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to train" in again.stdout and "done at step" not in again.stdout
    assert load_model(out / "model.safetensors").info["info"]["metrics"] == metrics_before


def test_a_stop_sent_to_the_whole_process_group_with_loader_workers_still_checkpoints(tmp_path):
    """A batch scheduler (SLURM at its time limit, scancel) signals every process of the job,
    the data-loading workers too: the run must still stop at a step with its checkpoint."""
    out = tmp_path / "run"
    command = _calid("train", "vae", "--data", "phantom:2", "--out", str(out), "--config", "tiny", "--steps", "100000", "--batch-size", "2", "--perceptual-weight", "0",
                     "--val-fraction", "0.5", "--validate-every", "100000", "--checkpoint-every", "100000", "--workers", "1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "log.csv").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = int(re.search(r"stopped at step (\d+) of 100000", stdout).group(1))
    from calid.training.trainer import checkpoint_extra_for_stage

    assert stopped_at >= 25 and checkpoint_extra_for_stage(out / "checkpoints" / "last.safetensors", "vae")["step"] == stopped_at


def test_a_resume_refuses_what_would_spoil_the_run_and_notes_other_changes(tmp_path):
    from calid.data.datasets import split_subjects
    from calid.training.trainer import checkpoint_extra_for_stage

    vae_file = str(tiny_vae_file(tmp_path))
    common = dict(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "run"), model="tiny", batch_size=2, validate_every=100, checkpoint_every=100,
                  val_fraction=0.34, val_steps=1, cache_dir=str(tmp_path / "cache"))
    run(TrainConfig(steps=2, vae_model=vae_file, **common))
    extra = checkpoint_extra_for_stage(tmp_path / "run" / "checkpoints" / "last.safetensors", "ldm")
    assert extra["train_subjects"] and extra["autoencoder_weights"]
    # another autoencoder (a VAE run re-exports its model file as it trains): the denoiser learnt the first one's latents
    torch.manual_seed(5)
    other_vae = save_model(tmp_path / "other-vae.safetensors", named_config("tiny"), build_vae(named_config("tiny")))
    with pytest.raises(InputError, match=r"other-vae\.safetensors.*not the autoencoder this run trained on until step 2"):
        Trainer(TrainConfig(steps=4, vae_model=str(other_vae), **common), resume=True)
    # the same weights in another file (re-exported, another header) are the same autoencoder
    same = save_model(tmp_path / "same-vae.safetensors", named_config("tiny"), load_model(vae_file).vae)
    assert Trainer(TrainConfig(steps=4, vae_model=str(same), **common), resume=True).step == 2
    with pytest.raises(InputError, match="--optimizer.*adamw"):
        Trainer(TrainConfig(steps=4, vae_model=vae_file, optimizer="adam", **common), resume=True)
    # another seed that moves a training subject into validation
    subjects = ["phantom1000", "phantom1001", "phantom1002"]
    _, first_val = split_subjects(subjects, 0.34, 0)
    seed = next(seed for seed in range(1, 50) if split_subjects(subjects, 0.34, seed)[1] != first_val)
    with pytest.raises(InputError, match=r"validation subject\(s\) phantom100\d were training subjects"):
        Trainer(TrainConfig(steps=4, vae_model=vae_file, seed=seed, **{**common, "val_fraction": 0.34}), resume=True)
    # other options: resumed, each change noted
    changed = Trainer(TrainConfig(steps=4, vae_model=vae_file, transposes=True, ema_decay=0.99, **common), resume=True)
    assert any(note.startswith("transposes: False in the checkpoint, True from now on") for note in changed.resume_notes)
    assert any(note.startswith("ema decay: 0.999 in the checkpoint, 0.99") for note in changed.resume_notes)
    quiet = Trainer(TrainConfig(steps=4, vae_model=vae_file, **common), resume=True)
    assert quiet.resume_notes == ["steps: 2 in the checkpoint, 4 from now on"]  # the only change, and a free one
    # another seed that keeps the split is allowed, and said (it changes the augmentation and noise draws)
    same_split = next(seed for seed in range(1, 50) if split_subjects(subjects, 0.34, seed)[1] == first_val)
    reseeded = Trainer(TrainConfig(steps=4, vae_model=vae_file, seed=same_split, **common), resume=True)
    assert f"seed: 0 in the checkpoint, {same_split} from now on" in reseeded.resume_notes


def test_the_model_file_records_every_subject_the_run_ever_trained_on(tmp_path):
    """A resume on fewer subjects must not forget those trained on before: a later resume (or calid
    evaluate --subjects held-out) would take one for a held-out subject."""
    from calid.training.trainer import checkpoint_extra_for_stage

    common = dict(stage="vae", out_dir=str(tmp_path / "run"), model="tiny", batch_size=2, perceptual_weight=0.0, adversarial_weight=0.0,
                  validate_every=100, checkpoint_every=100, val_subjects=("phantom1000",))
    run(TrainConfig(steps=2, data=("phantom:3",), **common))  # trains on phantom1001 and phantom1002
    fewer = run(TrainConfig(steps=3, data=("phantom:2",), **common), resume=True)  # phantom1002 left out
    assert any("1 subject(s) trained on earlier in this run are not in this session's data (phantom1002)" in note for note in fewer.resume_notes)
    assert sorted(checkpoint_extra_for_stage(tmp_path / "run" / "checkpoints" / "last.safetensors", "vae")["train_subjects"]) == ["phantom1001", "phantom1002"]
    assert "phantom1002" in read_raw_header(tmp_path / "run" / "model.safetensors")["info"]["training_data"]["train_subjects"]
    with pytest.raises(InputError, match=r"validation subject\(s\) phantom1002 were training subjects of this run"):
        Trainer(TrainConfig(steps=4, data=("phantom:3",), **{**common, "val_subjects": ("phantom1000", "phantom1002")}), resume=True)


def test_a_resume_after_a_crash_keeps_the_better_best_model_and_logs_each_step_once(tmp_path):
    import csv
    import shutil

    common = dict(stage="vae", data=("phantom:3",), out_dir=str(tmp_path / "run"), model="tiny", batch_size=2, val_fraction=0.34, perceptual_weight=0.0,
                  adversarial_weight=0.0, validate_every=1, checkpoint_every=100, log_every=1, warmup_steps=1)
    run(TrainConfig(steps=2, **common))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.safetensors"
    shutil.copy(checkpoint, tmp_path / "step2.safetensors")
    later = run(TrainConfig(steps=6, **common), resume=True)
    best_file = tmp_path / "run" / "best.safetensors"
    later.export(best_file, {"val_psnr": 99.0, "val_ssim": 0.99, "val_loss": 0.0})  # a best model of step 6 that no replay can beat
    shutil.copy(tmp_path / "step2.safetensors", checkpoint)  # a crash: steps 3 to 6 were logged and scored, never checkpointed
    best_before = read_raw_header(best_file)["info"]["metrics"]["val_psnr"]
    resumed = Trainer(TrainConfig(steps=6, learning_rate=3e-3, **common), resume=True)  # another learning rate: other scores
    assert resumed.step == 2 and resumed.best_psnr == best_before == 99.0
    for log in ("log.csv", "validation.csv"):
        with (tmp_path / "run" / log).open(newline="") as handle:
            assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2]
    resumed.fit()
    assert read_raw_header(best_file)["info"]["metrics"]["val_psnr"] >= best_before  # never replaced by a worse model
    for log in ("log.csv", "validation.csv"):
        with (tmp_path / "run" / log).open(newline="") as handle:
            assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4, 5, 6]
    # another run into the same folder is refused (a forgotten --resume would lose this one); asked for, it
    # replaces the run's files, and stopped before its first validation it validates its own model once
    # and keeps that as its best, not the earlier run's score
    other = dict(common, validate_every=100)
    with pytest.raises(InputError, match=r"run: holds an earlier run \(checkpoints/last\.safetensors, model\.safetensors, best\.safetensors, log\.csv, validation\.csv\).*--resume.*--overwrite"):
        Trainer(TrainConfig(steps=50, **other))
    assert read_raw_header(best_file)["info"]["metrics"]["val_psnr"] >= best_before  # untouched by the refusal
    stopped = run(TrainConfig(steps=50, time_limit_minutes=1e-6, **other), overwrite=True)
    assert stopped.step == 1 and stopped.time_limit_reached
    own = read_raw_header(best_file)["info"]
    assert own["run_id"] == stopped.run_id and own["step"] == 1
    assert Trainer(TrainConfig(steps=50, **other), resume=True).best_psnr == own["metrics"]["val_psnr"] != 99.0


def test_two_process_ddp_on_cpu(tmp_path):
    vae = tiny_vae_file(tmp_path)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun_calid(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "calid", "train", *args, "--device", "cpu"]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    result = torchrun_calid("ldm", "--data", "phantom:3", "--out", str(out), "--vae", str(vae), "--steps", "3", "--batch-size", "2", "--validate-every", "3", "--val-fraction", "0.34")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert load_model(out / "model.safetensors").kind == "calid"
    lines = (out / "log.csv").read_text().strip().splitlines()
    assert lines[-1].startswith("3,")
    # registration-guided: rank 0 registers the training pairs once, the other rank waits for its file (no hang)
    guided = torchrun_calid("ldm", "--data", "phantom:3", "--out", str(tmp_path / "guided"), "--vae", str(vae), "--steps", "2", "--batch-size", "2",
                            "--validate-every", "2", "--val-fraction", "0.34", "--cache-dir", str(tmp_path / "cache"),
                            "--registered-neighbours", "--concat-neighbour-latents", "--prediction", "sample")
    assert guided.returncode == 0, guided.stderr[-3000:]
    assert len(list((tmp_path / "cache").glob("moved-neighbours-*.npz"))) == 1
    registering = [line for line in guided.stdout.splitlines() if line.startswith("registering the training pairs")]
    done, total = registering[-1].split(": ")[-1].split("/")
    assert done == total and len(registering) == len(set(registering))  # reported by rank 0 alone, to the end
    assert load_model(tmp_path / "guided" / "model.safetensors").config.denoiser.registered_neighbours
    # the VAE stage with its PatchGAN discriminator active from the first step
    vae_common = ("vae", "--data", "phantom:3", "--out", str(tmp_path / "ddp_vae"), "--config", "tiny", "--batch-size", "2", "--perceptual-weight", "0", "--val-fraction", "0.34")
    vae_run = torchrun_calid(*vae_common, "--steps", "2", "--adversarial-start", "0", "--validate-every", "2")
    assert vae_run.returncode == 0, vae_run.stderr[-3000:]
    header, *rows = (tmp_path / "ddp_vae" / "log.csv").read_text().strip().splitlines()
    assert rows[-1].split(",")[header.split(",").index("discriminator")] != ""
    # a time limit: both processes stop at the same step (a lone stop would hang the other), and it resumes
    limited = torchrun_calid(*vae_common, "--steps", "50", "--validate-every", "100", "--resume", "--time-limit", "0.0001")
    assert limited.returncode == 0, limited.stderr[-3000:]
    assert "stopped at step 3 of 50 (time limit of 0.0001 min)" in limited.stdout
    # resumed by one process: the batch per step halves (--batch-size is per process), and that is said
    alone = Trainer(TrainConfig(stage="vae", data=("phantom:3",), out_dir=str(tmp_path / "ddp_vae"), model="tiny", batch_size=2, perceptual_weight=0.0,
                                val_fraction=0.34, steps=50), resume=True)
    assert "processes: 2 in the checkpoint, 1 from now on: 2 x 2 = 4 slices per step before, 2 x 1 = 2 from now on (--batch-size is per process)" in alone.resume_notes
    # a new run stopped before its first validation: every process validates once (no hang), and best.safetensors exists
    # (and a folder with a label file: the data's warnings come once, not once per process)
    folder = tmp_path / "own"
    folder.mkdir()
    own = make_phantom(7, PhantomConfig(n_frames=2, matrix=32, n_slices=4))
    write_stack(own.sparse, folder / "subject7.nii.gz")
    write_stack(own.sparse_labels, folder / "subject7_gt.nii.gz", dtype="uint8")
    fresh = torchrun_calid("vae", "--data", "phantom:3", str(folder), "--out", str(tmp_path / "ddp_fresh"), "--config", "tiny", "--batch-size", "2",
                           "--perceptual-weight", "0", "--val-fraction", "0.34", "--steps", "50", "--validate-every", "100", "--time-limit", "0.0001")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stderr.count("label file(s) left out of training") == 1, fresh.stderr[-3000:]
    assert read_raw_header(tmp_path / "ddp_fresh" / "best.safetensors")["info"]["step"] == 1


def _logged_losses_of_rank(rank: int, store_file: str, results: str) -> None:
    import json

    import torch.distributed as dist

    from calid.training.trainer import mean_over_processes

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        # Each process saw another share of the batch, so its own losses differ.
        own = {"loss": 1.0 + rank, "mse": 10.0 * (rank + 1), "lr": 1e-4}
        logged = mean_over_processes(own, 2, torch.device("cpu"))
        Path(results, f"rank{rank}.json").write_text(json.dumps(logged))
    finally:
        dist.destroy_process_group()


def test_logged_losses_are_the_mean_over_processes(tmp_path):
    """log.csv (written by rank 0) holds the losses of the whole batch, not rank 0's share."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_logged_losses_of_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        logged = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert logged == pytest.approx({"loss": 1.5, "mse": 15.0, "lr": 1e-4})
    from calid.training.trainer import mean_over_processes

    alone = {"loss": 0.25}
    assert mean_over_processes(alone, 1, torch.device("cpu")) is alone  # one process: nothing to gather


def test_learning_rate_schedules(tmp_path):
    from calid.training.trainer import learning_rate_factor

    assert learning_rate_factor(0, warmup=10, total=100) == pytest.approx(0.1)
    assert learning_rate_factor(50, warmup=10, total=100) == 1.0  # constant after the warm-up
    assert learning_rate_factor(10, warmup=10, total=100, schedule="cosine") == pytest.approx(1.0)
    assert learning_rate_factor(55, warmup=10, total=100, schedule="cosine") == pytest.approx(0.5)
    assert learning_rate_factor(100, warmup=10, total=100, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    common = dict(stage="vae", data=("phantom:3",), model="tiny", batch_size=4, validate_every=100, checkpoint_every=100, warmup_steps=1, val_fraction=0.34, perceptual_weight=0.0, adversarial_weight=0.0)
    trainer = run(TrainConfig(out_dir=str(tmp_path / "cosine"), steps=4, lr_schedule="cosine", learning_rate=1e-3, **common))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # decayed to 0 at the last step
    with pytest.raises(InputError, match="lr-schedule"):
        Trainer(TrainConfig(out_dir=str(tmp_path / "bad"), steps=4, lr_schedule="step", **common))


def test_resume_with_another_validation_starts_best_afresh(tmp_path):
    """A best PSNR measured with other DDIM steps (or subjects, or preprocessing) is not comparable:
    a resumed run that changes the validation must be able to save its own best model."""
    common = dict(stage="ldm", data=("phantom:3",), model="tiny", batch_size=4, validate_every=3, checkpoint_every=3, warmup_steps=2, val_fraction=0.34, cache_dir=str(tmp_path / "cache"))
    common["vae_model"] = str(tiny_vae_file(tmp_path))
    out = str(tmp_path / "run")
    run(TrainConfig(out_dir=out, steps=3, val_steps=2, **common))
    same = Trainer(TrainConfig(out_dir=out, steps=6, val_steps=2, **common), resume=True)
    assert same.resume_notes == ["steps: 3 in the checkpoint, 6 from now on"] and same.best_psnr > -float("inf")
    other_batch = Trainer(TrainConfig(out_dir=out, steps=6, val_steps=2, **{**common, "batch_size": 2}), resume=True)  # other triplets are scored
    assert "batch size: 4 in the checkpoint, 2 from now on" in other_batch.resume_notes
    assert len(other_batch.resume_notes) == 3 and "not comparable" in other_batch.resume_notes[-1]
    changed = Trainer(TrainConfig(out_dir=out, steps=6, val_steps=1, **common), resume=True)
    assert len(changed.resume_notes) == 2 and "not comparable" in changed.resume_notes[-1] and changed.best_psnr == -float("inf")
    changed.fit()
    best = load_model(tmp_path / "run" / "best.safetensors")
    assert best.info["info"]["step"] == 6 and best.config.default_steps == 1


def test_resume_takes_learning_rate_and_weight_decay_from_the_command_line(tmp_path):
    """Restoring an optimiser restores its saved hyper-parameters too; a researcher who resumes
    with another --lr or --weight-decay must get them (and be told), not the checkpoint's."""
    common = dict(stage="ldm", data=("phantom:3",), model="tiny", batch_size=4, validate_every=3, checkpoint_every=3, warmup_steps=0, val_fraction=0.34, val_steps=1, cache_dir=str(tmp_path / "cache"))
    common["vae_model"] = str(tiny_vae_file(tmp_path))
    out = str(tmp_path / "run")
    run(TrainConfig(out_dir=out, steps=3, learning_rate=1e-4, weight_decay=0.0, lr_schedule="cosine", **common))
    unchanged = Trainer(TrainConfig(out_dir=out, steps=6, learning_rate=1e-4, weight_decay=0.0, lr_schedule="cosine", **common), resume=True)
    assert unchanged.resume_notes == ["steps: 3 in the checkpoint, 6 from now on (the cosine learning-rate decay now ends there)"]
    before = unchanged.optimizer.param_groups[0]["lr"]
    assert 0 < before < 1e-4  # part-way down the cosine

    changed = Trainer(TrainConfig(out_dir=out, steps=6, learning_rate=3e-4, weight_decay=0.05, lr_schedule="cosine", **common), resume=True)
    group = changed.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.05
    assert group["lr"] == pytest.approx(before * 3)  # the same point of the schedule, three times the peak
    assert changed.scheduler.get_last_lr() == [group["lr"]]
    assert any("learning rate 0.0001" in note and "0.0003" in note for note in changed.resume_notes)
    assert any("weight decay 0" in note and "0.05" in note for note in changed.resume_notes)
    changed.fit()
    # the next scheduler steps keep the new peak
    assert changed.step == 6 and changed.scheduler.base_lrs == [3e-4]
    assert changed.optimizer.param_groups[0]["weight_decay"] == 0.05


def test_init_from_fine_tunes_a_trained_model(tmp_path, monkeypatch):
    """--init-from starts a new run from a model file's weights (and its denoiser architecture),
    records where it started, refuses a file that does not fit, and is not used by --resume."""
    vae_file = str(tiny_vae_file(tmp_path))
    common = dict(model="tiny", batch_size=4, validate_every=100, checkpoint_every=100, val_fraction=0.34, val_steps=1, cache_dir=str(tmp_path / "cache"))
    run(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "base"), steps=2, vae_model=vae_file, concat_neighbour_latents=True, prediction="sample", **common))
    base_model = tmp_path / "base" / "model.safetensors"
    trained = load_model(base_model)

    # the new run does not repeat the denoiser options: it keeps the starting model's architecture
    tuned = Trainer(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "tuned"), steps=4, vae_model=vae_file, init_from=str(base_model), **common))
    assert tuned.model_config.denoiser == trained.config.denoiser and tuned.model_config.denoiser.prediction == "sample"
    start = trained.net.state_dict()
    for key, value in tuned.net.state_dict().items():
        assert torch.equal(value, start[key]), key
    for key, value in tuned.ema.module.state_dict().items():  # the EMA starts there too
        assert torch.equal(value, start[key]), key
    tuned.fit()
    exported = load_model(tmp_path / "tuned" / "model.safetensors")
    assert exported.info["info"]["training_data"]["initialised_from"]["file"] == "model.safetensors"
    # the subjects the starting model learnt are recorded, so that an evaluation can tell what the fine-tune has seen
    assert exported.info["info"]["training_data"]["initialised_from"]["train_subjects"] == sorted(trained.info["info"]["training_data"]["train_subjects"])
    assert not all(torch.equal(v, start[k]) for k, v in exported.net.state_dict().items())  # it trained

    # a run that predicts the correction to the neighbours' mean, started from this whole-latent model:
    # it keeps every learnt tensor but the output layer, which starts at zero (so does the EMA), so
    # that it starts from the neighbours' mean, not from the whole latent plus that mean
    residual = Trainer(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "residual"), steps=2, vae_model=vae_file, init_from=str(base_model), residual_to_neighbours=True, **common))
    assert residual.model_config.denoiser.residual_to_neighbours and any("output layer starts at zero" in note for note in residual.resume_notes)
    output_layer = {f"unet.out.2.{name}" for name, _ in residual.net.unet.out[2].named_parameters()}
    assert output_layer == {"unet.out.2.conv.weight", "unet.out.2.conv.bias"} and output_layer <= start.keys()
    for network in (residual.net, residual.ema.module):
        for key, value in network.state_dict().items():
            assert torch.equal(value, torch.zeros_like(value) if key in output_layer else start[key]), key
    latent = trained.config.vae.latent_channels
    size = trained.config.latent_size
    z_t, neighbour_latents = torch.randn(2, latent, size, size), torch.randn(2, 2 * latent, size, size)
    neighbours = torch.randn(2, 2, trained.config.image_size, trained.config.image_size)
    with torch.no_grad():
        output = residual.net(z_t, torch.tensor([10, 900]), neighbours, neighbour_latents)
        whole = trained.net(z_t, torch.tensor([10, 900]), neighbours, neighbour_latents)
    torch.testing.assert_close(output, 0.5 * (neighbour_latents[:, :latent] + neighbour_latents[:, latent:]))
    assert not torch.allclose(whole, output)  # the starting model's own output is another
    # a fine-tune with the starting model's own target keeps its output layer as it is
    assert not any("output layer" in note for note in tuned.resume_notes)
    # validation subjects that the starting model learnt: said, since best.safetensors is chosen on them
    learnt = trained.info["info"]["training_data"]["train_subjects"]
    # (named as the user named it: an installed model's name, not the file it resolves to)
    from calid.models.registry import MODEL_DIR_ENV, install_model

    install_model(base_model, "my-base", folder=tmp_path / "models", half_precision=False)
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path / "models"))
    with pytest.warns(UserWarning, match=rf"--init-from my-base: the starting model was trained on 1 of this run's validation subjects \({learnt[0]}\)"):
        Trainer(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "seen"), steps=2, vae_model=vae_file, init_from="my-base",
                            **{**common, "val_subjects": (learnt[0],)}))
    by_name = Trainer(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "residual-by-name"), steps=2, vae_model=vae_file, init_from="my-base",
                                  residual_to_neighbours=True, **common))
    assert any(note.startswith("--init-from my-base: it predicts the whole latent") for note in by_name.resume_notes), by_name.resume_notes

    # fine-tuning a CaLID file without --vae: its own autoencoder
    # (on other data: the denoiser keeps the latent scale it learnt, not one measured on the new data)
    own = Trainer(TrainConfig(stage="ldm", data=("phantom:4",), out_dir=str(tmp_path / "own"), steps=2, init_from=str(base_model), **common))
    assert all(torch.equal(v, trained.vae.state_dict()[k]) for k, v in own.vae.state_dict().items())
    assert own.latent_scale == trained.latent_scale
    same_vae_file = Trainer(TrainConfig(stage="ldm", data=("phantom:4",), out_dir=str(tmp_path / "same"), steps=2, vae_model=vae_file, init_from=str(base_model), **common))
    assert same_vae_file.latent_scale == trained.latent_scale  # the same autoencoder, given as its own file
    torch.manual_seed(1)
    other_vae = save_model(tmp_path / "other-vae.safetensors", named_config("tiny"), build_vae(named_config("tiny")))
    other = Trainer(TrainConfig(stage="ldm", data=("phantom:4",), out_dir=str(tmp_path / "other"), steps=2, vae_model=str(other_vae), init_from=str(base_model), **common))
    assert other.latent_scale != trained.latent_scale  # another autoencoder: measured afresh

    # the VAE stage starts from a VAE file's autoencoder
    vae_run = Trainer(TrainConfig(stage="vae", data=("phantom:3",), out_dir=str(tmp_path / "vae"), steps=2, init_from=vae_file, perceptual_weight=0.0, **common))
    vae_start = load_model(vae_file).vae.state_dict()
    assert all(torch.equal(v, vae_start[k]) for k, v in vae_run.vae.state_dict().items())

    # files that do not fit: a VAE file for the ldm stage, a model of another size
    with pytest.raises(InputError, match="VAE file"):
        Trainer(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "bad1"), steps=2, vae_model=vae_file, init_from=vae_file, **common))
    small = save_model(tmp_path / "small-vae.safetensors", named_config("small"), build_vae(named_config("small")))
    with pytest.raises(InputError, match="does not fit.*(Missing key|size mismatch)"):
        Trainer(TrainConfig(stage="vae", data=("phantom:3",), out_dir=str(tmp_path / "bad2"), steps=2, init_from=str(small), perceptual_weight=0.0, **common))

    # resuming the fine-tune: the checkpoint's weights, not the starting file's
    resumed = Trainer(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "tuned"), steps=6, vae_model=vae_file, init_from=str(base_model), **common), resume=True)
    assert resumed.step == 4 and any("not used" in note for note in resumed.resume_notes)
    checkpoint = load_file(str(tmp_path / "tuned" / "checkpoints" / "last.safetensors"))
    for key, value in resumed.net.state_dict().items():
        assert torch.equal(value, checkpoint["model." + key]), key
    # resumed without --init-from, the exported model still says where training started
    plain = Trainer(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(tmp_path / "tuned"), steps=6, vae_model=vae_file, **common), resume=True)
    assert plain.data_description["initialised_from"]["file"] == "model.safetensors"


def test_latent_cache_that_cannot_be_written_warns_and_training_goes_on(tmp_path):
    from calid.training.trainer import LatentCache

    (tmp_path / "a-file").write_text("not a folder")
    cache = LatentCache(lambda images: images[:, :1, :2, :2] * 2, max_bytes=2**20, folder=tmp_path / "a-file" / "latents", signature="x")
    latents = cache(torch.ones(3, 1, 4, 4), torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0]]))
    assert latents.shape == (3, 1, 2, 2) and cache.unsaved == 3
    with pytest.warns(UserWarning, match="cannot write"):
        assert cache.save_new() is None
    assert cache.folder is None and cache.save_new() is None  # no second attempt, no second warning
    assert torch.equal(cache(torch.zeros(3, 1, 4, 4), torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0]])), latents)  # still served from memory


def test_resume_without_lr_keeps_the_runs_own_learning_rate(tmp_path):
    out = tmp_path / "run"
    common = ["train", "vae", "--data", "phantom:3", "--config", "tiny", "--out", str(out), "--batch-size", "2", "--val-fraction", "0.34",
              "--perceptual-weight", "0", "--adversarial-weight", "0", "--warmup", "0"]
    first = subprocess.run(_calid(*common, "--steps", "2", "--lr", "3e-4", "--weight-decay", "0.01"), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run(_calid(*common, "--steps", "3", "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "learning rate" not in resumed.stdout and "weight decay" not in resumed.stdout
    from calid.training.state import read_training_extra

    config = read_training_extra(out / "checkpoints" / "last.safetensors")["train_config"]
    assert config["learning_rate"] == 3e-4 and config["weight_decay"] == 0.01
    changed = subprocess.run(_calid(*common, "--steps", "4", "--resume", "--lr", "1e-4"), capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0 and "learning rate 0.0003 in the checkpoint, 0.0001 from now on" in changed.stdout
    # the run folder of another stage: refused at once, with what it is
    wrong_stage = subprocess.run(_calid("train", "ldm", "--data", "phantom:3", "--out", str(out), "--vae", str(out / "model.safetensors"), "--resume"),
                                 capture_output=True, text=True, timeout=600)
    assert wrong_stage.returncode == 2 and "checkpoint of a vae run, not of a ldm run" in wrong_stage.stderr
    with pytest.raises(InputError, match="vae run, not of a ldm run"):
        Trainer(TrainConfig(stage="ldm", data=("phantom:3",), out_dir=str(out), model="tiny", vae_model=str(out / "model.safetensors"), learning_rate=1e-4), resume=True)
    seg_limit = subprocess.run(_calid("train", "seg", "--data", "phantom:3", "--out", str(tmp_path / "seg"), "--time-limit", "5"), capture_output=True, text=True, timeout=600)
    assert seg_limit.returncode == 2 and "--time-limit" in seg_limit.stderr


def test_non_finite_gradients_skip_the_step_and_stop_training_when_they_persist(tmp_path):
    """In bf16 / fp32 (no loss scaler to catch them) one NaN gradient would turn every weight and the
    EMA into NaN for the rest of the run: such a step is skipped, and many in a row stop training."""
    import math

    from calid.errors import TrainingDiverged
    from calid.training.trainer import MAX_NON_FINITE_STEPS

    trainer = Trainer(TrainConfig(stage="vae", data=("phantom:3",), out_dir=str(tmp_path / "run"), model="tiny", batch_size=2, val_fraction=0.34, perceptual_weight=0.0, adversarial_weight=0.0, device="cpu"))
    parameters = list(trainer.trained.parameters())
    before = [p.detach().clone() for p in parameters]

    def step(value: float) -> float:
        loss = sum(p.pow(2).sum() for p in parameters) * value
        return trainer._optimise(loss, trainer.optimizer, trainer.trained.parameters())

    for _ in range(MAX_NON_FINITE_STEPS - 1):
        assert math.isnan(step(float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(before, parameters))  # no step was taken
    assert math.isfinite(step(1.0)) and trainer.non_finite_in_a_row == 0  # a good step counts again
    assert not all(torch.equal(a, b) for a, b in zip(before, parameters))
    for _ in range(MAX_NON_FINITE_STEPS - 1):
        step(float("inf"))
    with pytest.raises(TrainingDiverged, match="non-finite gradients"):
        step(float("nan"))
    assert all(torch.isfinite(p).all() for p in parameters)


def test_a_plain_cuda_device_is_this_processs_gpu(monkeypatch):
    """``--device cuda`` names no GPU: it is the process's own (torchrun's LOCAL_RANK), which
    ``torch.cuda.set_device`` and DDP need as an index. (No GPU here: only the count is faked.)"""
    from calid.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("auto", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda:1")
    with pytest.raises(InputError, match="cuda:0 .. cuda:1"):
        resolve_device("cuda:2")


def test_a_resumed_run_keeps_its_own_steps_and_batch_size(tmp_path):
    """``calid train ... --resume`` without --steps / --batch-size continues the run as it was, not with
    the defaults (a batch of 32 would not even fit these few triplets)."""
    common = ["train", "vae", "--data", "phantom:2", "--out", str(tmp_path / "run"), "--config", "tiny", "--perceptual-weight", "0", "--val-fraction", "0.5"]
    first = subprocess.run(_calid(*common, "--steps", "2", "--batch-size", "2", "--validate-every", "2"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run(_calid(*common, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "step 2 -> 2" in resumed.stdout
    longer = subprocess.run(_calid(*common, "--resume", "--steps", "3", "--validate-every", "3"), capture_output=True, text=True, timeout=300)
    assert longer.returncode == 0, longer.stderr
    assert "step 2 -> 3" in longer.stdout and "done at step 3" in longer.stdout


def test_validation_scores_the_image_not_the_crop_padding(tmp_path):
    """A field of view smaller than the model's crop: the trainer's validation (which picks
    best.safetensors) scores inside the image, as calid evaluate does; the padding would raise it."""
    from calid.data.datasets import image_extent
    import numpy as np

    from calid.data.io import read_stack, write_stack
    from calid.data.phantom import PhantomConfig, make_phantom
    from calid.data.preprocess import preprocess

    folder = tmp_path / "small-fov"
    folder.mkdir()
    for seed in range(3):
        write_stack(make_phantom(seed, PhantomConfig(n_frames=2, matrix=24, pixel_spacing_mm=2.0, n_slices=6)).sparse, folder / f"subject{seed}.nii.gz")
    trainer = Trainer(TrainConfig(stage="vae", data=(str(folder),), out_dir=str(tmp_path / "run"), model="tiny", batch_size=2, perceptual_weight=0.0, val_fraction=0.34))
    (rows, columns), = trainer.val_extents
    cropped, params = preprocess(read_stack(next(folder.glob(f"{trainer.val_set.subjects[0]}.nii.gz"))), named_config("tiny").preprocess)
    (y0, x0), (height, width) = params.crop_start_yx, params.resampled_shape_yx
    # Inside the resampled image's own box (the crop's padding left out), and holding all of its non-padding pixels.
    assert max(0, -y0) <= rows.start and rows.stop <= min(32, height - y0) and max(0, -x0) <= columns.start and columns.stop <= min(32, width - x0)
    assert (rows.stop - rows.start) * (columns.stop - columns.start) < 0.9 * 32 * 32
    assert image_extent(cropped.data) == (rows, columns)
    inside = trainer.validate()
    # The same PSNR computed here on the image part of each scored triplet (the autoencoder's reconstruction).
    order = torch.randperm(len(trainer.val_set), generator=torch.Generator().manual_seed(12345)).tolist()
    autoencoder = trainer.ema.module.eval()
    values = []
    with torch.no_grad():
        for index in order[: trainer.config.max_val_batches * trainer.config.batch_size]:
            middle = trainer.val_set[index]["middle"][None]
            predicted = autoencoder.decode(autoencoder.encode(middle)[0])
            a, b = (((x + 1) / 2).clamp(0, 1)[..., rows, columns] for x in (predicted, middle))
            values.append(10 * np.log10(1.0 / float(((a - b) ** 2).mean())))
    assert inside["val_psnr"] == pytest.approx(float(np.mean(values)), abs=1e-3) and np.isfinite(inside["val_ssim"])
    trainer.val_extents = [(slice(0, 32), slice(0, 32))]
    assert abs(trainer.validate()["val_psnr"] - inside["val_psnr"]) > 0.1  # the padding changes the score
    assert trainer.validation_signature()["scored"] == "inside the image"


def test_an_autoencoder_run_resumes_after_the_denoiser_part_of_its_configuration_changed(tmp_path):
    """The VAE stage never builds the denoiser: a checkpoint whose stored denoiser settings differ
    (written before a configuration gained an option) still resumes; another autoencoder does not."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    common = dict(stage="vae", data=("phantom:2",), model="tiny", batch_size=2, perceptual_weight=0.0, val_fraction=0.5, checkpoint_every=1)
    run(TrainConfig(out_dir=str(tmp_path / "run"), steps=1, **common))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.safetensors"

    def rewrite(change) -> None:
        with safe_open(str(checkpoint), "pt") as handle:
            header = json.loads(handle.metadata()["calid"])
        change(header["extra"]["model_config"])
        save_file(load_file(str(checkpoint)), str(checkpoint), metadata={"calid": json.dumps(header)})

    rewrite(lambda config: config["denoiser"].update(num_res_blocks=3, control_attention_levels=[True, True]))
    resumed = Trainer(TrainConfig(out_dir=str(tmp_path / "run"), steps=2, **common), resume=True)
    assert resumed.step == 1
    rewrite(lambda config: config["vae"].update(latent_channels=4))
    with pytest.raises(InputError, match="another model configuration"):
        Trainer(TrainConfig(out_dir=str(tmp_path / "run"), steps=2, **common), resume=True)


def test_training_inputs_that_cannot_work_are_named_before_any_work(tmp_path):
    common = dict(stage="vae", out_dir=str(tmp_path / "run"), model="tiny", batch_size=2, perceptual_weight=0.0)
    with pytest.raises(InputError, match="phantom:abc.*whole number"):
        Trainer(TrainConfig(data=("phantom:abc",), **common))
    with pytest.raises(InputError, match="--val-fraction.*got 1.0"):
        Trainer(TrainConfig(data=("phantom:3",), val_fraction=1.0, **common))
    with pytest.raises(InputError, match=r"every subject \(2\) is a validation subject"):
        Trainer(TrainConfig(data=("phantom:2",), val_subjects=("phantom1000", "phantom1001"), **common))
    # --resume into a folder without a checkpoint: said at once, and no folder is left behind
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        Trainer(TrainConfig(data=("phantom:abc",), **{**common, "out_dir": str(tmp_path / "new")}), resume=True)  # before the data are even read
    assert not (tmp_path / "new").exists()


def test_resume_alone_continues_the_run_with_its_own_options(tmp_path, capsys):
    """`calid train ... --resume` without the first command's options continues the same run (its
    warm-up, augmentation, split, configuration), not the defaults; an option given changes it."""
    from calid.cli import main
    from calid.training.state import read_training_extra

    out = tmp_path / "run"
    first = ["train", "vae", "--data", "phantom:3", "--out", str(out), "--config", "tiny", "--steps", "2", "--batch-size", "2", "--lr", "3e-4",
             "--perceptual-weight", "0", "--val-fraction", "0.5", "--seed", "3", "--warmup", "1", "--transposes", "--ema", "0.9", "--checkpoint-every", "1"]
    assert main(first) == 0
    capsys.readouterr()
    assert main(["train", "vae", "--data", "phantom:3", "--out", str(out), "--steps", "3", "--validate-every", "7", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "resuming with the run's own" in said and "--warmup 1" in said and "--config tiny" in said and "--transposes," in said
    held_out = read_raw_header(out / "model.safetensors")["info"]["training_data"]["validation_subjects"]
    assert f"held out for validation: {len(held_out)} subject{'s' if len(held_out) > 1 else ''} ({', '.join(held_out)})" in said
    assert [line for line in said.splitlines() if line.startswith("note:")] == ["note: steps: 2 in the checkpoint, 3 from now on"]  # only what was given
    saved = read_training_extra(out / "checkpoints" / "last.safetensors")
    assert saved["step"] == 3
    config = saved["train_config"]
    assert (config["model"], config["batch_size"], config["learning_rate"], config["warmup_steps"], config["transposes"]) == ("tiny", 2, 3e-4, 1, True)
    assert (config["ema_decay"], config["seed"], config["val_fraction"], config["perceptual_weight"], config["checkpoint_every"]) == (0.9, 3, 0.5, 0.0, 1)
    assert config["validate_every"] == 7
    # An abbreviated option is refused (a slip such as --mode for --model must not become another option) ...
    with pytest.raises(SystemExit) as refused:
        main(["train", "vae", "--data", "phantom:3", "--out", str(out), "--steps", "4", "--warm", "5", "--resume"])
    assert refused.value.code == 2 and "unrecognized arguments: --warm 5" in capsys.readouterr().err
    # ... and an option given in full changes the run, and the change is said.
    assert main(["train", "vae", "--data", "phantom:3", "--out", str(out), "--steps", "4", "--warmup", "5", "--no-transposes", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "warmup steps: 1 in the checkpoint, 5 from now on" in said and "transposes: True in the checkpoint, False from now on" in said
    config = read_training_extra(out / "checkpoints" / "last.safetensors")["train_config"]
    assert config["warmup_steps"] == 5 and config["transposes"] is False and config["seed"] == 3


def test_the_training_script_trains_both_stages_resumes_and_keeps_the_vae_once_the_denoiser_started(tmp_path, offline_lpips_weights):
    """docs/training/train_small.sh, the recipe the model cards cite, on a tiny phantom run."""
    if offline_lpips_weights is None:
        pytest.skip("the VAE's validation needs the LPIPS weights (../shared/weights) and this machine has no copy")
    script = Path(__file__).resolve().parents[2] / "docs" / "training" / "train_small.sh"
    out = tmp_path / "run"
    cines = tmp_path / "cines"  # a researcher's own folder of cines: trained on, and scored on the subject it held out
    cines.mkdir()
    for seed in range(3):
        write_stack(make_phantom(1000 + seed, PhantomConfig(n_frames=4, matrix=48, pixel_spacing_mm=3.5)).sparse, cines / f"case{seed}_4d.nii.gz")
    env = {
        **os.environ, "DATA": str(cines), "OUT": str(out), "CONFIG": "tiny", "CALID": f"{sys.executable} -m calid",
        "VAE_MINUTES": "5", "LDM_MINUTES": "5", "VAE_ARGS": "--steps 2 --batch-size 2 --validate-every 2",
        "LDM_ARGS": "--steps 2 --batch-size 2 --validate-every 2", "EVAL_DATA": str(cines),
    }
    env.pop("VAL_SUBJECTS", None)
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "log.csv").write_text("step,loss\n25,0.5\n")  # a run killed before its first checkpoint: started again
    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "holds the logs of a run with no checkpoint to resume: starting it again" in first.stdout
    model = load_model(out / "ldm" / "best.safetensors")
    assert model.net is not None
    held_out = model.info["info"]["training_data"]["validation_subjects"]
    assert json.loads((out / "evaluation" / "results.json").read_text())["subjects"] == held_out and len(held_out) == 1
    vae_before = (out / "vae" / "best.safetensors").read_bytes()
    again = subprocess.run(["bash", str(script)], env={**env, "VAE_ARGS": "--steps 4", "LDM_ARGS": "--steps 3", "EVAL_DATA": ""},
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the VAE is not trained further" in again.stdout and (out / "vae" / "best.safetensors").read_bytes() == vae_before
    assert "resuming with the run's own" in again.stdout + again.stderr
    assert load_model(out / "ldm" / "model.safetensors").info["info"]["step"] == 3


def test_calid_train_refuses_what_would_lose_a_run_or_mislead_before_any_work(tmp_path, capsys):
    from calid.cli import main

    run_dir = tmp_path / "run"
    base = ["train", "vae", "--data", "phantom:2", "--config", "tiny", "--batch-size", "2", "--perceptual-weight", "0", "--val-fraction", "0.5"]
    assert main([*base, "--out", str(run_dir), "--steps", "2"]) == 0
    model_bytes = (run_dir / "model.safetensors").read_bytes()
    capsys.readouterr()
    # a forgotten --resume: refused, the run untouched
    assert main([*base, "--out", str(run_dir), "--steps", "3"]) == 2
    error = capsys.readouterr().err
    assert "run: holds an earlier run" in error and "--resume" in error and "--overwrite" in error
    assert (run_dir / "model.safetensors").read_bytes() == model_bytes
    # --overwrite with a mistake found while setting up (here: data not found) costs the earlier run nothing
    assert main([*base, "--out", str(run_dir), "--steps", "3", "--overwrite", "--data", str(tmp_path / "typo")]) == 2
    assert "training data not found" in capsys.readouterr().err and (run_dir / "model.safetensors").read_bytes() == model_bytes
    # nor may it delete a file the new run reads
    assert main(["train", "ldm", "--data", "phantom:2", "--out", str(run_dir), "--vae", str(run_dir / "model.safetensors"), "--overwrite"]) == 2
    assert "is a file of the earlier run" in capsys.readouterr().err and (run_dir / "model.safetensors").read_bytes() == model_bytes
    assert main([*base, "--out", str(run_dir), "--steps", "3", "--overwrite"]) == 0
    assert "done at step 3" in capsys.readouterr().out
    assert main([*base, "--out", str(run_dir), "--steps", "4", "--overwrite", "--resume"]) == 2
    assert "--overwrite: starts a new run in --out, and --resume continues the run there: give one of them" in capsys.readouterr().err
    # a run killed before its first checkpoint: nothing to resume, and the refusal does not send one to --resume
    (run_dir / "checkpoints" / "last.safetensors").rename(tmp_path / "kept.safetensors")
    assert main([*base, "--out", str(run_dir), "--steps", "3"]) == 2
    assert "it has no checkpoint to resume (it stopped before its first one): give --overwrite" in capsys.readouterr().err
    (tmp_path / "kept.safetensors").rename(run_dir / "checkpoints" / "last.safetensors")
    with (run_dir / "log.csv").open() as log:
        assert [line.split(",")[0] for line in log][1:] == ["3"]  # one run's rows, not two runs' mixed
    # numbers the optimiser would fail on, or misuse, are refused by name, before a folder is made
    for option, value, words in (("--lr", "-1", "--lr: must be a positive learning rate, got -1"),
                                 ("--ema", "1.5", "--ema: must be a decay from 0"),
                                 ("--weight-decay", "-0.1", "--weight-decay: must be zero or positive")):
        assert main([*base, "--out", str(tmp_path / "bad"), "--steps", "2", option, value]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    assert main([*base, "--out", str(tmp_path / "bad"), "--steps", "2", "--gaps", "9"]) == 2  # the phantom has 10 slices
    assert "--gaps 9: a gap of g slices needs stacks of 2g + 1 slices; the most here is 10" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main([*base, "--out", str(tmp_path / "bad"), "--steps", "-5"])
    assert refused.value.code == 2 and "--steps" in capsys.readouterr().err
    # the ldm stage takes its size from the autoencoder: another --config is refused, not ignored
    assert main(["train", "ldm", "--data", "phantom:2", "--out", str(tmp_path / "ldm"), "--vae", str(run_dir / "model.safetensors"), "--config", "small"]) == 2
    assert "the ldm stage takes its size from the autoencoder it trains on" in capsys.readouterr().err
    # a VAE file's card describes an autoencoder, not a denoiser it does not have
    assert main(["info", str(run_dir / "model.safetensors")]) == 0
    card = capsys.readouterr().out
    assert "autoencoder" in card and not any(word in card for word in ("denoiser", "sampling", "latent scale"))
    # training data in DICOM: a pointer to the conversion, not only "no NIfTI or NRRD image files"
    write_stack(make_phantom(1, PhantomConfig(n_frames=2, matrix=32, n_slices=4)).sparse, tmp_path / "dicom")
    assert main([*base, "--out", str(tmp_path / "bad"), "--data", str(tmp_path / "dicom")]) == 2
    assert "dicom: contains no NIfTI or NRRD image files; it holds DICOM files: convert each cine first (calid convert" in capsys.readouterr().err
    # the checkpoint is not a model: the run's model files are named
    assert main(["info", str(run_dir / "checkpoints" / "last.safetensors")]) == 2
    error = capsys.readouterr().err
    assert "is a training checkpoint" in error and str(run_dir / "best.safetensors") in error


def test_subject_names_from_files_in_different_folders_are_said_and_a_file_given_twice_is_read_once(tmp_path):
    from calid.training.trainer import gather_volumes

    config = named_config("tiny")
    phantom = make_phantom(3, PhantomConfig(n_frames=2, matrix=48, pixel_spacing_mm=3.0, n_slices=4)).sparse
    for subject in ("P1", "P2"):
        (tmp_path / "nested" / subject).mkdir(parents=True)
        write_stack(phantom, tmp_path / "nested" / subject / "sax.nii.gz")
    with pytest.warns(UserWarning, match=r"1 subject name\(s\) come from files in different folders.*'sax' in .*P1 and .*P2.*give the folder above them as --data"):
        merged = gather_volumes((str(tmp_path / "nested" / "P1"), str(tmp_path / "nested" / "P2")), config, tmp_path / "cache")
    assert {v.subject for v in merged} == {"sax"}
    import warnings

    # a subject's file may be a link to a file kept elsewhere: still its folder's subject
    (tmp_path / "nested" / "P3").mkdir()
    write_stack(phantom, tmp_path / "elsewhere.nii.gz")
    (tmp_path / "nested" / "P3" / "sax.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one subfolder per subject: P1, P2 and P3, nothing to say
        assert {v.subject for v in gather_volumes((str(tmp_path / "nested"),), config, tmp_path / "cache")} == {"P1", "P2", "P3"}
    # a cine folder named by file and a label folder named by subfolder share subject names on purpose: no warning
    (tmp_path / "cines").mkdir()
    write_stack(phantom, tmp_path / "cines" / "P1_4d.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {v.subject for v in gather_volumes((str(tmp_path / "cines"), str(tmp_path / "nested")), config, tmp_path / "cache")} == {"P1", "P2", "P3"}
    with pytest.warns(UserWarning, match=r"1 file\(s\) given more than once in --data, read once"):
        twice = gather_volumes((str(tmp_path / "cines"), str(tmp_path / "cines" / "P1_4d.nii.gz")), config, tmp_path / "cache")
    assert len(twice) == 1
    with pytest.warns(UserWarning, match=r"1 --data entr\(y/ies\) given more than once, read once"):
        assert len(gather_volumes((str(tmp_path / "cines"), str(tmp_path / "cines")), config, tmp_path / "cache")) == 1


def test_the_denoiser_records_the_subjects_its_autoencoder_learnt_and_warns_when_it_validates_on_them(tmp_path):
    from calid.models.checkpoint import subjects_learnt

    vae_run = run(TrainConfig(stage="vae", data=("phantom:3",), out_dir=str(tmp_path / "vae"), model="tiny", batch_size=2, perceptual_weight=0.0,
                              adversarial_weight=0.0, steps=1, val_subjects=("phantom1000",)))
    assert vae_run.data_description["train_subjects"] == ["phantom1001", "phantom1002"]
    common = dict(stage="ldm", data=("phantom:3",), vae_model=str(tmp_path / "vae" / "model.safetensors"), batch_size=2, steps=1, val_steps=1)
    with pytest.warns(UserWarning, match=r"the autoencoder was trained on 1 of this run's validation subjects \(phantom1001\).*the same --val-subjects"):
        denoiser = run(TrainConfig(out_dir=str(tmp_path / "ldm"), val_subjects=("phantom1001",), **common))
    header = read_raw_header(tmp_path / "ldm" / "model.safetensors")
    assert header["info"]["training_data"]["autoencoder"] == {"file": "model.safetensors", "train_subjects": ["phantom1001", "phantom1002"]}
    assert denoiser.data_description["train_subjects"] == ["phantom1000", "phantom1002"]
    assert subjects_learnt(header) == {"phantom1000", "phantom1001", "phantom1002"}  # the denoiser's and its autoencoder's
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # validated on the subject the VAE held out: nothing to say
        run(TrainConfig(out_dir=str(tmp_path / "ldm-held-out"), val_subjects=("phantom1000",), **common))
