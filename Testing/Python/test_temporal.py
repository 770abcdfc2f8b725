"""2D+T models: 3D (t, y, x) networks, clip training, whole-cine engine and the temporal evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calid.cli import main
from calid.data.datasets import ClipDataset, load_subjects
from calid.data.phantom import PhantomConfig, make_phantom
from calid.errors import InputError
from calid.evaluation.harness import EvaluationConfig, evaluate
from calid.evaluation.temporal import frame_to_frame_change, xt_cuts
from calid.inference.pipeline import load_pipeline
from calid.models import CaLIDNet, build_vae, load_model, named_config, save_model
from calid.models.config import ModelConfig
from calid.training.trainer import TrainConfig, Trainer

from conftest import shared_file


@pytest.mark.parametrize("name,time_downsampling", [("tiny-2d+t", False), ("tiny-2d+t", True), ("small-2d+t", False), ("small-2d+t", True)])
def test_2dt_shapes_through_vae_and_denoiser(name, time_downsampling):
    config = named_config(name).replace(time_downsampling=time_downsampling)
    assert config.temporal and config.spatial_dims == 3
    assert config.latent_clip_length == (config.clip_length // 4 if time_downsampling else config.clip_length)
    torch.manual_seed(0)
    vae, net = build_vae(config), CaLIDNet(config)
    clip = torch.randn(1, 1, config.clip_length, config.image_size, config.image_size)
    with torch.no_grad():
        z = vae.encode(clip)[0]
        assert z.shape == (1, 3, config.latent_clip_length, config.latent_size, config.latent_size)
        assert vae.decode(z).shape == clip.shape
        out = net(z, torch.tensor([10]), torch.cat([clip, clip], dim=1))
    assert out.shape == z.shape
    # The denoiser is 3D over (t, y, x); the autoencoder is 3D only when it downsamples time.
    assert any(isinstance(m, torch.nn.Conv3d) for m in net.unet.modules())
    assert any(isinstance(m, torch.nn.Conv3d) for m in vae.modules()) == time_downsampling
    if not time_downsampling:
        # Frame by frame: each latent frame depends on its own image frame only.
        changed = clip.clone()
        changed[:, :, 3] += 1.0
        with torch.no_grad():
            difference = (vae.encode(changed)[0] - vae.encode(clip)[0]).abs().amax(dim=(0, 1, 3, 4))
        assert difference[3] > 0 and torch.all(difference[[0, 1, 2, 4]] == 0)


def test_2dt_config_checks_the_clip_length_and_round_trips():
    with pytest.raises(ValueError, match="clip_length"):
        named_config("tiny-2d+t").replace(clip_length=12, time_downsampling=True)
    with pytest.raises(ValueError, match="clip_length"):
        named_config("tiny-2d+t").replace(clip_length=7)
    config = named_config("small-2d+t")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert named_config("small").temporal is False


@pytest.fixture(scope="module")
def real_clips():
    path = shared_file("acdc_cine", "patient001_4d.nii.gz")
    config = named_config("tiny-2d+t")
    dataset = ClipDataset(load_subjects([path], config.preprocess), clip_length=config.clip_length, flips=False, start_stride=8)
    items = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 4))][:4]
    return tuple(torch.stack([item[key] for item in items]) for key in ("previous", "middle", "next"))


def test_tiny_2dt_vae_and_denoiser_overfit_real_clips(real_clips):
    previous, middle, following = real_clips
    assert middle.shape[1:] == (1, 8, 32, 32)
    torch.manual_seed(0)
    config = named_config("tiny-2d+t")
    vae, net = build_vae(config), CaLIDNet(config)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):
        loss = (vae(middle)[0] - middle).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3
    with torch.no_grad():
        z0 = vae.encode(middle)[0]
        z0 = z0 / z0.std()
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 300, 600, 900])[: z0.shape[0]]
    from calid.diffusion.ddim import NoiseSchedule

    noisy = NoiseSchedule(config.schedule).add_noise(z0, noise, t)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):
        loss = (net(noisy, t, torch.cat([previous, following], 1)) - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5


@pytest.mark.parametrize("time_downsampling", [False, True])
def test_2dt_trainer_both_stages_and_model_file_round_trip(tmp_path, time_downsampling):
    common = dict(data=("phantom:2",), batch_size=2, validate_every=2, checkpoint_every=2, warmup_steps=1, val_fraction=0.5, val_steps=1, perceptual_weight=0.0, adversarial_start=1, cache_dir=str(tmp_path / "cache"))
    Trainer(TrainConfig(stage="vae", out_dir=str(tmp_path / "vae"), model="tiny-2d+t", downsample_time=time_downsampling, steps=2, **common)).fit()
    Trainer(TrainConfig(stage="ldm", out_dir=str(tmp_path / "ldm"), vae_model=str(tmp_path / "vae" / "model.safetensors"), steps=2, **common)).fit()
    model = load_model(tmp_path / "ldm" / "model.safetensors")
    assert model.config.temporal and model.config.clip_length == 8 and model.kind == "calid"
    assert model.config.time_downsampling == time_downsampling
    # saving and loading again gives the same network outputs
    again = load_model(save_model(tmp_path / "copy.safetensors", model.config, model.vae, model.net, model.latent_scale))
    z = torch.randn(1, 3, model.config.latent_clip_length, 8, 8)
    condition = torch.randn(1, 2, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.net(z, torch.tensor([7]), condition), again.net(z, torch.tensor([7]), condition))
    validation = (tmp_path / "ldm" / "validation.csv").read_text().splitlines()
    assert len(validation) >= 2 and "val_psnr" in validation[0]


def test_2dt_denoiser_over_a_trained_2d_autoencoder(tmp_path):
    """``calid train ldm --temporal`` on a 2D VAE: the 2D autoencoder serves the 2D+T model frame by frame."""
    config = named_config("tiny")
    torch.manual_seed(0)
    vae_2d = build_vae(config)
    vae_file = save_model(tmp_path / "vae2d.safetensors", config, vae_2d)
    common = dict(data=("phantom:2",), batch_size=2, validate_every=2, checkpoint_every=2, warmup_steps=1, val_fraction=0.5, val_steps=1, cache_dir=str(tmp_path / "cache"))
    Trainer(TrainConfig(stage="ldm", out_dir=str(tmp_path / "ldm"), vae_model=str(vae_file), temporal=True, steps=2, **common)).fit()
    model = load_model(tmp_path / "ldm" / "model.safetensors")
    assert model.config.temporal and not model.config.time_downsampling and model.config.clip_length == 8
    frame = torch.randn(1, 1, 32, 32)
    with torch.no_grad():  # the shipped 2D weights, unchanged, on every frame
        torch.testing.assert_close(model.vae.encode(frame[:, :, None].repeat(1, 1, 8, 1, 1))[0][:, :, 5], vae_2d.encode(frame)[0])


@pytest.mark.parametrize("concat", [False, True])
def test_inflated_2d_denoiser_equals_the_2d_one_on_still_clips(concat):
    """A 2D+T denoiser started from 2D weights computes, on a clip of one repeated frame, what the
    2D denoiser computes on that frame; on a moving clip it differs (it sees time)."""
    from calid.models.networks import inflate_to_temporal

    config_2d = named_config("tiny")
    config_2d = config_2d.replace(denoiser=config_2d.denoiser.__class__(**{**config_2d.denoiser.__dict__, "concat_neighbour_latents": concat}))
    config_3d = config_2d.replace(temporal=True, time_downsampling=False, clip_length=8)
    torch.manual_seed(0)
    net_2d, net_3d = CaLIDNet(config_2d).eval(), CaLIDNet(config_3d).eval()
    with torch.no_grad():  # MONAI zero-initialises the output and ControlNet convolutions: give every weight a value
        for parameter in net_2d.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    net_3d.load_state_dict(inflate_to_temporal(net_2d.state_dict(), net_3d))
    kernels = [(k, v) for k, v in net_3d.state_dict().items() if v.dim() == 5 and v.shape[2] == 3]
    assert kernels and all(torch.count_nonzero(v[:, :, [0, 2]]) == 0 for _, v in kernels)

    c, size = config_2d.vae.latent_channels, config_2d.latent_size
    z = torch.randn(2, c, size, size)
    neighbours = torch.randn(2, 2, config_2d.image_size, config_2d.image_size)
    latents = torch.randn(2, 2 * c, size, size) if concat else None
    steps = torch.tensor([10, 500])
    still = lambda x: x[:, :, None].repeat(1, 1, 8, 1, 1) if x is not None else None  # noqa: E731
    with torch.no_grad():
        expected = net_2d(z, steps, neighbours, latents)
        out = net_3d(still(z), steps, still(neighbours), still(latents))
    assert expected.abs().mean() > 1e-2  # not a network that outputs zeros
    for t in range(8):
        torch.testing.assert_close(out[:, :, t], expected, rtol=1e-4, atol=1e-4)
    moving = still(z).clone()
    moving[:, :, 4] += 1.0
    with torch.no_grad():
        assert not torch.allclose(net_3d(moving, steps, still(neighbours), still(latents))[:, :, 3], expected, atol=1e-3)


def test_trainer_starts_a_2dt_denoiser_from_a_2d_model(tmp_path):
    """``calid train ldm --temporal --init-from 2D_MODEL``: the 2D model's weights, inflated over time."""
    config = named_config("tiny")
    torch.manual_seed(0)
    vae_file = save_model(tmp_path / "vae2d.safetensors", config, build_vae(config))
    common = dict(data=("phantom:2",), batch_size=2, validate_every=100, checkpoint_every=100, warmup_steps=1, val_fraction=0.5, val_steps=1, cache_dir=str(tmp_path / "cache"))
    Trainer(TrainConfig(stage="ldm", out_dir=str(tmp_path / "2d"), vae_model=str(vae_file), steps=1, **common)).fit()
    model_2d = load_model(tmp_path / "2d" / "model.safetensors")
    trainer = Trainer(TrainConfig(stage="ldm", out_dir=str(tmp_path / "2dt"), init_from=str(tmp_path / "2d" / "model.safetensors"), temporal=True, steps=1, **common))
    assert trainer.model_config.temporal
    state_2d = model_2d.net.state_dict()
    for key, value in trainer.net.state_dict().items():
        source = state_2d[key.replace("controlnet_cond_embedding.frames.", "controlnet_cond_embedding.")]
        assert torch.equal(value[:, :, value.shape[2] // 2] if value.dim() == 5 else value, source), key
    trainer.fit()
    assert load_model(tmp_path / "2dt" / "model.safetensors").config.temporal


def test_2dt_engine_on_4d_input_keeps_geometry_and_acquired_slices():
    pipeline = load_pipeline("untrained:tiny-2d+t", "cpu")
    for n_frames in (5, 11):  # shorter than a clip (cyclic padding) and longer (overlapping clips)
        phantom = make_phantom(4, PhantomConfig(n_frames=n_frames, matrix=48, pixel_spacing_mm=3.5, n_slices=6))
        sparse = phantom.sparse
        dense = pipeline.upsample(sparse, 4, "calid", steps=2, batch_size=4)
        assert dense.shape == (n_frames, 21, 48, 48)
        np.testing.assert_array_equal(dense.data[:, ::4], sparse.data)
        np.testing.assert_allclose(dense.origin, sparse.origin)
        np.testing.assert_allclose(dense.direction, sparse.direction)
        assert dense.slice_spacing == pytest.approx(sparse.slice_spacing / 4)
        np.testing.assert_allclose(dense.frame_times_ms, sparse.frame_times_ms)
        assert dense.metadata["upsampling"]["temporal"] is True
    # Frames select what is returned; the clips still see the whole cycle, so the frames are identical.
    some = pipeline.upsample(sparse, 4, "calid", steps=2, frames="2,7", batch_size=4)
    np.testing.assert_allclose(some.data, dense.data[[2, 7]], rtol=1e-5, atol=1e-4)
    # An input that is itself a selection known only by its record (a Slicer node upsampled again):
    # the output names the cine's frames, as the 2D engine does, not positions in the input.
    selection = load_pipeline("linear").upsample(sparse, 2, frames="3,5,7,9")
    record_only = selection.with_data(selection.data)
    record_only.metadata = {"upsampling": selection.metadata["upsampling"]}
    again = pipeline.upsample(record_only, 2, "calid", steps=1, frames="1,2", batch_size=4)
    assert again.recorded_frames() == [5, 7] and again.metadata["source_frames"] == [5, 7]
    assert "source_frame_count" not in again.metadata  # unknown from that record: left out, not taken as 4
    # Test-time augmentation turns the clips in their plane, frame by frame.
    averaged = pipeline.upsample(sparse, 2, "calid", steps=1, batch_size=4, tta=True)
    assert averaged.metadata["upsampling"]["tta"] is True
    np.testing.assert_array_equal(averaged.data[:, ::2], sparse.data)
    assert np.abs(averaged.data - pipeline.upsample(sparse, 2, "calid", steps=1, batch_size=4).data).max() > 1e-3
    # The result does not depend on the batch size.
    np.testing.assert_allclose(pipeline.upsample(sparse, 2, "calid+", steps=1, batch_size=1).data, pipeline.upsample(sparse, 2, "calid+", steps=1, batch_size=8).data, rtol=1e-4, atol=1e-3)
    with pytest.raises(InputError, match="2D model"):
        load_pipeline("untrained:tiny", "cpu").upsample(sparse, 2, temporal=True)


def test_temporal_metrics_against_known_clips():
    still = np.ones((6, 4, 5))
    assert frame_to_frame_change(still) == 0.0
    flicker = np.stack([np.full((4, 5), t % 2, dtype=float) for t in range(6)])
    assert frame_to_frame_change(flicker) == pytest.approx(1.0)  # every step changes by 1, cyclically too
    ramp = np.stack([np.full((2, 2), t / 4.0) for t in range(4)])  # 0, .25, .5, .75 then back to 0
    assert frame_to_frame_change(ramp) == pytest.approx((0.25 * 3 + 0.75) / 4)
    x_t, y_t = xt_cuts(np.arange(6 * 4 * 5).reshape(6, 4, 5))
    assert x_t.shape == (6, 5) and y_t.shape == (6, 4) and x_t[1, 0] == 20 + 2 * 5


def test_evaluate_compares_2d_and_2dt_models(tmp_path):
    out = tmp_path / "temporal"
    results = evaluate(
        EvaluationConfig(data=("phantom:1",), out_dir=str(out), model="untrained:tiny", temporal_model="untrained:tiny-2d+t", tasks=(1,), methods=("linear", "calid"), steps=1, batch_size=16),
        command="test",
    )
    summary = results["temporal"]["summary"]
    assert set(summary) == {"2D frame by frame", "2D+T"}
    for values in summary.values():
        assert values["psnr"]["n"] == 1 and values["change_error"]["mean"] >= 0
    assert (out / "temporal_xt.png").stat().st_size > 0 and "temporal_xt.png" in results["figures"]
    assert "## 2D+T" in (out / "report.md").read_text()
    with pytest.raises(InputError, match="not a 2D\\+T model"):
        evaluate(EvaluationConfig(data=("phantom:1",), out_dir=str(tmp_path / "x"), model="untrained:tiny", temporal_model="untrained:tiny", tasks=(1,)))


def test_evaluate_temporal_comparison_adds_the_tta_pair_when_tta_methods_are_asked_for(tmp_path):
    config = dict(data=("phantom:1",), model="untrained:tiny", temporal_model="untrained:tiny-2d+t", tasks=(1,), steps=1, batch_size=16)
    results = evaluate(EvaluationConfig(out_dir=str(tmp_path / "tta"), methods=("calid", "calid-tta"), **config), command="test")
    task = results["temporal"]
    assert set(task["summary"]) == {"2D frame by frame", "2D+T", "2D frame by frame, tta", "2D+T, tta"}
    assert task["models"]["2D+T, tta"]["tta"] is True and task["models"]["2D+T"]["tta"] is False
    rows = {row["method"]: row for row in task["per_subject"]}
    # Averaging over the turns changes the generated slices, so it changes their scores.
    assert rows["2D+T, tta"]["psnr"] != rows["2D+T"]["psnr"]
    assert rows["2D frame by frame, tta"]["psnr"] != rows["2D frame by frame"]["psnr"]
    assert "| 2D+T, tta |" in (tmp_path / "tta" / "report.md").read_text()
    # scored where the models generate: the tiny models' 32-pixel crop, not the phantom's whole field of view
    # (the engine fills the rest by linear interpolation, which would dilute every difference)
    assert 0.0 < task["scored_fraction"] < 0.5
    assert f"scored inside the part of the field of view the models generate ({100 * task['scored_fraction']:.0f} %" in (tmp_path / "tta" / "report.md").read_text()


def test_cli_upsample_temporal_refuses_a_2d_model(tmp_path, small_phantom):
    from calid.data.io import write_stack

    source = write_stack(small_phantom.sparse, tmp_path / "cine.nii.gz")
    assert main(["upsample", str(source), str(tmp_path / "out.nii.gz"), "--model", "untrained:tiny", "--temporal", "--quiet"]) == 2
    assert not (tmp_path / "out.nii.gz").exists()


def test_overlapping_clips_share_each_frames_noise():
    """A frame gets the same starting noise in every clip that holds it (time-keeping latents)."""
    from calid.inference.pipeline import UpsamplingPipeline

    first = UpsamplingPipeline._noise((7, (3, 4, 5, 6), 2), torch.Size((3, 4, 8, 8)))
    second = UpsamplingPipeline._noise((7, (5, 6, 7, 8), 2), torch.Size((3, 4, 8, 8)))
    torch.testing.assert_close(first[:, 2:], second[:, :2])
    assert not torch.equal(first[:, 0], first[:, 1])
    assert not torch.equal(first, UpsamplingPipeline._noise((7, (3, 4, 5, 6), 4), torch.Size((3, 4, 8, 8))))  # another slice
    with pytest.raises(ValueError, match="frames"):
        UpsamplingPipeline._noise((7, (1, 2), 2), torch.Size((3, 4, 8, 8)))


@pytest.mark.parametrize("time_step", [1, 4])
def test_clips_overlapping_by_half_get_the_same_noise_keys_where_they_overlap(time_step):
    """Also when the autoencoder downsamples time (one latent frame per 4 frames): clips of 16
    frames starting every 8 frames of a 20-frame cine (cyclic) key their shared latent frames alike."""
    from calid.inference.pipeline import clip_noise_keys

    length, n_frames = 16, 20
    clips = [(start + np.arange(length)) % n_frames for start in range(0, n_frames, length // 2)]
    keys = clip_noise_keys(clips, time_step)
    assert all(len(k) == length // time_step for k in keys)
    half = length // 2 // time_step
    for before, after in zip(keys, keys[1:]):
        assert before[half:] == after[:half]  # the second half of a clip is the first half of the next
    assert keys[0][0] == 0 and keys[1][0] == 8 and len(set(keys[0])) == len(keys[0])


def test_every_interior_slice_is_predicted_from_its_two_neighbours(small_phantom):
    """The temporal comparison predicts slice n from slices n - 1 and n + 1 of the whole cine, by
    upsampling the even and the odd slices as cines of their own (each normalised over half the cine)."""
    from calid.evaluation.harness import every_other_slice_predicted
    from calid.inference.pipeline import load_pipeline

    stack = small_phantom.sparse
    predicted = every_other_slice_predicted(load_pipeline("linear"), stack, "linear", None, 0, 16)
    assert sorted(predicted) == list(range(1, stack.n_slices - 1))
    for n, middle in predicted.items():
        np.testing.assert_allclose(middle, 0.5 * (stack.data[:, n - 1] + stack.data[:, n + 1]), rtol=1e-5, atol=1e-4)
    generated = every_other_slice_predicted(load_pipeline("untrained:tiny-2d+t"), stack, "calid", 1, 0, 16)
    assert sorted(generated) == sorted(predicted) and all(v.shape == stack.data[:, 0].shape for v in generated.values())
