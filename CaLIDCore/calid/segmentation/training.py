"""Training the segmenter on labelled short-axis volumes (``calid train seg``).

Data: pairs ``NAME.nii.gz`` + ``NAME_gt.nii.gz`` (the ACDC layout; any format
of the data layer works) found in the given folders. Subjects are split
before anything else (validation subjects are never trained on). Every slice
is resampled to the model's pixel size once; training draws random patches
(two of three centred on the heart), with flips, rotations, in-plane scaling,
intensity scale / shift and noise (MONAI transforms). Loss: Dice + cross
entropy. Validation segments the held-out volumes with the same
:func:`calid.segmentation.segment` that users run, and reports Dice per
structure; the best model is kept. Interrupted runs resume exactly from
``checkpoints/last.safetensors``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    SpatialPadd,
)

from calid.data.datasets import split_subjects, subject_id
from calid.data.io import read_stack
from calid.data.preprocess import resample_in_plane
from calid.data.stack import CineStack
from calid.device import resolve_device
from calid.errors import InputError
from calid.segmentation.inference import intensity_window, segment, to_model_grid
from calid.segmentation.model import SegmentationConfig, SegmentationModel, build_segmenter, named_segmentation_config, save_segmenter
from calid.training.state import load_training_state, save_training_state

LABEL_SUFFIX = "_gt"


@dataclass(frozen=True)
class SegTrainConfig:
    """Every knob of a segmentation training run."""

    data: tuple[str, ...]
    out_dir: str
    model: str = "default"
    steps: int = 4000
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    validate_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0
    val_fraction: float = 0.2
    val_subjects: tuple[str, ...] | None = None
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LabelledVolume:
    subject: str
    image: CineStack  # one frame
    labels: CineStack


def find_labelled_pairs(entries: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """(image, labels) file pairs: every ``X_gt.<ext>`` with its ``X.<ext>`` beside it."""
    pairs: list[tuple[Path, Path]] = []
    for entry in entries:
        root = Path(entry)
        if not root.exists():
            raise InputError(root, "training data not found")
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for label_path in candidates:
            name = label_path.name
            for ext in (".nii.gz", ".nii", ".nrrd"):
                if name.endswith(LABEL_SUFFIX + ext):
                    image_path = label_path.with_name(name[: -len(LABEL_SUFFIX + ext)] + ext)
                    if image_path.is_file():
                        pairs.append((image_path, label_path))
    if not pairs:
        raise InputError(", ".join(entries), f"no labelled images found (expected NAME.nii.gz with NAME{LABEL_SUFFIX}.nii.gz beside it)")
    return pairs


def load_labelled(pairs: list[tuple[Path, Path]], roots: tuple[str, ...] = ()) -> list[LabelledVolume]:
    """Every frame of every pair. The subject is the first subfolder under a data root when the
    files sit in one (``root/P001/sa.nii.gz``: ``P001``), else from the file name, as for
    ``calid train``: frames of one subject must never be split between training and validation."""
    volumes = []
    for image_path, label_path in pairs:
        image, labels = read_stack(image_path), read_stack(label_path)
        if image.shape != labels.shape:
            raise InputError(label_path, f"label shape {labels.shape} differs from its image {image_path.name} {image.shape}")
        root = next((r for r in roots if Path(r).is_dir() and Path(image_path).resolve().is_relative_to(Path(r).resolve())), None)
        for t in range(image.n_frames):
            volumes.append(LabelledVolume(subject_id(image_path, root), image.select_frames([t]), labels.select_frames([t])))
    return volumes


def resampled_slices(volume: LabelledVolume, config: SegmentationConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (1, H, W) in [-1, 1], labels (1, H, W)) per slice at the model's pixel size."""
    image, labels = volume.image, volume.labels
    low, high = intensity_window(image, config)
    data = to_model_grid(image.data[0], image, config, low, high)
    label_data = np.rint(resample_in_plane(labels.data[0], image.in_plane_spacing, (config.spacing_mm, config.spacing_mm), data.shape[1:], order=0))
    return [(data[z][None].astype(np.float32), label_data[z][None].astype(np.float32)) for z in range(data.shape[0])]


def augmentation(config: SegmentationConfig) -> Compose:
    size = (config.patch_size, config.patch_size)
    return Compose(
        [
            SpatialPadd(keys=("image", "label"), spatial_size=size, mode="edge"),
            RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=size, pos=2, neg=1, num_samples=1, allow_smaller=True),
            RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0),
            RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=1),
            RandRotated(keys=("image", "label"), range_x=math.pi, prob=0.7, mode=("bilinear", "nearest"), padding_mode="border"),
            RandZoomd(keys=("image", "label"), prob=0.5, min_zoom=0.8, max_zoom=1.25, mode=("bilinear", "nearest"), padding_mode="edge"),
            RandScaleIntensityd(keys="image", factors=0.2, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandGaussianNoised(keys="image", std=0.03, prob=0.3),
        ]
    )


def dice_per_structure(predicted: np.ndarray, truth: np.ndarray, labels: tuple[int, ...]) -> dict[int, float]:
    """Dice of each label value over whole volumes (NaN where both are empty)."""
    out = {}
    for value in labels:
        p, t = predicted == value, truth == value
        denominator = p.sum() + t.sum()
        out[value] = float(2.0 * (p & t).sum() / denominator) if denominator else float("nan")
    return out


class SegmentationTrainer:
    """Reads top to bottom: data, network, optimiser, then :meth:`fit`."""

    def __init__(self, config: SegTrainConfig, resume: bool = False, overwrite: bool = False) -> None:
        from calid.training.trainer import earlier_run_files, remove_run_files, validate_numbers

        self.config = config
        self.device = resolve_device(config.device)
        self.model_config = named_segmentation_config(config.model)
        self.out = Path(config.out_dir)
        validate_numbers(config)
        if resume and not (self.out / "checkpoints" / "last.safetensors").is_file():
            raise InputError(self.out / "checkpoints" / "last.safetensors", "no checkpoint to resume from (train without --resume first, or check --out)")
        replaced = [] if resume else earlier_run_files(self.out, overwrite)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        volumes = load_labelled(find_labelled_pairs(config.data), config.data)
        train_ids, val_ids = split_subjects([v.subject for v in volumes], config.val_fraction, config.seed, config.val_subjects)
        if not val_ids and (config.val_fraction > 0 or config.val_subjects):
            # Without validation no best.safetensors is ever written (the file users are told to install).
            subjects = sorted({v.subject for v in volumes})
            raise InputError(", ".join(config.data), f"no validation subject could be held out: {len(subjects)} subject(s) found ({', '.join(subjects[:5])})")
        self.train_volumes = [v for v in volumes if v.subject in train_ids]
        self.val_volumes = [v for v in volumes if v.subject in val_ids]
        self.subjects = {"train": sorted(set(train_ids)), "validation": sorted(set(val_ids))}
        self.slices = [s for v in self.train_volumes for s in resampled_slices(v, self.model_config)]
        if not self.slices:
            raise InputError(", ".join(config.data), "no training slices left after the validation split")
        self.transform = augmentation(self.model_config)
        self.network = build_segmenter(self.model_config).to(self.device)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.step = 0
        self.best_dice = -1.0
        self.stop_requested = False
        #: The signal that stopped the run, if one did.
        self.stop_signal: int | None = None
        if resume:
            self._resume()
        remove_run_files(replaced)  # --overwrite: only now that the new run is set up

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        self.stop_signal = signum

    def _learning_rate(self) -> float:
        """Linear warm-up over 100 steps, then cosine decay to 5 % of the peak."""
        peak, step, total = self.config.learning_rate, self.step, max(1, self.config.steps)
        if step < 100:
            return peak * (step + 1) / 100
        return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total))))

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Slices above the base or below the apex have no heart: plain random crops are right there.
        warnings.filterwarnings("ignore", message="Num foregrounds 0", category=UserWarning)
        # Slices and augmentations are drawn from generators seeded by (seed, step): a resumed
        # run sees exactly the batches the uninterrupted run would have seen.
        generator = np.random.default_rng([self.config.seed, self.step])
        picks = generator.integers(0, len(self.slices), size=self.config.batch_size)
        self.transform.set_random_state(seed=int(generator.integers(0, 2**31 - 1)))
        images, labels = [], []
        for index in picks:
            image, label = self.slices[index]
            sample = self.transform({"image": image, "label": label})
            sample = sample[0] if isinstance(sample, list) else sample
            images.append(torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32))
            labels.append(torch.as_tensor(np.asarray(sample["label"]), dtype=torch.float32).round())
        return torch.stack(images).to(self.device), torch.stack(labels).to(self.device)

    def train_step(self) -> float:
        self.network.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate()
        images, labels = self._batch()
        loss = self.loss(self.network(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return float(loss.item())

    def validate(self) -> dict[str, float]:
        if not self.val_volumes:
            return {}
        self.network.eval()
        model = SegmentationModel(self.model_config, self.network)
        values = tuple(sorted(self.model_config.labels))
        scores: dict[int, list[float]] = {v: [] for v in values}
        for volume in self.val_volumes:
            predicted = segment(volume.image, model).data
            for value, dice in dice_per_structure(predicted, np.rint(volume.labels.data), values).items():
                if not math.isnan(dice):
                    scores[value].append(dice)
        metrics = {f"dice_{self.model_config.labels[v].lower().replace(' ', '_')}": float(np.mean(s)) for v, s in scores.items() if s}
        metrics["dice_mean"] = float(np.mean(list(metrics.values()))) if metrics else float("nan")
        return metrics

    def export(self, path: Path, metrics: dict[str, float]) -> None:
        info = {
            "step": self.step,
            "training_data": {"files": list(self.config.data), **self.subjects},
            "metrics": metrics,
            "train_config": self.config.to_dict(),
            "device": str(self.device),
        }
        save_segmenter(path, self.model_config, self.network, info)

    def _checkpoint(self) -> None:
        # The options, so that `calid train seg --resume` alone continues with them.
        extra = {"step": self.step, "best_dice": self.best_dice, "train_config": {**self.config.to_dict(), "stage": "seg"}}
        save_training_state(self.out / "checkpoints" / "last.safetensors", {"network": self.network}, {"optimizer": self.optimizer}, extra)

    def _resume(self) -> None:
        path = self.out / "checkpoints" / "last.safetensors"  # its presence was checked before any data was read
        extra = load_training_state(path, {"network": self.network}, {"optimizer": self.optimizer})
        self.step, self.best_dice = int(extra["step"]), float(extra["best_dice"])
        # The restored optimiser holds the checkpoint's weight decay; this run's options hold from now
        # on (the learning rate is set at every step from the schedule).
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.config.weight_decay

    def fit(self, until_step: int | None = None) -> dict[str, float]:
        """Train to ``config.steps`` (or stop early at ``until_step``, checkpointed, e.g. for time-limited jobs)."""
        last = self.config.steps if until_step is None else min(self.config.steps, until_step)
        (self.out / "checkpoints").mkdir(exist_ok=True)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._request_stop)
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        try:
            while self.step < last and not self.stop_requested:
                loss = self.train_step()
                if self.step % 50 == 0 or self.step == self.config.steps:
                    _append_csv(self.out / "log.csv", {"step": self.step, "loss": loss, "lr": self._learning_rate(), "seconds": round(time.perf_counter() - started, 1)})
                if self.step % self.config.validate_every == 0 or self.step == self.config.steps:
                    metrics = self.validate()
                    _append_csv(self.out / "validation.csv", {"step": self.step, **metrics})
                    self.export(self.out / "model.safetensors", metrics)
                    if metrics.get("dice_mean", -1.0) > self.best_dice:
                        self.best_dice = metrics["dice_mean"]
                        self.export(self.out / "best.safetensors", metrics)
                if self.step % self.config.checkpoint_every == 0 or self.step in (last, self.config.steps) or self.stop_requested:
                    self._checkpoint()
            if self.stop_requested:
                self._checkpoint()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return metrics


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
