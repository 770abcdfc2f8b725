"""The segmentation network, its configuration and its model file.

A residual 2D U-Net from MONAI segments each short-axis slice into background,
RV cavity, LV myocardium and LV cavity (the ACDC label values). Slices are
resampled to ``spacing_mm`` in-plane and normalised like the CaLID models
(robust percentiles to [-1, 1]); whole slices of any size are segmented with
sliding windows of ``patch_size``.

Model files are safetensors with a JSON header (format ``calid-model``,
kind ``segmentation``), like the CaLID models: never unpickled.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from calid.atomic import atomic_path
from calid.errors import InputError

#: Label values (ACDC convention) and their names.
LABELS: dict[int, str] = {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"}
RV_CAVITY, LV_MYOCARDIUM, LV_CAVITY = 1, 2, 3
FORMAT_NAME = "calid-model"
FORMAT_VERSION = 1
KIND = "segmentation"


@dataclass(frozen=True)
class SegmentationConfig:
    """Network and preprocessing of the segmenter.

    Args:
        name: ``tiny`` (tests) or ``default``.
        channels: U-Net channels per level; ``strides`` has one entry fewer.
        num_res_units: residual units per block.
        dropout: dropout probability inside the U-Net.
        spacing_mm: in-plane pixel size the network works at.
        patch_size: sliding-window (and training crop) size in pixels.
        percentiles: intensity percentiles mapped to -1 and +1.
    """

    name: str = "default"
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    dropout: float = 0.1
    spacing_mm: float = 1.5
    patch_size: int = 128
    percentiles: tuple[float, float] = (0.5, 99.5)
    labels: dict[int, str] = field(default_factory=lambda: dict(LABELS))

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("segmentation config: strides needs one entry fewer than channels")
        divisor = 1
        for s in self.strides:
            divisor *= s
        if self.patch_size % divisor:
            raise ValueError(f"segmentation config: patch_size {self.patch_size} must be a multiple of {divisor}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["labels"] = {str(k): v for k, v in self.labels.items()}
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegmentationConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown segmentation config field(s): {', '.join(sorted(unknown))}")
        converted: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        if "labels" in converted:
            converted["labels"] = {int(k): str(v) for k, v in converted["labels"].items()}
        return cls(**converted)


def named_segmentation_config(name: str) -> SegmentationConfig:
    if name == "tiny":
        return SegmentationConfig(name="tiny", channels=(8, 16, 32), strides=(2, 2), num_res_units=1, patch_size=64, spacing_mm=3.0)
    if name == "default":
        return SegmentationConfig()
    raise ValueError(f"unknown segmentation configuration {name!r}; choose tiny or default")


def build_segmenter(config: SegmentationConfig) -> UNet:
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=len(config.labels) + 1,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm="instance",
        dropout=config.dropout,
    )


@dataclass
class SegmentationModel:
    """A loaded segmenter (eval mode) and its description."""

    config: SegmentationConfig
    network: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def save_segmenter(path: str | os.PathLike[str], config: SegmentationConfig, network: nn.Module, info: dict[str, Any] | None = None) -> Path:
    """Write the weights and description atomically."""
    from calid import __version__

    tensors = {f"seg.{k}": v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "config": config.to_dict(),
        "code_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "info": info or {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"calid": json.dumps(header)})
    return path


def load_segmenter(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SegmentationModel:
    """Rebuild the network of a segmentation model file (checked like every model file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "segmentation model file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except Exception as error:
        raise InputError(path, f"is not a readable safetensors model file ({error})") from error
    try:
        header = json.loads(metadata["calid"])
    except (KeyError, json.JSONDecodeError) as error:
        raise InputError(path, "is not a CaLID model file (no valid 'calid' header entry)") from error
    if header.get("kind") != KIND:
        raise InputError(path, f"is a {header.get('kind')!r} model, not a segmentation model")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(path, "was written by a newer calid; update calid to read it")
    try:
        config = SegmentationConfig.from_dict(header["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"has an invalid segmentation configuration ({error})") from error
    network = build_segmenter(config)
    given = {k[len("seg.") :]: v for k, v in tensors.items() if k.startswith("seg.")}
    expected = network.state_dict()
    if set(given) != set(expected) or any(tuple(given[k].shape) != tuple(expected[k].shape) for k in expected):
        raise InputError(path, "weights do not match the configuration stored in the file")
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in given.values()):
        raise InputError(path, "weights contain NaN or infinite values")
    network.load_state_dict(given)
    network.to(device).eval()
    return SegmentationModel(config=config, network=network, info=header.get("info", {}), path=str(path))
