"""Model files: safetensors weights with the JSON description in the same file's header.

A CaLID model file holds tensors named ``vae.*`` (the autoencoder) and, for a
full model, ``net.*`` (the interpolation denoiser), plus one header entry
``calid`` with JSON: file format and version, kind (``vae`` or ``calid``),
the model configuration, the latent scale factor, the training data
description, metrics and the code version. Nothing is ever unpickled.

:func:`load_model` refuses, with a message naming the file, anything it cannot
trust: not a safetensors file, truncated, no CaLID header, a newer format,
an invalid configuration, missing / unexpected / wrongly shaped tensors, or
non-finite weights.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from monai.networks.nets import AutoencoderKL
from torch import nn

from calid.atomic import atomic_path
from calid.errors import InputError
from calid.models.config import ModelConfig
from calid.models.networks import CaLIDNet, FrameWiseAutoencoder, build_vae

FORMAT_NAME = "calid-model"
FORMAT_VERSION = 1
KINDS = ("vae", "calid")


@dataclass
class LoadedModel:
    """The networks and description of one model file (in eval mode)."""

    config: ModelConfig
    vae: AutoencoderKL | FrameWiseAutoencoder
    net: CaLIDNet | None
    latent_scale: float
    info: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def kind(self) -> str:
        return "calid" if self.net is not None else "vae"


def _code_version() -> str:
    from calid import __version__

    return __version__


def write_model_file(path: str | os.PathLike[str], modules: dict[str, nn.Module], kind: str, fields: dict[str, Any]) -> Path:
    """Write the weights of ``modules`` (tensor names prefixed ``<prefix>.``) and a ``calid`` JSON
    header (format, version, kind, code version, date, plus ``fields``) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        tensors.update({f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()})
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "code_version": _code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"calid": json.dumps(header)})
    return path


def save_model(
    path: str | os.PathLike[str],
    config: ModelConfig,
    vae: nn.Module,
    net: nn.Module | None = None,
    latent_scale: float = 1.0,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a CaLID (or autoencoder-only) model file atomically."""
    modules = {"vae": vae} if net is None else {"vae": vae, "net": net}
    fields = {"config": config.to_dict(), "latent_scale": float(latent_scale), "info": info or {}}
    return write_model_file(path, modules, "calid" if net is not None else "vae", fields)


#: ``calid.training.state.FORMAT_NAME``, spelled out here: models do not import the trainer (a checkpoint
#: given where a model is asked for is recognised, and the test of that message keeps the two the same).
TRAINING_STATE_FORMAT = "calid-training-state"


def read_raw_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``calid`` JSON header of any model file (CaLID or segmentation), format-checked only."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises SafetensorError / OSError on bad headers
        hint = ""
        if path.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")):
            hint = "; it looks like an image: `calid inspect` describes images"
        raise InputError(path, f"is not a readable safetensors model file ({error}){hint}") from error
    if "calid" not in metadata:
        raise InputError(path, "is a safetensors file but not a CaLID model (no 'calid' header entry)")
    try:
        header = json.loads(metadata["calid"])
    except json.JSONDecodeError as error:
        raise InputError(path, f"has a damaged CaLID header ({error})") from error
    if header.get("format") == TRAINING_STATE_FORMAT:
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        raise InputError(
            path,
            f"is a training checkpoint (what `calid train --resume` continues from), not a model: the run's models are "
            f"{run / 'best.safetensors'} (best validation) and {run / 'model.safetensors'} (last)",
        )
    if header.get("format") != FORMAT_NAME:
        raise InputError(path, f"has an unknown format {header.get('format')!r}")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(path, f"was written by a newer calid (format {header.get('format_version')}); update calid to read it")
    return dict(header)


def recorded_training_data(header: dict[str, Any], *keys: str) -> Any:
    """``info.training_data.<keys...>`` of a model file's header (what its training recorded);
    None where any level is absent or not a mapping (older or hand-edited files)."""
    value: Any = header
    for key in ("info", "training_data", *keys):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def subjects_learnt(header: dict[str, Any]) -> set[str]:
    """Every subject a model file's training saw: its own training subjects; for a fine-tune
    (``--init-from``), those its starting model learnt (recorded under ``initialised_from``); and
    for a CaLID model, those its autoencoder learnt in the first stage (under ``autoencoder``)."""
    learnt: set[str] = set()
    for recorded in (
        recorded_training_data(header, "train_subjects"),
        recorded_training_data(header, "initialised_from", "train_subjects"),
        recorded_training_data(header, "autoencoder", "train_subjects"),
    ):
        if isinstance(recorded, list):
            learnt.update(str(subject) for subject in recorded)
    return learnt


def recorded_placeholder_spacing(header: dict[str, Any]) -> float | None:
    """The pixel size (mm) a model's training gave files saved without geometry, from its
    header (``info.training_data.placeholder_spacing``); None when its data had none."""
    value = recorded_training_data(header, "placeholder_spacing", "assumed_mm")  # may also be free text
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        value = float(np.median(value))  # several assumed sizes: their median stands for them
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON description of a CaLID model file, validated, without loading the weights."""
    header = read_raw_header(path)
    if header.get("kind") == "segmentation":
        raise InputError(path, "is a segmentation model (for calid segment); upsampling needs a CaLID interpolation model")
    if header.get("kind") not in KINDS:
        raise InputError(path, f"has an unknown model kind {header.get('kind')!r}")
    try:
        header["config"] = ModelConfig.from_dict(header["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"has an invalid model configuration ({error})") from error
    if header["kind"] == "calid":
        # The engine divides the latents by it: a missing, zero or non-finite scale would give
        # black or NaN slices without any error.
        scale = header.get("latent_scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise InputError(path, f"has no usable latent scale ({scale!r}; a positive number is needed)")
    return header


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a model file (on the CPU)."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise InputError(path, f"weights cannot be read; the file is truncated or corrupt ({error})") from error


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: str | os.PathLike[str]) -> None:
    """Load the tensors named ``prefix*`` into ``module``; missing, unexpected, misshapen or
    non-finite tensors are an error naming the file. Float16 weights are widened to the module's type."""
    expected = module.state_dict()
    given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {prefix}{missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {prefix}{unexpected[0]}")
    if wrong:
        key = wrong[0]
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape, e.g. {prefix}{key}: {tuple(given[key].shape)} instead of {tuple(expected[key].shape)}")
    if problems:
        raise InputError(path, "weights do not match the configuration stored in the file: " + "; ".join(problems))
    for key, value in given.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(path, f"tensor {prefix}{key} contains NaN or infinite values")
    module.load_state_dict(given)


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the networks of a model file and load its weights (eval mode, on ``device``)."""
    path = Path(path)
    header = read_header(path)
    config: ModelConfig = header["config"]
    tensors = read_weights(path)
    vae = build_vae(config)
    load_into(vae, tensors, "vae.", path)
    net = None
    if header["kind"] == "calid":
        net = CaLIDNet(config)
        load_into(net, tensors, "net.", path)
    elif any(k.startswith("net.") for k in tensors):
        raise InputError(path, "a 'vae' model file must not contain denoiser weights")
    vae.to(device).eval()
    if net is not None:
        net.to(device).eval()
    return LoadedModel(
        config=config,
        vae=vae,
        net=net,
        latent_scale=float(header.get("latent_scale", 1.0)),
        info={k: v for k, v in header.items() if k not in ("config",)},
        path=str(path),
    )
