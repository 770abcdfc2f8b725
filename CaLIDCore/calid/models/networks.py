"""The networks of CaLID, built from MONAI.

* :func:`build_vae`: ``AutoencoderKL`` with a KL posterior, f = 4, convolutions only.
* :class:`CaLIDNet`: the interpolation denoiser, owning

  - tau1: MONAI ControlNet's conditioning embedding (a light conv encoder of
    the two neighbour slices ``[s(n-1), s(n+1)]`` ending in a zero-conv, at
    latent resolution);
  - tau2: the ControlNet encoder (time-embedded ResBlocks with self-attention)
    whose zero-conv outputs are added to the U-Net skips and middle block;
  - eps_theta: MONAI ``DiffusionModelUNet`` on the noisy latent of s(n).

  The three are one module and are trained jointly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet
from monai.networks.nets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from calid.models.config import ModelConfig


def _fold_time(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B * T, C, H, W)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])


def _unfold_time(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B * T, C, H, W) -> (B, C, T, H, W)."""
    return x.reshape(-1, frames, *x.shape[1:]).transpose(1, 2)


class FrameWiseAutoencoder(nn.Module):
    """A 2D ``AutoencoderKL`` applied to every frame of (B, 1, T, H, W) clips: latents (B, C, T, h, w)
    keep every frame. Same interface as ``AutoencoderKL`` (encode, decode, forward)."""

    def __init__(self, frames: AutoencoderKL) -> None:
        super().__init__()
        self.frames = frames

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.frames.encode(_fold_time(x))
        return _unfold_time(z_mu, x.shape[2]), _unfold_time(z_sigma, x.shape[2])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return _unfold_time(self.frames.decode(_fold_time(z)), z.shape[2])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.encode(x)
        z = z_mu + torch.randn_like(z_sigma) * z_sigma
        return self.decode(z), z_mu, z_sigma


class FrameWiseConditioning(nn.Module):
    """tau1 of a time-keeping 2D+T model: the 2D conditioning encoder on every frame of the neighbours."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.frames = embedding

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return _unfold_time(self.frames(_fold_time(condition)), condition.shape[2])


def apply_floor_snap(images: torch.Tensor, floor_snap: float) -> torch.Tensor:
    """Decoded images in [-1, 1] with values within ``floor_snap`` of the floor set to the floor (-1)."""
    if floor_snap <= 0:
        return images
    return torch.where(images < -1.0 + floor_snap, torch.full_like(images, -1.0), images)


#: Candidate thresholds of :func:`calibrate_floor_snap` (in the [-1, 1] intensity scale).
FLOOR_SNAP_CANDIDATES = tuple(round(0.01 * i, 2) for i in range(51))


@torch.no_grad()
def calibrate_floor_snap(autoencoder: Any, images: torch.Tensor, batch_size: int = 32) -> float:
    """The ``floor_snap`` that minimises the squared error of the autoencoder's reconstructions.

    ``images`` are preprocessed training images in [-1, 1] (never validation ones). The
    least-squares choice, not a quality metric, so the threshold is a property of the
    decoder, not tuned for a score.
    """
    reconstructions = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        z_mu, _ = autoencoder.encode(batch)
        reconstructions.append(autoencoder.decode(z_mu).float().clamp(-1.0, 1.0).cpu())
    recon, truth = torch.cat(reconstructions), images.float().cpu()
    errors = [float((apply_floor_snap(recon, snap) - truth).pow(2).mean()) for snap in FLOOR_SNAP_CANDIDATES]
    return FLOOR_SNAP_CANDIDATES[int(np.argmin(errors))]


def build_vae(config: ModelConfig) -> Any:
    """The first-stage autoencoder: 1 channel in and out, ``latent_channels`` at 1/f resolution
    (a :class:`FrameWiseAutoencoder` for a 2D+T model that keeps every frame)."""
    if config.temporal and not config.time_downsampling:
        return FrameWiseAutoencoder(build_vae(config.replace(temporal=False)))
    vae = config.vae
    return AutoencoderKL(
        spatial_dims=config.spatial_dims,
        in_channels=1,
        out_channels=1,
        num_res_blocks=vae.num_res_blocks,
        channels=vae.channels,
        attention_levels=(False,) * len(vae.channels),
        latent_channels=vae.latent_channels,
        norm_num_groups=vae.norm_num_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


class CaLIDNet(nn.Module):
    """Denoiser conditioned on the two neighbour slices.

    Args:
        config: the model configuration (its ``denoiser`` and ``vae`` parts are used).

    Shapes (B = batch, C = latent channels, h = w = image_size / f); a 2D+T
    model (``config.temporal``) has an extra time axis after the channels
    everywhere, ``T`` frames in pixel space and ``T / f`` in latent space:
        z_t: (B, C, h, w) noisy latent of the middle slice.
        timesteps: (B,) integer diffusion steps.
        neighbours: (B, 2, H, W) the previous and next slice in [-1, 1].
        neighbour_latents: (B, 2C, h, w), only when ``concat_neighbour_latents``.
        keep_condition: (B,) 1 to use the condition, 0 to drop it (condition dropout).
        returns: (B, C, h, w) the prediction (noise, v or x0 as configured).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.denoiser
        latent = config.vae.latent_channels
        in_channels = latent * 3 if d.concat_neighbour_latents else latent
        common: dict[str, Any] = dict(
            spatial_dims=config.spatial_dims,
            in_channels=in_channels,
            num_res_blocks=d.num_res_blocks,
            channels=d.channels,
            attention_levels=d.attention_levels,
            norm_num_groups=d.norm_num_groups,
            num_head_channels=d.num_head_channels,
        )
        self.unet = DiffusionModelUNet(out_channels=latent, **common)
        self.controlnet = ControlNet(
            conditioning_embedding_in_channels=2,
            conditioning_embedding_num_channels=d.conditioning_channels,
            **{**common, "attention_levels": d.tau2_attention_levels},
        )
        if config.temporal and not config.time_downsampling:
            # The latent keeps every frame: tau1 downsamples y and x only, frame by frame.
            self.controlnet.controlnet_cond_embedding = FrameWiseConditioning(  # type: ignore[assignment]
                ControlNetConditioningEmbedding(spatial_dims=2, in_channels=2, out_channels=d.channels[0], channels=d.conditioning_channels)
            )

    def forward(
        self,
        z_t: torch.Tensor,
        timesteps: torch.Tensor,
        neighbours: torch.Tensor,
        neighbour_latents: torch.Tensor | None = None,
        keep_condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = z_t
        if self.config.denoiser.concat_neighbour_latents:
            if neighbour_latents is None:
                raise ValueError("this model also takes the neighbours' latents (concat_neighbour_latents)")
            if keep_condition is not None:
                neighbour_latents = neighbour_latents * keep_condition.view(-1, *([1] * (neighbour_latents.dim() - 1))).to(neighbour_latents.dtype)
            x = torch.cat([z_t, neighbour_latents], dim=1)
        down, mid = self.controlnet(x=x, timesteps=timesteps, controlnet_cond=neighbours)
        if keep_condition is not None:
            mask = keep_condition.view(-1, *([1] * (mid.dim() - 1))).to(mid.dtype)
            down = [residual * mask for residual in down]
            mid = mid * mask
        output = self.unet(x=x, timesteps=timesteps, down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        if self.config.denoiser.residual_to_neighbours:
            # x0 = latent-linear interpolation + the learned correction (no offset where the condition is dropped).
            assert neighbour_latents is not None
            previous_latent, next_latent = neighbour_latents.chunk(2, dim=1)
            output = output + 0.5 * (previous_latent + next_latent)
        return output

    def unconditioned(self, z_t: torch.Tensor, timesteps: torch.Tensor, neighbour_latents: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser without any condition (needs training with condition dropout)."""
        x = z_t
        if self.config.denoiser.concat_neighbour_latents:
            zeros = torch.zeros(z_t.shape[0], 2 * z_t.shape[1], *z_t.shape[2:], dtype=z_t.dtype, device=z_t.device)
            x = torch.cat([z_t, zeros], dim=1)
        return self.unet(x=x, timesteps=timesteps)


def inflate_to_temporal(state_2d: dict[str, torch.Tensor], network: CaLIDNet) -> dict[str, torch.Tensor]:
    """A 2D denoiser's weights as the starting weights of the same-sized 2D+T ``network``.

    Every k x k convolution kernel becomes a k x k x k kernel holding the 2D kernel at the
    centre time offset and zeros elsewhere; all other tensors are copied. On a clip whose
    frames are all equal, the inflated network then computes exactly what the 2D network
    computes on each frame (normalisation statistics and attention weights do not change when
    a frame is repeated), so a 2D+T model can start from a trained 2D one and only has to
    learn what the time axis adds, instead of everything from scratch.
    """
    inflated: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, target in network.state_dict().items():
        # A time-keeping model wraps the 2D conditioning encoder (tau1) to run it frame by frame.
        source_key = key if key in state_2d else key.replace("controlnet_cond_embedding.frames.", "controlnet_cond_embedding.")
        if source_key not in state_2d:
            raise ValueError(f"the 2D weights have no tensor for {key!r}: not the same architecture")
        used.add(source_key)
        source = state_2d[source_key]
        if source.shape == target.shape:
            inflated[key] = source.clone()
        elif source.dim() + 1 == target.dim() and target.shape[:2] == source.shape[:2] and target.shape[3:] == source.shape[2:]:
            kernel = torch.zeros_like(target)
            kernel[:, :, target.shape[2] // 2] = source
            inflated[key] = kernel
        else:
            raise ValueError(f"{key!r}: a 2D tensor of shape {tuple(source.shape)} does not fit {tuple(target.shape)}")
    unused = sorted(set(state_2d) - used)
    if unused:  # a trained part with no place in the 2D+T network: not the same architecture
        raise ValueError(f"Unexpected key(s) in the 2D weights, e.g. {unused[0]!r} ({len(unused)} in all): not the same architecture")
    return inflated
