"""Model cards: what a model file is, what it was trained on and how well it does."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from calid.errors import InputError
from calid.models.config import ModelConfig
from calid.models.registry import UNTRAINED_PREFIX, registered_models, resolve_model, sha256_of


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Trainable parameters of the VAE and the denoiser (built on the CPU, not loaded)."""
    from calid.models.networks import CaLIDNet, build_vae

    return {
        "vae": sum(p.numel() for p in build_vae(config).parameters()),
        "denoiser": sum(p.numel() for p in CaLIDNet(config).parameters()),
    }


def _config_lines(config: ModelConfig, with_denoiser: bool = True) -> list[str]:
    """The configuration in words; a VAE file (the first training stage) has no denoiser or sampling to describe."""
    pre = config.preprocess
    d = config.denoiser
    counts = parameter_counts(config)
    lines = [
        f"configuration   {config.name}: {config.image_size} x {config.image_size} px crops at {pre.target_spacing_mm} mm, "
        f"intensities: percentiles {pre.percentiles[0]:g}-{pre.percentiles[1]:g} -> [-1, 1]",
        f"autoencoder     channels {tuple(config.vae.channels)}, {config.vae.latent_channels} latent channels, "
        f"f = {config.vae.downsampling}, {counts['vae'] / 1e6:.2f} M parameters"
        + (f", decoded values within {config.vae.floor_snap:g} of the floor set to it" if config.vae.floor_snap else ""),
    ]
    if not with_denoiser:
        return lines
    return lines + [
        f"denoiser        U-Net + ControlNet {tuple(d.channels)}, attention {tuple(d.attention_levels)}, predicts {d.prediction}"
        + (", neighbour latents concatenated" if d.concat_neighbour_latents else "")
        + (" (output: correction to their mean)" if d.residual_to_neighbours else "")
        + (f", condition dropout {d.condition_dropout:g}" if d.condition_dropout else "")
        + (", registration-guided (sees the neighbours moved to the middle by registration)" if d.registered_neighbours else "")
        + f", {counts['denoiser'] / 1e6:.2f} M parameters",
        f"noise schedule  {config.schedule.beta_schedule} {config.schedule.beta_start:g}-{config.schedule.beta_end:g}, {config.schedule.num_train_timesteps} steps",
        f"sampling        {config.default_steps} DDIM step(s) by default (--steps to change)",
    ]


def model_card_text(model: str | os.PathLike[str]) -> str:
    """A plain-text card of a model file or installed name (``calid info``)."""
    from calid.models.checkpoint import read_header

    text = os.fspath(model)
    if text.startswith(UNTRAINED_PREFIX):
        from calid.models.config import named_config

        try:
            config = named_config(text[len(UNTRAINED_PREFIX) :])
        except ValueError as error:
            raise InputError(text, str(error)) from None
        return "\n".join([f"model           {text}", "status          UNTRAINED: random weights, for testing the pipeline only", *_config_lines(config)])
    path = resolve_model(model)
    if _raw_kind(path) == "segmentation":
        return _segmentation_card(text, path)
    header = read_header(path)
    info: dict[str, Any] = header.get("info", {})
    lines = [
        f"model           {text}",
        f"file            {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(path)})",
        f"kind            {header['kind']} (format {header['format']} v{header['format_version']}, calid {header.get('code_version', '?')}, created {header.get('created', '?')})",
        *_config_lines(header["config"], with_denoiser=header["kind"] != "vae"),
    ]
    if header["kind"] != "vae":  # an autoencoder alone has no latent scale yet (the denoiser's training measures it)
        lines.append(f"latent scale    {header.get('latent_scale', 1.0):.5g}")
    if "step" in info:
        stage = f", stage {info['stage']}" if "stage" in info else ""
        lines.append(f"weights         from training step {info['step']}{stage}")
    data = info.get("training_data")
    if data:
        lines.append("training data   " + (data if isinstance(data, str) else json.dumps(data)))
    from calid.models.checkpoint import recorded_placeholder_spacing

    assumed = recorded_placeholder_spacing(header)
    if assumed is not None:
        lines.append(f"no geometry     files saved without geometry (all spacings 1 mm) are shown to it at {assumed:g} mm pixels, as in its training")
    metrics = info.get("metrics") or {}
    if metrics:
        lines.append("metrics         " + ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in metrics.items()))
    if "licence" in info and "license" not in info:  # both spellings are accepted in --info files
        info = {**info, "license": info["licence"]}
    for key in ("hardware", "training_time", "license", "reproduce"):
        if key in info:
            lines.append(f"{key.replace('_', ' '):16s}{info[key]}")
    card = next((m.card for m in registered_models() if m.path.resolve() == Path(path).resolve() and m.card is not None), None)
    if card is not None and card.is_file():
        lines += ["", card.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines)


def _raw_kind(path: Path) -> str:
    from calid.models.checkpoint import read_raw_header

    return str(read_raw_header(path).get("kind", ""))


def _segmentation_card(text: str, path: Path) -> str:
    from calid.segmentation import load_segmenter

    model = load_segmenter(path)
    config, info = model.config, model.info
    parameters = sum(p.numel() for p in model.network.parameters())
    lines = [
        f"model           {text}",
        f"file            {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(path)})",
        f"kind            segmentation: {', '.join(f'{k} {v}' for k, v in config.labels.items())}",
        f"network         MONAI residual U-Net {tuple(config.channels)}, {parameters / 1e6:.2f} M parameters; "
        f"{config.spacing_mm} mm pixels, {config.patch_size} px sliding windows",
    ]
    if "step" in info:
        lines.append(f"weights         from training step {info['step']}")
    data = info.get("training_data")
    if data:
        lines.append("training data   " + json.dumps(data))
    if info.get("metrics"):
        lines.append("metrics         " + ", ".join(f"{k} {v:.3f}" for k, v in info["metrics"].items()))
    card = next((m.card for m in registered_models() if m.path.resolve() == path.resolve() and m.card is not None), None)
    if card is not None and card.is_file():
        lines += ["", card.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines)
