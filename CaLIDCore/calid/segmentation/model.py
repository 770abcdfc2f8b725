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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import nn

from calid.errors import InputError
from calid.models.checkpoint import load_into, read_raw_header, read_weights, write_model_file

#: Label values (ACDC convention) and their names.
LABELS: dict[int, str] = {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"}
RV_CAVITY, LV_MYOCARDIUM, LV_CAVITY = 1, 2, 3
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
    """Write the weights and description atomically (the same file format as the CaLID models)."""
    return write_model_file(path, {"seg": network}, KIND, {"config": config.to_dict(), "info": info or {}})


def load_segmenter(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SegmentationModel:
    """Rebuild the network of a segmentation model file (checked like every model file)."""
    header = read_raw_header(path)
    if header.get("kind") != KIND:
        raise InputError(path, f"is a {header.get('kind')!r} model, not a segmentation model")
    try:
        config = SegmentationConfig.from_dict(header["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"has an invalid segmentation configuration ({error})") from error
    network = build_segmenter(config)
    load_into(network, read_weights(path), "seg.", path)
    network.to(device).eval()
    return SegmentationModel(config=config, network=network, info=header.get("info", {}), path=str(path))
