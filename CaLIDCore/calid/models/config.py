"""Model configurations: every knob of the VAE, the denoiser and the noise schedule in one place.

Configurations are frozen dataclasses serialised to JSON inside every
checkpoint, so a checkpoint rebuilds exactly the networks it was saved from.
Named configurations:

* ``tiny``: seconds on a CPU; for tests and smoke runs (32 px crops).
* ``small``: trainable to useful quality on a few CPU cores within hours or
  quickly on one GPU (96-128 px crops); VAE (32, 64, 64) with 3 latent channels,
  denoiser and ControlNet (64, 128, 128).
* ``NAME-2d+t`` (``tiny-2d+t``, ``small-2d+t``, ``paper-2d+t``): the same networks
  with every 2D convolution made 3D over (t, y, x), as the paper's 2D+T model;
  they work on clips of ``clip_length`` frames (8 for tiny, 32 otherwise). The
  denoiser (U-Net, ControlNet) is 3D. The autoencoder keeps every frame (the
  2D autoencoder applied frame by frame, tau1 likewise) unless
  ``time_downsampling`` is set, which gives the paper's 3D autoencoder that
  downsamples time by f like space. Measured with
  ``Testing/benchmarks/temporal_latent.py`` (tiny size, 300 steps, ACDC clips):
  keeping time reconstructs better (+0.3 dB PSNR, +0.06 SSIM, a quarter of the
  frame-to-frame change error of the reconstruction) for 4x the latent values,
  in half the training time per step, and it can start from a trained 2D
  autoencoder (``calid train ldm --temporal``).
* ``paper``: the sizes of the paper / its authors' public code as far as known:
  VAE (32, 64, 128), 3 latent channels, 2 residual blocks, f = 4; denoiser
  (128, 256, 512) with attention at the two deeper levels; 128 px crops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from calid.data.preprocess import PreprocessConfig

Prediction = Literal["epsilon", "v_prediction", "sample"]
BetaSchedule = Literal["linear", "scaled_linear"]


@dataclass(frozen=True)
class VAEConfig:
    """MONAI ``AutoencoderKL`` without attention (the paper's VAE: convolutions only).

    The spatial downsampling factor is ``2 ** (len(channels) - 1)``.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 3
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    #: Decoded values below ``-1 + floor_snap`` are set to -1. Preprocessing clips the dark
    #: background to exactly -1 (about half of a cine crop), a level a decoder ending in a
    #: convolution only approaches; calibrated by least squares on training slices when a
    #: model is exported (:func:`calid.models.networks.calibrate_floor_snap`). 0: off.
    floor_snap: float = 0.0

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class DenoiserConfig:
    """The interpolation denoiser: U-Net eps_theta plus ControlNet (tau1 + tau2), trained jointly.

    Args:
        channels: U-Net (and ControlNet encoder) channels per level.
        attention_levels: self-attention at each level.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: group-norm groups (divides every entry of ``channels``).
        conditioning_channels: tau1, the light conv encoder of the two neighbour
            slices (pixel space) ending in a zero-conv; it downsamples
            ``len(conditioning_channels) - 1`` times, which must match the VAE.
        concat_neighbour_latents: also feed the neighbours' VAE latents to the
            U-Net input (a measured option beside the paper's recipe).
        condition_dropout: probability per sample of dropping the condition in
            training, so the same network also denoises unconditioned.
        prediction: what the network predicts: noise (the paper), v or x0.
        residual_to_neighbours: with ``prediction="sample"`` and concatenated
            neighbour latents, the network's output is added to the mean of the
            two neighbours' latents: with the U-Net's zero-initialised output it
            starts as latent-linear interpolation and learns the correction.
        control_attention_levels: self-attention at each level of tau2 (the
            ControlNet encoder); None: as ``attention_levels``. The paper puts
            self-attention at every scale of tau2 (the ``paper`` configuration).
        registered_neighbours: registration-guided CaLID (an option beside the
            paper's recipe, 2D models only): the two neighbours are first moved
            to the middle of their gap by the model-free registration
            (:func:`calid.inference.registration.moved_neighbours`, at the model's
            pixel size, with the settings the model file records from its
            training), and the network sees the moved
            images (and their latents) instead of the acquired ones. The
            registration aligns what it can; the network has to learn only what
            moving cannot give (what appears or vanishes between the slices).
    """

    channels: tuple[int, ...] = (64, 128, 128)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 2
    num_head_channels: int = 32
    norm_num_groups: int = 32
    conditioning_channels: tuple[int, ...] = (16, 32, 64)
    concat_neighbour_latents: bool = False
    condition_dropout: float = 0.0
    prediction: Prediction = "epsilon"
    residual_to_neighbours: bool = False
    control_attention_levels: tuple[bool, ...] | None = None
    registered_neighbours: bool = False

    @property
    def tau2_attention_levels(self) -> tuple[bool, ...]:
        return self.attention_levels if self.control_attention_levels is None else self.control_attention_levels


@dataclass(frozen=True)
class ScheduleConfig:
    """DDPM noise schedule (1000 training steps)."""

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a CaLID model."""

    name: str = "small"
    image_size: int = 128
    #: 2D+T: networks over (t, y, x) clips of ``clip_length`` frames instead of single slices.
    temporal: bool = False
    clip_length: int = 32
    #: 2D+T only: True = the paper's 3D autoencoder, which downsamples time by f like space;
    #: False = the 2D autoencoder on every frame (latents keep every frame), tau1 per frame.
    time_downsampling: bool = False
    #: DDIM steps used when a caller does not choose (engine, CLI, Slicer): the step count
    #: at which this model was validated best (Task 2 of ``calid evaluate``); 8 as in the paper.
    default_steps: int = 8
    vae: VAEConfig = field(default_factory=VAEConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        problems = []
        if len(self.denoiser.conditioning_channels) - 1 != len(self.vae.channels) - 1:
            problems.append(
                f"tau1 downsamples {len(self.denoiser.conditioning_channels) - 1} times but the VAE "
                f"{len(self.vae.channels) - 1} times (conditioning_channels vs vae.channels)"
            )
        if len(self.denoiser.attention_levels) != len(self.denoiser.channels):
            problems.append("denoiser.attention_levels needs one entry per level of denoiser.channels")
        if len(self.denoiser.tau2_attention_levels) != len(self.denoiser.channels):
            problems.append("denoiser.control_attention_levels needs one entry per level of denoiser.channels")
        attended = [c for c, a, b in zip(self.denoiser.channels, self.denoiser.attention_levels, self.denoiser.tau2_attention_levels) if a or b]
        if self.denoiser.num_head_channels < 1 or any(c % self.denoiser.num_head_channels for c in attended):
            problems.append(f"denoiser.num_head_channels {self.denoiser.num_head_channels} must divide the channels of every attention level {attended}")
        for name, channels, groups in (
            ("vae", self.vae.channels, self.vae.norm_num_groups),
            ("denoiser", self.denoiser.channels, self.denoiser.norm_num_groups),
        ):
            if any(c % groups for c in channels):
                problems.append(f"{name}.channels {channels} must be multiples of norm_num_groups {groups}")
        latent_size = self.image_size // self.vae.downsampling
        if self.image_size % self.vae.downsampling or latent_size % 2 ** (len(self.denoiser.channels) - 1):
            problems.append(f"image_size {self.image_size} does not divide evenly through the VAE and the U-Net levels")
        if self.preprocess.crop_size is None or tuple(self.preprocess.crop_size) != (self.image_size, self.image_size):
            # The engine works in square crops of image_size (the latent buffers, turning for tta).
            problems.append(f"preprocess.crop_size {self.preprocess.crop_size} must be ({self.image_size}, {self.image_size}), the image_size")
        if self.temporal:
            time_factor = (self.vae.downsampling if self.time_downsampling else 1) * 2 ** (len(self.denoiser.channels) - 1)
            if self.clip_length < time_factor or self.clip_length % time_factor:
                problems.append(f"clip_length {self.clip_length} must be a multiple of {time_factor} (the VAE and U-Net downsample time too)")
        if isinstance(self.default_steps, bool) or not isinstance(self.default_steps, int) or not 1 <= self.default_steps <= self.schedule.num_train_timesteps:
            problems.append(f"default_steps must be an integer from 1 to {self.schedule.num_train_timesteps}, got {self.default_steps!r}")
        if not 0.0 <= self.denoiser.condition_dropout < 1.0:
            problems.append("denoiser.condition_dropout must be in [0, 1)")
        if self.denoiser.residual_to_neighbours and not (self.denoiser.prediction == "sample" and self.denoiser.concat_neighbour_latents):
            problems.append("denoiser.residual_to_neighbours needs prediction 'sample' and concat_neighbour_latents")
        if self.denoiser.registered_neighbours and self.temporal:
            problems.append("denoiser.registered_neighbours is for 2D models (the registration moves single slices)")
        if self.denoiser.registered_neighbours and not self.preprocess.target_spacing_mm:
            problems.append("denoiser.registered_neighbours needs preprocess.target_spacing_mm (the registration smooths in mm)")
        if self.denoiser.prediction not in ("epsilon", "v_prediction", "sample"):
            problems.append(f"unknown prediction type {self.denoiser.prediction!r}")
        if self.schedule.beta_schedule not in ("linear", "scaled_linear"):
            problems.append(f"unknown beta schedule {self.schedule.beta_schedule!r}")
        if problems:
            raise ValueError("invalid model configuration: " + "; ".join(problems))

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsampling

    @property
    def spatial_dims(self) -> int:
        """2 for slices, 3 for (t, y, x) clips."""
        return 3 if self.temporal else 2

    @property
    def latent_clip_length(self) -> int:
        return self.clip_length // self.vae.downsampling if self.time_downsampling else self.clip_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a file from another version)."""

        def build(kind: type, raw: dict[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(raw) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} field(s): {', '.join(sorted(unknown))}")
            converted = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
            return kind(**converted)

        raw = dict(values)
        return build(
            cls,
            {
                **raw,
                "vae": build(VAEConfig, raw.get("vae", {})),
                "denoiser": build(DenoiserConfig, raw.get("denoiser", {})),
                "schedule": build(ScheduleConfig, raw.get("schedule", {})),
                "preprocess": PreprocessConfig.from_dict(raw["preprocess"]) if "preprocess" in raw else PreprocessConfig(),
            },
        )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


TEMPORAL_SUFFIX = "-2d+t"


def named_config(name: str) -> ModelConfig:
    """The configuration called ``name``: ``tiny``, ``small``, ``paper``, or one of them with ``-2d+t``."""
    if name.endswith(TEMPORAL_SUFFIX) and name[: -len(TEMPORAL_SUFFIX)] in CONFIG_NAMES:
        base = named_config(name[: -len(TEMPORAL_SUFFIX)])
        # tau2 attends where the U-Net does: at the finest level a (t, y, x) clip has too many tokens.
        denoiser = dataclasses.replace(base.denoiser, control_attention_levels=None)
        return base.replace(name=name, temporal=True, clip_length=8 if base.name == "tiny" else 32, denoiser=denoiser)
    if name == "tiny":
        return ModelConfig(
            name="tiny",
            image_size=32,
            vae=VAEConfig(channels=(8, 16, 16), latent_channels=3, num_res_blocks=1, norm_num_groups=8),
            denoiser=DenoiserConfig(
                channels=(16, 32),
                attention_levels=(False, True),
                num_res_blocks=1,
                num_head_channels=8,
                norm_num_groups=8,
                conditioning_channels=(8, 16, 16),
            ),
            preprocess=PreprocessConfig(target_spacing_mm=1.8, crop_size=(32, 32)),
        )
    if name == "small":
        return ModelConfig(name="small", image_size=96, preprocess=PreprocessConfig(target_spacing_mm=1.8, crop_size=(96, 96)))
    if name == "paper":
        return ModelConfig(
            name="paper",
            image_size=128,
            vae=VAEConfig(channels=(32, 64, 128), latent_channels=3, num_res_blocks=2, norm_num_groups=32),
            denoiser=DenoiserConfig(
                channels=(128, 256, 512),
                attention_levels=(False, True, True),
                num_res_blocks=2,
                num_head_channels=64,
                norm_num_groups=32,
                conditioning_channels=(32, 64, 128),
                control_attention_levels=(True, True, True),  # tau2: self-attention at each resolution scale (paper, Sec. III)
            ),
            preprocess=PreprocessConfig(target_spacing_mm=1.8, crop_size=(128, 128)),
        )
    raise ValueError(f"unknown configuration {name!r}; choose tiny, small or paper (2D+T: tiny-2d+t, small-2d+t, paper-2d+t)")


CONFIG_NAMES = ("tiny", "small", "paper")
TEMPORAL_CONFIG_NAMES = tuple(name + TEMPORAL_SUFFIX for name in CONFIG_NAMES)
