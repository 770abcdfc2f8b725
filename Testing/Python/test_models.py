from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

from calid.data.datasets import TripletDataset, load_subjects
from calid.diffusion.ddim import NoiseSchedule
from calid.errors import InputError
from calid.models import CaLIDNet, ModelConfig, build_vae, load_model, named_config, read_header, save_model
from calid.models.config import DenoiserConfig

from conftest import shared_file


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shapes_through_vae_and_denoiser(name):
    config = named_config(name)
    vae, net = build_vae(config), CaLIDNet(config)
    size, latent = config.image_size, config.latent_size
    images = torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        z_mu, z_sigma = vae.encode(images)
        assert z_mu.shape == (2, config.vae.latent_channels, latent, latent) == z_sigma.shape
        assert vae.decode(z_mu).shape == images.shape
        out = net(z_mu, torch.tensor([0, 999]), torch.cat([images, images], dim=1))
    assert out.shape == z_mu.shape
    assert config.vae.downsampling == 4


def test_paper_config_is_larger_and_configs_round_trip_through_json():
    small, paper = named_config("small"), named_config("paper")
    assert sum(p.numel() for p in CaLIDNet(paper).parameters()) > 5 * sum(p.numel() for p in CaLIDNet(small).parameters())
    for config in (named_config("tiny"), small, paper):
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="crop_size None must be"):  # the engine works in square crops of image_size
        named_config("tiny").replace(preprocess=dataclasses.replace(named_config("tiny").preprocess, crop_size=None))
    with pytest.raises(ValueError, match="tau1 downsamples"):
        named_config("tiny").replace(denoiser=DenoiserConfig(channels=(16, 32), attention_levels=(False, True), norm_num_groups=8, num_head_channels=8, conditioning_channels=(8, 16)))


def test_concat_option_and_condition_dropout_change_the_network():
    base = named_config("tiny")
    config = base.replace(denoiser=DenoiserConfig(**{**base.denoiser.__dict__, "concat_neighbour_latents": True}))
    net = CaLIDNet(config)
    z = torch.randn(2, 3, 8, 8)
    images = torch.randn(2, 2, 32, 32)
    with pytest.raises(ValueError, match="latents"):
        net(z, torch.tensor([1, 2]), images)
    # Zero-initialised outputs would hide any difference: give every parameter a value first.
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(0.05 * torch.randn_like(parameter))
    t, neighbours = torch.tensor([1, 2]), torch.randn(2, 6, 8, 8)
    net.eval()
    with torch.no_grad():
        mixed = net(z, t, images, neighbours, keep_condition=torch.tensor([1.0, 0.0]))
        conditioned = net(z, t, images, neighbours)
        unconditioned = net.unconditioned(z, t)
        other_neighbours = net(z, t, images, torch.randn(2, 6, 8, 8))
    assert mixed.shape == z.shape
    # Dropped condition (images and neighbour latents alike) is exactly the unconditioned network; kept is not.
    torch.testing.assert_close(mixed[1], unconditioned[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], conditioned[0], atol=1e-5, rtol=1e-5)
    assert (conditioned - unconditioned).abs().max() > 1e-3
    assert (other_neighbours - conditioned).abs().max() > 1e-3  # the concatenated latents reach the output


def test_residual_denoiser_starts_as_latent_linear_interpolation(tmp_path):
    import dataclasses

    base = named_config("tiny")
    with pytest.raises(ValueError, match="residual_to_neighbours"):
        base.replace(denoiser=dataclasses.replace(base.denoiser, residual_to_neighbours=True))  # needs sample + concat
    config = base.replace(denoiser=dataclasses.replace(base.denoiser, residual_to_neighbours=True, prediction="sample", concat_neighbour_latents=True))
    torch.manual_seed(4)
    net = CaLIDNet(config)
    z_t, images = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 32, 32)
    z_prev, z_next = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        x0 = net(z_t, torch.tensor([10, 900]), images, torch.cat([z_prev, z_next], 1), keep_condition=torch.tensor([1.0, 0.0]))
    # a fresh network (zero-initialised output) predicts the neighbours' mean; no offset without the condition
    torch.testing.assert_close(x0[0], 0.5 * (z_prev[0] + z_next[0]))
    torch.testing.assert_close(x0[1], torch.zeros_like(x0[1]))
    # the option round-trips through a model file and shows on the card
    from calid.models.card import model_card_text

    path = save_model(tmp_path / "r.safetensors", config, build_vae(config), net, 1.0)
    assert load_model(path).config.denoiser.residual_to_neighbours
    assert "correction to their mean" in model_card_text(path)


def test_save_load_gives_identical_outputs(tmp_path):
    config = named_config("tiny")
    torch.manual_seed(1)
    vae, net = build_vae(config), CaLIDNet(config)
    for p in net.parameters():  # zero-initialised convolutions would hide a loading bug
        torch.nn.init.normal_(p, std=0.05)
    path = save_model(tmp_path / "m.safetensors", config, vae, net, latent_scale=0.77, info={"training_data": "unit test"})
    loaded = load_model(path)
    assert loaded.kind == "calid" and loaded.latent_scale == pytest.approx(0.77)
    assert loaded.info["info"]["training_data"] == "unit test"
    x = torch.randn(2, 1, 32, 32)
    z = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 500])
    with torch.no_grad():
        vae.eval(), net.eval()
        assert torch.equal(vae.decode(vae.encode(x)[0]), loaded.vae.decode(loaded.vae.encode(x)[0]))
        assert torch.equal(net(z, t, torch.cat([x, x], 1)), loaded.net(z, t, torch.cat([x, x], 1)))


class _FloorLiftingAutoencoder(torch.nn.Module):
    """An exact autoencoder except that it returns the -1 floor as -0.95 (what a convolutional decoder does)."""

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return torch.where(z == -1.0, torch.full_like(z, -0.95), z)


def test_floor_snap_is_calibrated_by_least_squares_and_restores_the_floor():
    from calid.models.networks import apply_floor_snap, calibrate_floor_snap

    images = torch.rand(8, 1, 16, 16) * 0.9 + 0.1  # content well above the floor
    images[:, :, :8] = -1.0  # half background, clipped to the floor by preprocessing
    snap = calibrate_floor_snap(_FloorLiftingAutoencoder(), images, batch_size=3)
    assert snap == pytest.approx(0.06)  # the smallest candidate above the 0.05 lift: exact reconstruction
    assert torch.equal(apply_floor_snap(_FloorLiftingAutoencoder().decode(images), snap), images)
    assert torch.equal(apply_floor_snap(images + 0.03, 0.0), images + 0.03)  # 0: off
    # an exact decoder needs no snap
    class Exact(_FloorLiftingAutoencoder):
        def decode(self, z):
            return z

    assert calibrate_floor_snap(Exact(), images) == 0.0


def test_the_engine_applies_the_models_floor_snap(tmp_path):
    import dataclasses

    from calid.inference.pipeline import load_pipeline

    config = named_config("tiny")
    torch.manual_seed(2)
    vae, net = build_vae(config), CaLIDNet(config)
    previous, following = (torch.rand(3, 32, 32).numpy() * 2 - 1 for _ in range(2))
    plain = load_pipeline(save_model(tmp_path / "plain.safetensors", config, vae, net, 1.0), device="cpu").interpolate_slices(previous, following, "calid", 2)
    snapped_config = config.replace(vae=dataclasses.replace(config.vae, floor_snap=0.5))
    path = save_model(tmp_path / "snapped.safetensors", snapped_config, vae, net, 1.0)
    assert load_model(path).config.vae.floor_snap == 0.5
    snapped = load_pipeline(path, device="cpu").interpolate_slices(previous, following, "calid", 2)
    low = plain < -0.5
    assert low.any() and (~low).any()
    assert (snapped[low] == -1.0).all() and (snapped[~low] == plain[~low]).all()


def _rewrite_header(path, change):
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    calid = json.loads(header["__metadata__"]["calid"])
    change(calid)
    header["__metadata__"]["calid"] = json.dumps(calid)
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])


def test_untrustworthy_model_files_are_refused(tmp_path):
    config = named_config("tiny")
    good = save_model(tmp_path / "good.safetensors", config, build_vae(config), CaLIDNet(config))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated.safetensors"):
        load_model(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_model(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(InputError, match="not a CaLID model"):
        load_model(foreign)
    image = tmp_path / "cine.nii.gz"
    image.write_bytes(b"\x1f\x8b" + b"\x00" * 62)
    with pytest.raises(InputError, match="looks like an image: `calid inspect`"):
        load_model(image)
    from calid.segmentation.model import build_segmenter, named_segmentation_config, save_segmenter

    segmenter = save_segmenter(tmp_path / "seg.safetensors", named_segmentation_config("tiny"), build_segmenter(named_segmentation_config("tiny")))
    with pytest.raises(InputError, match="is a segmentation model .*needs a CaLID interpolation model"):
        load_model(segmenter)
    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(good.read_bytes())
    _rewrite_header(newer, lambda h: h.update(format_version=99))
    with pytest.raises(InputError, match="newer calid"):
        load_model(newer)
    mismatched = tmp_path / "mismatched.safetensors"
    mismatched.write_bytes(good.read_bytes())
    _rewrite_header(mismatched, lambda h: h["config"]["vae"].update(channels=[16, 16, 32]))
    with pytest.raises(InputError, match="do not match the configuration"):
        load_model(mismatched)
    broken_config = tmp_path / "config.safetensors"
    broken_config.write_bytes(good.read_bytes())
    _rewrite_header(broken_config, lambda h: h["config"].update(image_size=30))
    with pytest.raises(InputError, match="invalid model configuration"):
        read_header(broken_config)
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "absent.safetensors")


@pytest.fixture(scope="module")
def real_triplets():
    path = shared_file("acdc_cine", "patient001_4d.nii.gz")
    config = named_config("tiny")
    dataset = TripletDataset(load_subjects([path], config.preprocess), flips=False)
    items = [dataset[i] for i in range(0, 40, 5)]
    return tuple(torch.stack([item[key] for item in items]) for key in ("previous", "middle", "next"))


def test_tiny_vae_overfits_real_slices(real_triplets):
    _, middle, _ = real_triplets
    torch.manual_seed(0)
    vae = build_vae(named_config("tiny"))
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        reconstruction, _, _ = vae(middle)
        loss = (reconstruction - middle).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5  # measured: about 11x


def test_tiny_calid_overfits_real_triplets(real_triplets):
    previous, middle, following = real_triplets
    config = named_config("tiny")
    torch.manual_seed(0)
    vae, net = build_vae(config), CaLIDNet(config)
    schedule = NoiseSchedule(config.schedule)
    with torch.no_grad():
        z0 = vae.encode(middle)[0]
        z0 = z0 / z0.std()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(z0.shape, generator=generator)
    t = torch.randint(0, 1000, (z0.shape[0],), generator=generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = (net(schedule.add_noise(z0, noise, t), t, torch.cat([previous, following], 1)) - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20  # measured: about 2400x


def test_a_model_file_without_a_usable_latent_scale_is_refused(tmp_path):
    """The engine divides the latents by it: NaN, 0 or a negative scale would give black or NaN slices silently."""
    config = named_config("tiny")
    vae, net = build_vae(config), CaLIDNet(config)
    good = save_model(tmp_path / "good.safetensors", config, vae, net, latent_scale=0.8)
    assert load_model(good).latent_scale == pytest.approx(0.8)
    for scale in (float("nan"), float("inf"), 0.0, -2.0):
        path = save_model(tmp_path / f"scale-{scale}.safetensors", config, vae, net, latent_scale=scale)
        with pytest.raises(InputError, match="latent scale"):
            load_model(path)


def test_attention_head_size_must_divide_the_attended_channels():
    tiny = named_config("tiny")
    with pytest.raises(ValueError, match="num_head_channels 12"):
        dataclasses.replace(tiny, denoiser=dataclasses.replace(tiny.denoiser, num_head_channels=12))
    for name in ("tiny", "small", "paper"):  # the named configurations build
        config = named_config(name)
        assert all(c % config.denoiser.num_head_channels == 0 for c, a in zip(config.denoiser.channels, config.denoiser.attention_levels) if a)


def test_paper_tau2_attends_at_every_scale_and_older_files_keep_their_layout():
    """The paper: tau2 has self-attention at each resolution scale, the U-Net not at the finest one."""
    def attention_blocks(module: torch.nn.Module) -> int:
        return sum(1 for m in module.modules() if "Attn" in type(m).__name__ or "Transformer" in type(m).__name__)

    paper = CaLIDNet(named_config("paper"))
    assert attention_blocks(paper.controlnet.down_blocks[0]) > 0 and attention_blocks(paper.unet.down_blocks[0]) == 0
    small = named_config("small")
    saved = small.to_dict()
    saved["denoiser"].pop("control_attention_levels")  # a file written before the option existed
    assert ModelConfig.from_dict(saved) == small and small.denoiser.tau2_attention_levels == small.denoiser.attention_levels
    assert named_config("paper-2d+t").denoiser.tau2_attention_levels == (False, True, True)  # (t, y, x) tokens: as the U-Net
