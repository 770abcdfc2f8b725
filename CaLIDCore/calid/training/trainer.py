"""One trainer for both stages of CaLID: the VAE, then the latent interpolation denoiser.

Reads top to bottom: :class:`TrainConfig` holds every knob; :class:`Trainer`
prepares data (subject-level split, preprocessing cache), networks, optimiser
(Adam/AdamW, linear warm-up), EMA, mixed precision on CUDA and DDP under
``torchrun``; :meth:`Trainer.fit` runs the loop with validation, logging,
checkpoints and a graceful stop on SIGINT/SIGTERM. ``resume=True`` continues
from ``OUT/checkpoints/last.safetensors`` exactly (step, weights, optimiser,
EMA, LR schedule, grad scaler, random generators, data order).

Outputs in ``out_dir``: ``model.safetensors`` (EMA weights, loadable with
:func:`calid.models.load_model`), ``best.safetensors`` (best validation PSNR),
``log.csv``, ``validation.csv`` and ``checkpoints/last.safetensors``. In the
preprocessing cache (``cache_dir``, default ``out_dir/cache``): the preprocessed
subjects and, for the ldm stage, the training latents (``latents-*/``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler

from calid.data.datasets import (
    ClipDataset,
    SubjectVolume,
    TripletDataset,
    image_and_label_files,
    image_extent,
    is_packed_volumes,
    load_subjects,
    read_packed_volumes,
    split_subjects,
    subject_folder,
    subject_id,
    typical_pixel_spacing,
    volumes_from_stacks,
)
from calid.data.stack import fixed_placeholder_mm
from calid.diffusion.ddim import NoiseSchedule, interpolate_latent
from calid.device import resolve_device
from calid.errors import CalidError, InputError, TrainingDiverged
from calid.atomic import atomic_path
from calid.models.checkpoint import load_model, read_raw_header, save_model, subjects_learnt
from calid.models.config import ModelConfig, named_config
from calid.models.networks import CaLIDNet, FrameWiseAutoencoder, apply_floor_snap, build_vae, calibrate_floor_snap, inflate_to_temporal
from calid.models.registry import resolve_model, sha256_of
from calid.training.registered import MovedNeighbourTable
from calid.training.state import load_training_state, read_training_extra, save_training_state


@dataclass
class TrainConfig:
    """Every knob of a training run (saved with its checkpoints)."""

    stage: str  # "vae" or "ldm"
    data: tuple[str, ...]  # image files, folders, or "phantom:N" for N synthetic subjects
    out_dir: str
    model: str = "small"  # named configuration (vae stage); the ldm stage takes the VAE file's
    vae_model: str | None = None  # ldm stage: the trained VAE (model.safetensors of the vae stage)
    downsample_time: bool = False  # vae stage of a NAME-2d+t model: the paper's 3D autoencoder (time downsampled by f)
    temporal: bool = False  # ldm stage on a 2D VAE: a 2D+T denoiser over the 2D autoencoder applied frame by frame
    #: Fine-tuning: start the trained network from this model file (vae: a VAE or CaLID file's
    #: autoencoder; ldm: a CaLID file's denoiser, whose architecture the run then takes). Not used
    #: by a resumed run, which continues from its checkpoint.
    init_from: str | None = None
    steps: int = 20000
    batch_size: int = 32
    learning_rate: float = 1e-4
    optimizer: str = "adamw"  # or "adam"
    weight_decay: float = 0.0
    warmup_steps: int = 500
    #: After the warm-up: "constant", or "cosine" (down to 0 at ``steps``; for a resumed run the
    #: factor follows the global step, so lengthening --steps re-plans the rest of the decay).
    lr_schedule: str = "constant"
    #: Augmentation: swap the in-plane axes at random too (with the flips: all 8 rotations / reflections).
    transposes: bool = False
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"  # auto (bf16 on CUDA when supported, else fp32), fp32, bf16, fp16
    checkpoint_every: int = 1000
    validate_every: int = 500
    #: Stop (with a checkpoint and the exported model, like SIGTERM) after this many minutes of
    #: training in this process: for batch queues with a wall-time limit and lent machines.
    time_limit_minutes: float | None = None
    log_every: int = 25
    seed: int = 0
    num_workers: int = 0
    val_fraction: float = 0.15
    val_subjects: tuple[str, ...] | None = None
    gaps: tuple[int, ...] = (1,)
    swap_neighbours: bool = True
    max_val_batches: int = 8
    val_steps: int = 8  # DDIM steps for validation interpolation
    #: Pixel size assumed for files saved without geometry (1 x 1 x 1 mm): "median" of the others, "keep", or mm.
    placeholder_spacing: str = "median"
    cache_dir: str | None = None
    latent_cache_mb: int = 2048  # ldm stage: keep training latents in memory up to this size (0: encode every step)
    device: str = "auto"
    # VAE stage losses
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.002
    adversarial_weight: float = 0.005
    adversarial_start: int = 2000
    discriminator_learning_rate: float = 1e-4
    lpips_weights: str | None = None
    # denoiser options (ldm stage; None: the VAE file's configuration)
    concat_neighbour_latents: bool | None = None
    condition_dropout: float | None = None
    prediction: str | None = None
    residual_to_neighbours: bool | None = None
    registered_neighbours: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
        return cls(**kwargs)


def gather_volumes(entries: tuple[str, ...], model: ModelConfig, cache_dir: Path, placeholder_spacing: str | float = "median") -> list[SubjectVolume]:
    """Preprocessed subjects from files, folders, packed ``.npz`` files (``calid pack``) and ``phantom:N`` entries.

    ``placeholder_spacing``: the pixel size (mm) assumed for files saved without their
    geometry (all spacings exactly 1 mm); ``"median"`` takes the median of the files
    that have one, ``"keep"`` trusts the 1 mm.
    """
    from calid.data.phantom import PhantomConfig, make_phantom

    if len(set(entries)) < len(entries):  # `--data own own`: one entry, read once (the check below catches own and own/)
        warnings.warn(f"{len(entries) - len(set(entries))} --data entr(y/ies) given more than once, read once", stacklevel=2)
        entries = tuple(dict.fromkeys(entries))
    files: dict[str, list[Path]] = {}
    taken: set[Path] = set()
    repeated: list[Path] = []
    for entry in entries:
        if entry.startswith("phantom:") or is_packed_volumes(entry):
            continue
        if Path(entry).is_dir():
            group, left_out = image_and_label_files(entry)
            if left_out:
                shown = ", ".join(p.name for p in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
                warnings.warn(f"{entry}: {len(left_out)} label file(s) left out of training by their names ({shown})", stacklevel=2)
        elif Path(entry).is_file():
            group = [Path(entry)]
        else:
            raise InputError(entry, "training data not found (a file, a folder or phantom:N)")
        # A file named twice (`--data own own`, or a folder and a file in it) would count double.
        files[entry] = [f for f in group if f.resolve() not in taken]
        repeated += [f for f in group if f.resolve() in taken]
        taken.update(f.resolve() for f in group)
    if repeated:
        shown = ", ".join(str(p) for p in repeated[:3]) + (", ..." if len(repeated) > 3 else "")
        warnings.warn(f"{len(repeated)} file(s) given more than once in --data, read once ({shown})", stacklevel=2)
    roots = _subject_roots(files)
    assumed = fixed_placeholder_mm(placeholder_spacing, words=("median", "keep"))
    if str(placeholder_spacing).strip().lower() == "median":
        assumed = typical_pixel_spacing([f for group in files.values() for f in group])
    volumes: list[SubjectVolume] = []
    for entry in entries:
        if entry.startswith("phantom:"):
            count_text = entry.split(":", 1)[1]
            if not count_text.strip().isdigit():
                raise InputError(entry, "phantom:N needs a whole number of phantom subjects, e.g. phantom:4")
            count = int(count_text)
            stacks = [make_phantom(1000 + i, PhantomConfig(n_frames=6, matrix=96, pixel_spacing_mm=1.8)).sparse for i in range(count)]
            volumes.extend(volumes_from_stacks(stacks, model.preprocess))
        elif is_packed_volumes(entry):
            packed = read_packed_volumes(entry, model.preprocess)
            _check_packed_assumption(entry, packed, placeholder_spacing, assumed)
            volumes.extend(packed)
        else:
            volumes.extend(load_subjects(files[entry], model.preprocess, cache_dir=cache_dir, root=roots[entry], placeholder_spacing_mm=assumed))
    if not volumes:
        raise InputError(", ".join(entries), "no training images found")
    return volumes


def _subject_roots(files: dict[str, list[Path]]) -> dict[str, str | None]:
    """The folder each --data entry's subjects are named under (see :func:`subject_id`), with a warning
    where file names from different folders make one subject.

    A folder's subfolders are its subjects (``root/P001/sax.nii.gz``); files directly in a folder (or
    given one by one) are named by their file names. Subjects given one folder each with one generic
    file name (``--data P001/ P002/``, ``P*/sax.nii.gz``) would all be the subject ``sax``, and two
    sites' ``patient001`` one subject: either may be meant, so it is said, not guessed."""
    roots: dict[str, str | None] = {entry: entry if Path(entry).is_dir() else None for entry in files}
    folders_of: dict[str, set[Path]] = {}
    for entry, group in files.items():
        for path in group:
            if subject_folder(path, roots[entry]) is not None:
                continue  # named by its subfolder
            folders_of.setdefault(subject_id(path), set()).add(Path(os.path.abspath(path)).parent)
    merged = sorted(subject for subject, folders in folders_of.items() if len(folders) > 1)
    if merged:
        example = sorted(folders_of[merged[0]])
        warnings.warn(
            f"{len(merged)} subject name(s) come from files in different folders and are each taken as one subject by the file name "
            f"({', '.join(merged[:3])}{', ...' if len(merged) > 3 else ''}; '{merged[0]}' in {example[0]} and {example[1]}): if those are different "
            "subjects, give the folder above them as --data (one subfolder per subject), or rename the files",
            stacklevel=3,
        )
    return roots


def _check_packed_assumption(entry: str, packed: list[SubjectVolume], choice: str | float, assumed: float | None) -> None:
    """A packed file was resampled when it was packed: an explicit ``--placeholder-spacing`` that
    disagrees with what was assumed then cannot be applied, and is refused rather than ignored."""
    if str(choice).strip().lower() == "median":
        return  # the default: whatever the pack assumed stands

    def differs(packed_mm: float | None) -> bool:
        if packed_mm is None or assumed is None:
            return packed_mm is not assumed  # one kept 1 mm, the other a size
        return abs(packed_mm - assumed) > 1e-6

    differing = {v.assumed_spacing_mm for v in packed if v.without_geometry and differs(v.assumed_spacing_mm)}
    if differing:
        sizes = ", ".join(sorted("1 (kept)" if size is None else f"{size:g}" for size in differing))
        raise InputError(
            entry,
            f"its files without geometry were packed at {sizes} mm pixels; --placeholder-spacing {choice} cannot change a packed file: "
            f"pack the images again with --placeholder-spacing {choice}, or leave the option out",
        )


class LatentCache:
    """The frozen VAE's posterior means of training slices, kept in memory by key, and on disk.

    The ldm stage encodes three slices per triplet every step: on a CPU that is
    about 40 % of the step. The VAE is frozen and the augmentations are discrete
    (flips, transposes, neighbour swap), so every (volume, frame, slice, flips) key
    always encodes to the same latent: encode it once, reuse it in every later epoch.
    Memory is bounded; past ``max_bytes`` new keys are encoded but not kept.

    With ``folder`` set, the latents also go to disk in shards (:meth:`save_new`) and
    come back when a run starts (:meth:`load`), so a resumed run (on a CPU: every
    session) does not spend its first hours encoding again. The folder's name carries
    a signature of the VAE and the training data, so only valid latents are ever read.
    """

    SHARD_FORMAT = "calid-latent-cache-1"

    def __init__(self, encode: Any, max_bytes: int, folder: Path | None = None, signature: str = "") -> None:
        self.encode = encode
        self.max_bytes = max_bytes
        self.stored_bytes = 0
        self.latents: dict[tuple[int, ...], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.folder = folder
        self.signature = signature
        self._unsaved: list[tuple[int, ...]] = []

    def _keep(self, row: tuple[int, ...], z: torch.Tensor) -> bool:
        size = z.numel() * z.element_size()
        if row in self.latents or self.stored_bytes + size > self.max_bytes:
            return False
        self.latents[row] = z
        self.stored_bytes += size
        return True

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        rows = [tuple(int(v) for v in row) for row in keys.tolist()]
        missing = [i for i, row in enumerate(rows) if row not in self.latents]
        fresh: dict[tuple[int, ...], torch.Tensor] = {}
        if missing:
            # One encoder call for every uncached tensor of the batch (duplicates encode twice: rare).
            encoded = self.encode(images[missing]).float()
            fresh = {rows[i]: z for i, z in zip(missing, encoded)}
            for row, z in fresh.items():
                if self._keep(row, z.cpu()):
                    self._unsaved.append(row)
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        return torch.stack([fresh[row] if row in fresh else self.latents[row].to(images.device) for row in rows])

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)

    def save_new(self, min_count: int = 1) -> Path | None:
        """Write the latents kept since the last save as one new shard, if there are ``min_count``."""
        if self.folder is None or not self._unsaved or len(self._unsaved) < min_count:
            return None
        from safetensors.torch import save_file

        from calid.atomic import atomic_path

        rows = self._unsaved
        # A unique name: several runs (and the processes of one) may share this folder.
        path = self.folder / f"shard-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{random.SystemRandom().randrange(16**8):08x}.safetensors"
        tensors = {"keys": torch.tensor(rows, dtype=torch.long), "latents": torch.stack([self.latents[row] for row in rows]).contiguous()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"format": self.SHARD_FORMAT, "signature": self.signature})
        except (OSError, CalidError) as error:
            # A read-only shared cache or a full disk costs later runs their encodings, never this run.
            warnings.warn(f"latent cache: cannot write to {self.folder} ({error}); latents are no longer saved for later runs", stacklevel=2)
            self.folder = None
            return None
        self._unsaved = []
        return path

    def load(self) -> int:
        """Read every shard of the folder (up to ``max_bytes``); returns how many latents came in."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        from safetensors import safe_open
        from safetensors.torch import load_file

        loaded = 0
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata() or {}
                if metadata.get("format") != self.SHARD_FORMAT or metadata.get("signature") != self.signature:
                    continue
                tensors = load_file(str(path))
            except Exception:  # noqa: BLE001 - any unreadable shard (safetensors raises its own error type)
                continue  # a damaged shard only costs its encodings; never the run
            for row, z in zip(tensors["keys"].tolist(), tensors["latents"]):
                loaded += self._keep(tuple(int(v) for v in row), z.clone())
        return loaded


def latent_cache_signature(vae_file: str | os.PathLike[str], volumes: list[SubjectVolume], dataset: Any, encoder_precision: str = "fp32", moved_neighbours: str = "") -> str:
    """What a cached latent depends on: the VAE's weights, the training data (in the order the
    keys number it), what one item encodes (a slice, or a clip of a given length), the
    precision the encoder ran in (a bf16 latent is not an fp32 one) and, for a registration-guided
    model, the signature of the moved neighbours (their registration settings)."""
    import hashlib

    digest = hashlib.sha256()
    description = {"vae": sha256_of(vae_file), "dataset": type(dataset).__name__, "clip_length": getattr(dataset, "clip_length", None), "precision": encoder_precision}
    if moved_neighbours:
        description["moved_neighbours"] = moved_neighbours
    digest.update(json.dumps(description).encode())
    for volume in volumes:
        data = np.ascontiguousarray(volume.data)
        digest.update(f"{volume.subject}|{data.dtype}|{data.shape}".encode())
        digest.update(data.tobytes())
    return digest.hexdigest()


#: Consecutive steps with non-finite gradients (skipped) before training stops as diverged.
MAX_NON_FINITE_STEPS = 10


def learning_rate_factor(step: int, warmup: int, total: int, schedule: str = "constant") -> float:
    """Multiplier of the learning rate at ``step``: linear warm-up, then constant or cosine to 0 at ``total``."""
    factor = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "cosine" and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clipped: the scale every quality metric is computed on."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def frames_as_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) clips -> (B * T, C, H, W) images, for the 2D image metrics and losses; 4D passes through."""
    if x.dim() == 4:
        return x
    return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])


#: What a run leaves in its folder (the cache folder is not a run's: its contents are keyed by what they hold).
RUN_FILES = ("checkpoints/last.safetensors", "model.safetensors", "best.safetensors", "log.csv", "validation.csv")


def earlier_run_files(out: Path, overwrite: bool, inputs: tuple[str | None, ...] = ()) -> list[Path]:
    """The files of another run in ``out``, which a new run there would replace: refused without
    ``overwrite``; with it, returned for :func:`remove_run_files` once the new run is set up (a
    mistake found while setting up must not have cost the earlier run).

    Trained over, the earlier run's checkpoint and models would be replaced and its logs mixed with
    the new run's; hours of training are lost by a forgotten --resume. ``inputs``: files the new run
    reads (its --vae, --init-from), which must not be among those replaced."""
    earlier = [out / name for name in RUN_FILES if (out / name).is_file()]
    if not earlier:
        return []
    listed = ", ".join(path.relative_to(out).as_posix() for path in earlier)
    if not overwrite:
        if (out / RUN_FILES[0]).is_file():
            how = "continue it with --resume, train into another --out, or give --overwrite to start a new run there (its files are replaced)"
        else:  # stopped (killed) before its first checkpoint: nothing to resume
            how = "it has no checkpoint to resume (it stopped before its first one): give --overwrite to start afresh there, or train into another --out"
        raise InputError(out, f"holds an earlier run ({listed}): {how}")
    for given in inputs:
        if given and any(Path(given).resolve() == path.resolve() for path in earlier):
            raise InputError(given, f"is a file of the earlier run in {out}, which --overwrite would replace: copy it elsewhere first, or train into another --out")
    return earlier


def remove_run_files(files: list[Path], is_main: bool = True) -> None:
    if is_main:  # the only process that writes to the folder (under torchrun every process sees the same files)
        for path in files:
            path.unlink(missing_ok=True)


def validate_numbers(config: Any) -> None:
    """Numbers an optimiser or a schedule would take and fail on later, or silently misuse, refused by name."""
    checks = [
        ("--steps", config.steps, config.steps >= 1, "a positive number of steps"),
        ("--lr", config.learning_rate, config.learning_rate > 0 and math.isfinite(config.learning_rate), "a positive learning rate"),
        ("--weight-decay", config.weight_decay, config.weight_decay >= 0 and math.isfinite(config.weight_decay), "zero or positive"),
    ]
    if hasattr(config, "ema_decay"):
        checks.append(("--ema", config.ema_decay, 0.0 <= config.ema_decay < 1.0, "a decay from 0 (no averaging) up to, not including, 1 (e.g. 0.999)"))
    limit = getattr(config, "time_limit_minutes", None)
    if limit is not None:
        checks.append(("--time-limit", limit, limit > 0, "a positive number of minutes"))
    if hasattr(config, "warmup_steps"):
        checks.append(("--warmup", config.warmup_steps, config.warmup_steps >= 0, "zero or a positive number of steps"))
    for option, value, good, wanted in checks:
        if not good:
            raise InputError(option, f"must be {wanted}, got {value:g}")


class Trainer:
    """Trains one stage; see the module docstring."""

    def __init__(self, config: TrainConfig, resume: bool = False, overwrite: bool = False) -> None:
        out = Path(config.out_dir)
        new_folders = [folder for folder in [out, *out.parents] if not folder.exists()]  # innermost first
        try:
            self._set_up(config, resume, overwrite)
        except InputError:
            # Bad input (data, subjects, options) is found while setting up: the run folder this call made
            # holds nothing worth keeping, and would look like a run that can be resumed. Parent folders it
            # made go only when empty (another job may have started inside one meanwhile); an interrupted
            # set-up keeps its folder (its cache may hold an hour of registration); under torchrun the
            # other processes may still be writing, so it is left alone.
            if new_folders and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                shutil.rmtree(out, ignore_errors=True)
                for parent in new_folders[1:]:
                    try:
                        parent.rmdir()
                    except OSError:
                        break
            raise

    def _set_up(self, config: TrainConfig, resume: bool, overwrite: bool = False) -> None:
        if config.stage not in ("vae", "ldm"):
            raise InputError("stage", f"unknown training stage {config.stage!r}; use vae or ldm")
        self.init_from_given = config.init_from  # as the user named it (messages quote it so)
        if config.init_from:  # an installed model's name, like everywhere else a model is asked for
            config = dataclasses.replace(config, init_from=str(resolve_model(config.init_from)))
        self.config = config
        self.out = Path(config.out_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(config.device, self.local_rank)
        if self.world > 1 and self.device.type == "cuda" and self.device.index != self.local_rank:
            raise InputError(
                "--device", f"{config.device} under torchrun: each process trains on the GPU of its LOCAL_RANK (here cuda:{self.local_rank}); "
                "use --device auto or cuda, and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        checkpoint = self.out / "checkpoints" / "last.safetensors"
        # Checked before any data is read; the ldm stage also takes its architecture from it.
        if resume and not checkpoint.is_file():
            raise InputError(checkpoint, "no checkpoint to resume from (train without --resume first, or check --out)")
        validate_numbers(config)
        replaced = [] if resume else earlier_run_files(self.out, overwrite, (config.vae_model, config.init_from))
        resumed_extra = checkpoint_extra_for_stage(checkpoint, config.stage) if resume else None
        #: Ties the files a run exports to its checkpoints (a later run into the same folder is another run).
        self.run_id = str((resumed_extra or {}).get("run_id") or uuid.uuid4().hex)
        #: The time limit counts from here: data preparation is part of a queue's wall time too.
        self.started = time.perf_counter()
        if self.is_main:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._seed_everything(config.seed + self.rank)
        self.amp_dtype = self._amp_dtype()

        # ---- networks
        self.latent_scale = 1.0
        #: What a resumed run changed against its checkpoint: validation, learning rate, weight decay
        #: (printed by ``calid train``).
        self.resume_notes: list[str] = []
        self._initialised_from: dict[str, Any] | None = None
        self.autoencoder_subjects: list[str] = []
        if config.stage == "vae":
            self.model_config = named_config(config.model)
            if resumed_extra is not None and "model_config" in resumed_extra:
                trained = ModelConfig.from_dict(resumed_extra["model_config"]).name
                if trained != self.model_config.name:
                    raise InputError(
                        "--config", f"{config.model}: the run in {self.out} trains a {trained} network; resume it without --config, or train a {config.model} one into another --out"
                    )
            if config.downsample_time:
                if not self.model_config.temporal:
                    raise InputError("--downsample-time", f"applies to 2D+T models (--config NAME-2d+t), not {config.model!r}")
                self.model_config = self.model_config.replace(time_downsampling=True)
            self.vae: Any = build_vae(self.model_config).to(self.device)
            self.trained: nn.Module = self.vae
            initial = self._initial_weights(resume)
            if initial is not None and not resume:
                self._load_initial(self.vae, initial.vae)
        else:
            # Fine-tuning a CaLID model file: its own autoencoder, unless --vae names another.
            self.vae_file = str(config.vae_model or config.init_from or "")
            if not self.vae_file:
                raise InputError("--vae", "the ldm stage needs the trained VAE file (model.safetensors of the vae stage)")
            if not 1 <= config.val_steps <= 1000:
                raise InputError("--val-steps", f"must be from 1 to 1000 DDIM steps, got {config.val_steps}")
            loaded = load_model(self.vae_file, device=self.device)
            # The subjects the autoencoder learnt (the first stage, or every stage of a CaLID file given as --vae):
            # part of the model, so the exported file records them for `calid evaluate`'s held-out checks.
            self.autoencoder_subjects = sorted(subjects_learnt(loaded.info))
            initial = self._initial_weights(resume)
            if initial is not None and initial.net is None:
                raise InputError(config.init_from or "--init-from", "is a VAE file; the ldm stage starts from a CaLID model file (VAE and denoiser)")
            # A resumed run keeps its checkpoint's denoiser architecture, fine-tuning the starting
            # model's (unless an option below changes it; the resume check then refuses the change).
            if resumed_extra is not None:
                denoiser = ModelConfig.from_dict(resumed_extra["model_config"]).denoiser
            else:
                denoiser = initial.config.denoiser if initial is not None else loaded.config.denoiser
            changes: dict[str, Any] = {
                key: value
                for key, value in (
                    ("concat_neighbour_latents", config.concat_neighbour_latents),
                    ("condition_dropout", config.condition_dropout),
                    ("prediction", config.prediction),
                    ("residual_to_neighbours", config.residual_to_neighbours),
                    ("registered_neighbours", config.registered_neighbours),
                )
                if value is not None
            }
            vae_module: nn.Module = loaded.vae
            try:
                self.model_config = loaded.config.replace(denoiser=dataclasses.replace(denoiser, **changes))
                if config.temporal and not loaded.config.temporal and isinstance(loaded.vae, AutoencoderKL):
                    # A trained 2D autoencoder serves a 2D+T model that keeps every frame.
                    self.model_config = self.model_config.replace(temporal=True, time_downsampling=False, clip_length=8 if loaded.config.name == "tiny" else 32)
                    vae_module = FrameWiseAutoencoder(loaded.vae)
            except ValueError as error:  # options that do not go together (e.g. --registered-neighbours with --temporal)
                raise InputError("denoiser options", str(error)) from error
            if resumed_extra is not None and ModelConfig.from_dict(resumed_extra["model_config"]).denoiser != self.model_config.denoiser:
                # Refused before any data preparation (a registration-guided run registers every pair first).
                raise InputError(str(checkpoint), "the checkpoint was made with other denoiser options than this run's (resume with the options it was started with)")
            self.vae = vae_module.requires_grad_(False).eval()
            self.net = CaLIDNet(self.model_config).to(self.device)
            self.trained = self.net
            if initial is not None and initial.net is not None and not resume:
                self._load_initial(self.net, initial.net)
            self.schedule = NoiseSchedule(self.model_config.schedule)

        if resumed_extra is not None:
            self._refuse_another_autoencoder_or_optimiser(resumed_extra)  # before any data preparation

        # ---- data
        cache = Path(config.cache_dir) if config.cache_dir else self.out / "cache"
        with warnings.catch_warnings():
            if not self.is_main:  # every process reads the same data: under torchrun, its warnings are printed once, by rank 0
                warnings.simplefilter("ignore")
            volumes = gather_volumes(config.data, self.model_config, cache, config.placeholder_spacing)
            train_ids, val_ids = split_subjects([v.subject for v in volumes], config.val_fraction, config.seed, config.val_subjects)
            trained_earlier: list[str] = []
            if resumed_extra is not None:
                self._refuse_trained_validation_subjects(resumed_extra, checkpoint, train_ids, val_ids)  # before registration and encoding
                # The model has learnt every subject any session of the run trained on: the record keeps them
                # all, or a later resume (or `calid evaluate --subjects held-out`) could take one for held out.
                trained_earlier = sorted(set(resumed_extra.get("train_subjects") or []) - set(train_ids))
                if trained_earlier:
                    self.resume_notes.append(
                        f"{len(trained_earlier)} subject(s) trained on earlier in this run are not in this session's data "
                        f"({', '.join(trained_earlier[:5])}{' ...' if len(trained_earlier) > 5 else ''}): the model file still records them as trained on"
                    )
            else:
                # Validation subjects that the starting model or the autoencoder learnt would choose best.safetensors on seen data.
                seen_by_start = set(val_ids) & subjects_learnt(initial.info) if initial is not None else set()
                if seen_by_start:
                    warnings.warn(
                        f"--init-from {self.init_from_given}: the starting model was trained on {len(seen_by_start)} of this run's validation subjects "
                        f"({', '.join(sorted(seen_by_start))}); their scores are optimistic and best.safetensors is chosen on them: hold out subjects it never saw (--val-subjects)",
                        stacklevel=2,
                    )
                seen_by_autoencoder = sorted(set(val_ids) & set(self.autoencoder_subjects) - seen_by_start)
                if seen_by_autoencoder:
                    warnings.warn(
                        f"--vae {config.vae_model or config.init_from}: the autoencoder was trained on {len(seen_by_autoencoder)} of this run's validation subjects "
                        f"({', '.join(seen_by_autoencoder[:5])}{' ...' if len(seen_by_autoencoder) > 5 else ''}); their scores are optimistic and best.safetensors "
                        "is chosen on them: validate on the subjects the VAE held out (the same --val-subjects, or --val-fraction and --seed, as its run)",
                        stacklevel=2,
                    )
        train_volumes = [v for v in volumes if v.subject in set(train_ids)]
        val_volumes = [v for v in volumes if v.subject in set(val_ids)]
        self.train_set: TripletDataset
        if self.model_config.temporal:
            # 2D+T: clips starting at every frame (cyclic); validation on non-overlapping clips.
            clip = self.model_config.clip_length
            self.train_set = ClipDataset(train_volumes, clip_length=clip, gaps=config.gaps, swap_neighbours=config.swap_neighbours, seed=config.seed, transposes=config.transposes)
            self.val_set: TripletDataset = ClipDataset(val_volumes, clip_length=clip, gaps=(1,), flips=False, start_stride=clip)
        else:
            self.train_set = TripletDataset(train_volumes, gaps=config.gaps, swap_neighbours=config.swap_neighbours, seed=config.seed, transposes=config.transposes)
            self.val_set = TripletDataset(val_volumes, gaps=(1,), flips=False)
        # Validation scores the part of each crop inside the image, as `calid evaluate` does (the padding
        # of a small field of view would raise every score alike). Validation items are never turned.
        self.val_extents = [image_extent(volume.data) for volume in self.val_set.volumes]
        if not train_ids:
            raise InputError(", ".join(config.data), f"every subject ({len(val_ids)}) is a validation subject: none is left to train on (check --val-subjects or --val-fraction)")
        if len(self.train_set) < config.batch_size * self.world:
            most_slices = max((v.data.shape[-3] for v in train_volumes), default=0)
            too_far = [g for g in config.gaps if 2 * g + 1 > most_slices]
            hint = f" (--gaps {','.join(map(str, too_far))}: a gap of g slices needs stacks of 2g + 1 slices; the most here is {most_slices})" if too_far else ""
            raise InputError(", ".join(config.data), f"only {len(self.train_set)} training triplets for a batch of {config.batch_size} x {self.world} process(es){hint}")
        self.data_description: dict[str, Any] = {
            "inputs": list(config.data),
            "train_subjects": list(train_ids) + trained_earlier,
            "validation_subjects": val_ids,
            "train_triplets": len(self.train_set),
            "validation_triplets": len(self.val_set),
            "preprocess": self.model_config.preprocess.to_dict(),
        }
        if self._initialised_from is not None:
            self.data_description["initialised_from"] = self._initialised_from
        if self.autoencoder_subjects:
            self.data_description["autoencoder"] = {"file": Path(self.vae_file).name, "train_subjects": self.autoencoder_subjects}
        assumed = sorted({v.assumed_spacing_mm for v in volumes if v.assumed_spacing_mm is not None})
        if assumed:
            self.data_description["placeholder_spacing"] = {
                "note": "these files carry no geometry (1 x 1 x 1 mm); their pixels were taken as assumed_mm",
                "assumed_mm": assumed[0] if len(assumed) == 1 else assumed,
                "subjects": sorted({v.subject for v in volumes if v.assumed_spacing_mm is not None}),
            }

        #: Registration-guided models: seconds spent registering the training pairs (0 when read from the cache).
        self.registration_seconds = 0.0
        moved_signature = ""
        if config.stage == "ldm" and self.model_config.denoiser.registered_neighbours:
            moved_signature = self._move_neighbours(train_volumes, val_volumes, cache)
        self.latent_cache: LatentCache | None = None
        self.latents_loaded = 0
        if config.stage == "ldm":
            if initial is not None and initial.net is not None and not resume and _same_weights(self.vae, initial.vae):
                # The starting denoiser learnt latents at its model's scale: keep it, or its inputs
                # would be rescaled under it by the new data's statistics.
                self.latent_scale = float(initial.latent_scale)
            else:
                self.latent_scale = self._measure_latent_scale()
            if self.model_config.vae.floor_snap == 0:  # a VAE file exported before the calibration existed
                self.model_config = _with_floor_snap(self.model_config, calibrate_floor_snap(self.vae, self._calibration_images()))
            if config.latent_cache_mb > 0:
                signature = latent_cache_signature(self.vae_file, train_volumes, self.train_set, "fp32", moved_signature)
                self.latent_cache = LatentCache(self._encode_unscaled, config.latent_cache_mb * 2**20, cache / f"latents-{signature[:16]}", signature)
                #: Latents read from earlier runs' shards (printed by ``calid train``).
                self.latents_loaded = self.latent_cache.load()

        # ---- optimisation
        self.model = DistributedDataParallel(self.trained, device_ids=[self.device.index] if self.device.type == "cuda" else None) if self.world > 1 else self.trained
        self.optimizer = self._make_optimizer(self.trained.parameters(), config.learning_rate)
        if config.lr_schedule not in ("constant", "cosine"):
            raise InputError("--lr-schedule", f"unknown schedule {config.lr_schedule!r}; use constant or cosine")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(learning_rate_factor, warmup=config.warmup_steps, total=config.steps, schedule=config.lr_schedule))
        self.ema = AveragedModel(self.trained, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.discriminator: nn.Module | None = None
        if config.stage == "vae":
            from calid.evaluation.lpips import LPIPS

            self.perceptual = LPIPS(config.lpips_weights).to(self.device) if config.perceptual_weight > 0 else None
            if config.adversarial_weight > 0:
                # 2D+T clips are judged frame by frame: short clips are too thin for a 3D patch critic.
                disc = PatchDiscriminator(spatial_dims=2, num_layers_d=3, channels=64, in_channels=1, out_channels=1).to(self.device)
                self.discriminator = disc
                self.disc_model = DistributedDataParallel(disc, device_ids=[self.device.index] if self.device.type == "cuda" else None) if self.world > 1 else disc
                self.disc_optimizer = self._make_optimizer(disc.parameters(), config.discriminator_learning_rate)
                self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.step = 0
        self._floor_snap_step: tuple[int, float] = (-1, 0.0)  # (step, value) of the last VAE floor calibration
        self.best_psnr = -math.inf
        self.validated_this_session = False
        self.stop_requested = False
        #: The signal that stopped the run (None: not stopped by a signal of this process's own).
        self.stop_signal: int | None = None
        self.time_limit_reached = False
        self.non_finite_in_a_row = 0
        if resume:
            self._resume()
        remove_run_files(replaced, self.is_main)  # --overwrite: only now that the new run is set up

    # ------------------------------------------------------------------ setup helpers
    def _move_neighbours(self, train_volumes: list[SubjectVolume], val_volumes: list[SubjectVolume], cache: Path) -> str:
        """Give both datasets their neighbours moved to the middle (registration-guided models);
        returns the training table's signature. Under torchrun rank 0 registers the pairs and the
        other processes read its cache file (a barrier could time out over a long registration)."""
        pixel_mm = float(self.model_config.preprocess.target_spacing_mm or 1.0)

        def report(done: int, total: int) -> None:
            print(f"registering the training pairs (registration-guided model): {done}/{total}", flush=True)

        if self.world > 1 and not self.is_main:
            expected = MovedNeighbourTable(train_volumes, pixel_mm).signature(self.train_set.index)
            while not MovedNeighbourTable.file_in(cache, expected).is_file():
                time.sleep(2.0)  # rank 0 is still registering (if it fails, torchrun stops every process)
        # The other ranks read rank 0's file (the file is written atomically; if unreadable they register themselves).
        table = MovedNeighbourTable(train_volumes, pixel_mm, self.train_set.index, cache_folder=cache, progress=report if self.is_main else None)
        if self.world > 1 and self.is_main and not (table.loaded_from_cache or table.saved):
            raise InputError(str(cache), "the other training processes read the registered pairs from this cache folder, which cannot be written (see the warning); use --cache-dir")
        self.registration_seconds = table.seconds
        self.train_set.moved_neighbours = table
        self.val_set.moved_neighbours = MovedNeighbourTable(val_volumes, pixel_mm)  # moved when first drawn
        # The engine registers with these settings too (read back from the model file).
        self.data_description["moved_neighbours"] = {"pixel_mm": pixel_mm, "registration": table.settings.to_dict()}
        return table.key

    def _initial_weights(self, resume: bool) -> Any:
        """The model file to fine-tune from (``init_from``), or None. A resumed run reads it only for
        its architecture (the same as the checkpoint's): its weights come from the checkpoint."""
        if not self.config.init_from:
            return None
        if resume:
            self.resume_notes.append(f"--init-from {self.init_from_given}: its weights are not used, a resumed run continues from its checkpoint")
        initial = load_model(self.config.init_from, device=self.device)
        # Provenance for the exported model's card (the file name only: no paths of this machine).
        self._initialised_from = {"file": Path(self.config.init_from).name, "sha256": sha256_of(self.config.init_from)}
        learnt = subjects_learnt(initial.info)
        if learnt:  # so that an evaluation of the fine-tuned model can tell which subjects it has seen
            self._initialised_from["train_subjects"] = sorted(learnt)
        return initial

    def _load_initial(self, network: nn.Module, source: nn.Module) -> None:
        """Copy a model file's weights into the network to train; the architectures must match,
        except that a 2D denoiser can start a 2D+T one (its kernels inflated over time)."""
        try:
            state = source.state_dict()
            if isinstance(network, CaLIDNet) and isinstance(source, CaLIDNet) and network.config.temporal and not source.config.temporal:
                state = inflate_to_temporal(state, network)
            network.load_state_dict(state)
        except (RuntimeError, ValueError) as error:
            raise InputError(
                self.config.init_from or "--init-from",
                f"its {'denoiser' if network is getattr(self, 'net', None) else 'autoencoder'} does not fit this run's network "
                f"({_first_problem(error)}); use the same --config and denoiser options as the model was trained with",
            ) from error
        if isinstance(network, CaLIDNet) and isinstance(source, CaLIDNet) and network.config.denoiser.residual_to_neighbours and not source.config.denoiser.residual_to_neighbours:
            # The starting model predicts the whole latent; this run predicts the correction to the
            # neighbours' mean. Its output layer, zeroed as a fresh network's is, makes the fine-tune
            # start from that mean (the latent-linear or, with moved neighbours, the registration
            # slice) instead of from twice the latent, and keeps every learnt feature.
            output_layer = network.unet.out[-1]
            with torch.no_grad():
                for parameter in output_layer.parameters():
                    parameter.zero_()
            self.resume_notes.append(f"--init-from {self.init_from_given}: it predicts the whole latent; its output layer starts at zero, so this run starts from the neighbours' mean")

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _amp_dtype(self) -> torch.dtype | None:
        precision = self.config.precision
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InputError("--precision", f"unknown precision {precision!r}")
        if self.device.type != "cuda" or precision == "fp32":
            return None
        if precision == "auto":  # native bf16 only: emulated bf16 (pre-Ampere GPUs) is slower than fp16
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16

    def _make_optimizer(self, parameters: Iterator[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if self.config.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=lr, weight_decay=self.config.weight_decay)
        if self.config.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=lr, weight_decay=self.config.weight_decay)
        raise InputError("--optimizer", f"unknown optimizer {self.config.optimizer!r}; use adam or adamw")

    @torch.no_grad()
    def _encode_unscaled(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior means, always in fp32: the training step runs under autocast, but the latent
        scale, validation and inference encode in fp32, and the latent cache keeps these for later runs."""
        with torch.autocast(self.device.type, enabled=False):
            z_mu, _ = self.vae.encode(images.float())
        return z_mu.float()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior means, scaled (the latent the denoiser works on)."""
        return self._encode_unscaled(images) * self.latent_scale

    @torch.no_grad()
    def _measure_latent_scale(self) -> float:
        """1 / std of the training latents, so the denoiser sees unit-variance latents."""
        generator = torch.Generator().manual_seed(self.config.seed)
        count = min(len(self.train_set), 512)
        indices = torch.randperm(len(self.train_set), generator=generator)[:count].tolist()
        latents = []
        for start in range(0, count, 64):
            batch = torch.stack([self.train_set[i]["middle"] for i in indices[start : start + 64]]).to(self.device)
            latents.append(self.vae.encode(batch)[0].float().cpu())
        std = float(torch.cat(latents).std())
        if self.world > 1:  # every rank must use the same scale
            value = torch.tensor([std], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(value, src=0)
            std = float(value.item())
        if not math.isfinite(std) or std <= 0:
            raise TrainingDiverged(f"the autoencoder's training latents have no usable spread (std {std}); check the VAE file")
        return 1.0 / max(std, 1e-6)

    def _calibration_images(self) -> torch.Tensor:
        """A fixed sample of training images (never validation ones) for calibrating the decoder's floor."""
        count = min(len(self.train_set), 16 if self.model_config.temporal else 256)
        indices = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.config.seed + 1))[:count].tolist()
        return torch.stack([self.train_set[i]["middle"] for i in indices]).to(self.device)

    # ------------------------------------------------------------------ data order
    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the current step on, in the same order as an uninterrupted run."""
        sampler: DistributedSampler[Any] = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.config.seed, drop_last=True)
        per_epoch = len(sampler) // self.config.batch_size
        epoch, offset = divmod(self.step, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            indices = list(iter(sampler))
            batches = [indices[i * self.config.batch_size : (i + 1) * self.config.batch_size] for i in range(offset, per_epoch)]
            # A private generator: creating a loader iterator must not draw from the global
            # RNG, or a resumed run (which creates it mid-epoch) would drift from the original.
            workers_seed = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
            loader = DataLoader(
                self.train_set, batch_sampler=batches, num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda", generator=workers_seed,
                worker_init_fn=_leave_signals_to_the_trainer if self.config.num_workers > 0 else None,
            )
            yield from loader
            epoch, offset = epoch + 1, 0

    # ------------------------------------------------------------------ losses
    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _vae_losses(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        cfg = self.config
        reconstruction, z_mu, z_sigma = self.model(images)
        l1 = (reconstruction.float() - images).abs().mean()
        kl = 0.5 * (z_mu.float().pow(2) + z_sigma.float().pow(2) - torch.log(z_sigma.float().pow(2) + 1e-12) - 1.0).sum(dim=tuple(range(1, z_mu.dim()))).mean()
        loss = l1 + cfg.kl_weight * kl
        logs = {"l1": l1.item(), "kl": kl.item()}
        if self.perceptual is not None:
            perceptual = self.perceptual(frames_as_images(reconstruction.float()), frames_as_images(images)).mean()
            loss = loss + cfg.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.item()
        if self.discriminator is not None and self.step >= cfg.adversarial_start:
            # The plain discriminator: its gradients are not needed here (no DDP all-reduce).
            generator_adv = self.adversarial(self.discriminator(frames_as_images(reconstruction.float()))[-1], target_is_real=True, for_discriminator=False)
            loss = loss + cfg.adversarial_weight * generator_adv
            logs["adversarial"] = generator_adv.item()
        return loss, logs, reconstruction

    def _encode_training(self, images: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        """Scaled posterior means of training tensors, from the latent cache where possible."""
        if self.latent_cache is None or keys is None:
            return self._encode(images)
        return self.latent_cache(images, keys) * self.latent_scale

    def _ldm_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        previous, middle, following = (batch[k].to(self.device, non_blocking=True) for k in ("previous", "middle", "next"))
        keys = batch.get("keys")  # (B, 3, 4): previous, middle, next
        neighbour_latents = None
        if self.model_config.denoiser.concat_neighbour_latents:
            # The three slices in one encoder call.
            stacked_keys = None if keys is None else keys.transpose(0, 1).reshape(-1, keys.shape[-1])
            z_prev, z0, z_next = self._encode_training(torch.cat([previous, middle, following]), stacked_keys).chunk(3)
            neighbour_latents = torch.cat([z_prev, z_next], dim=1)
        else:
            z0 = self._encode_training(middle, None if keys is None else keys[:, 1])
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.schedule.num_train_timesteps, (z0.shape[0],), device=self.device)
        z_t = self.schedule.add_noise(z0, noise, t)
        keep = None
        if self.model_config.denoiser.condition_dropout > 0:
            keep = (torch.rand(z0.shape[0], device=self.device) >= self.model_config.denoiser.condition_dropout).float()
        output = self.model(z_t, t, torch.cat([previous, following], dim=1), neighbour_latents, keep)
        target = self.schedule.training_target(z0, noise, t, self.model_config.denoiser.prediction)
        loss = (output.float() - target).pow(2).mean()
        return loss, {"mse": loss.item()}

    def _optimise(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: Any) -> float:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
        finite = bool(torch.isfinite(norm))
        if finite or self.scaler.is_enabled():  # fp16: the scaler itself skips a non-finite step and lowers its scale
            self.scaler.step(optimizer)
            if finite:
                self.non_finite_in_a_row = 0
            return float(norm)
        # bf16 / fp32: a NaN or inf gradient would make every weight (and the EMA) NaN from here on.
        # The step is skipped; every rank sees the same all-reduced norm, so all skip together.
        self.non_finite_in_a_row += 1
        if self.non_finite_in_a_row >= MAX_NON_FINITE_STEPS:
            raise TrainingDiverged(
                f"{MAX_NON_FINITE_STEPS} steps in a row had non-finite gradients (step {self.step}); the weights were not changed by them and the last "
                "checkpoint is intact. Resume with a lower --lr, --precision fp32, or check the data"
            )
        return float(norm)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        self.model.train()
        with self._autocast():
            if self.config.stage == "vae":
                images = batch["middle"].to(self.device, non_blocking=True)
                loss, logs, reconstruction = self._vae_losses(images)
            else:
                loss, logs = self._ldm_loss(batch)
        logs["grad_norm"] = self._optimise(loss, self.optimizer, self.trained.parameters())
        if self.config.stage == "vae" and self.discriminator is not None and self.step >= self.config.adversarial_start:
            with self._autocast():
                # One forward for fake and real: DDP allows a module one forward per backward.
                fake_images, real_images = frames_as_images(reconstruction.detach().float()), frames_as_images(images)
                logits = self.disc_model(torch.cat([fake_images, real_images]))[-1]
                fake, real = logits[: fake_images.shape[0]], logits[fake_images.shape[0] :]
                disc_loss = 0.5 * (self.adversarial(fake, target_is_real=False, for_discriminator=True) + self.adversarial(real, target_is_real=True, for_discriminator=True))
            self._optimise(disc_loss, self.disc_optimizer, self.discriminator.parameters())
            logs["discriminator"] = disc_loss.item()
        self.scaler.update()
        self.scheduler.step()
        self.ema.update_parameters(self.trained)
        logs["loss"] = loss.item()
        logs["lr"] = float(self.scheduler.get_last_lr()[0])
        return logs

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and PSNR / SSIM (on [0, 1]) of the validation subjects, with the EMA weights."""
        if len(self.val_set) == 0:
            return {}
        ema: Any = self.ema.module.eval()
        generator = torch.Generator().manual_seed(12345)
        order = torch.randperm(len(self.val_set), generator=generator).tolist()
        psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0)
        losses: list[float] = []
        psnr_values: list[torch.Tensor] = []
        ssim_values: list[torch.Tensor] = []
        for start in range(0, min(len(order), self.config.max_val_batches * self.config.batch_size), self.config.batch_size):
            items = [self.val_set[i] for i in order[start : start + self.config.batch_size]]
            previous, middle, following = (torch.stack([it[k] for it in items]).to(self.device) for k in ("previous", "middle", "next"))
            if self.config.stage == "vae":
                z_mu, _ = ema.encode(middle)
                prediction = ema.decode(z_mu)
                losses.append(float((prediction - middle).abs().mean()))
            else:
                z0 = self._encode(middle)
                condition = torch.cat([previous, following], dim=1)
                z_prev, z_next = self._encode(previous), self._encode(following)
                neighbour_latents = torch.cat([z_prev, z_next], dim=1) if self.model_config.denoiser.concat_neighbour_latents else None
                noise = torch.randn(z0.shape, generator=generator).to(self.device)
                t = torch.randint(0, self.schedule.num_train_timesteps, (z0.shape[0],), generator=generator).to(self.device)
                output = ema(self.schedule.add_noise(z0, noise, t), t, condition, neighbour_latents)
                losses.append(float((output - self.schedule.training_target(z0, noise, t, self.model_config.denoiser.prediction)).pow(2).mean()))

                def bound(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
                    return ema(x, steps, condition, neighbour_latents)

                z = interpolate_latent(bound, z_prev, z_next, self.schedule, "calid", self.config.val_steps, generator, self.model_config.denoiser.prediction)
                prediction = apply_floor_snap(self.vae.decode(z / self.latent_scale).float().clamp(-1.0, 1.0), self.model_config.vae.floor_snap)
            # Per-item values inside the image, averaged here: MONAI's aggregate() would all-gather
            # across ranks, and only rank 0 validates.
            for index, item in enumerate(items):
                rows, columns = self.val_extents[int(item["keys"][0, 0])]
                predicted, truth = to_unit(prediction[index : index + 1, ..., rows, columns]), to_unit(middle[index : index + 1, ..., rows, columns])
                psnr_values.append(torch.as_tensor(psnr(predicted, truth)).flatten().cpu())
                if min(truth.shape[-2:]) >= 11:  # MONAI's SSIM window
                    ssim_values.append(torch.as_tensor(ssim(frames_as_images(predicted), frames_as_images(truth))).flatten().cpu())
        ssim_mean = float(torch.cat(ssim_values).mean()) if ssim_values else float("nan")
        return {"val_loss": float(np.mean(losses)), "val_psnr": float(torch.cat(psnr_values).mean()), "val_ssim": ssim_mean}

    # ------------------------------------------------------------------ checkpoints
    def export(self, path: Path, metrics: dict[str, float] | None = None) -> None:
        """A model file with the EMA weights (what users load)."""
        info = {"stage": self.config.stage, "step": self.step, "run_id": self.run_id, "training_data": self.data_description, "metrics": metrics or {}, "train_config": self.config.to_dict()}
        if self.config.stage == "vae":
            # The floor of the decoder as it is now (the ldm stage inherits it with the file);
            # once per step, though a step may export both best and model files.
            if self._floor_snap_step[0] != self.step:
                self._floor_snap_step = (self.step, calibrate_floor_snap(self.ema.module.eval(), self._calibration_images()))
            save_model(path, _with_floor_snap(self.model_config, self._floor_snap_step[1]), self.ema.module, None, 1.0, info)
        else:
            # Validated (and picked) at val_steps: what the engine should use unless told otherwise.
            save_model(path, self.model_config.replace(default_steps=self.config.val_steps), self.vae, self.ema.module, self.latent_scale, info)

    def save_checkpoint(self) -> Path:
        path = self.out / "checkpoints" / "last.safetensors"
        modules = {"model": self.trained, "ema": self.ema}
        optimizers = {"optimizer": self.optimizer}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
            optimizers["disc_optimizer"] = self.disc_optimizer
        save_training_state(
            path,
            modules=modules,
            optimizers=optimizers,
            extra={
                "step": self.step,
                "best_psnr": self.best_psnr if math.isfinite(self.best_psnr) else None,
                "validation": self.validation_signature(),
                "latent_scale": self.latent_scale,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "train_config": self.config.to_dict(),
                "model_config": self.model_config.to_dict(),
                "initialised_from": self.data_description.get("initialised_from"),
                "train_subjects": self.data_description["train_subjects"],
                "run_id": self.run_id,
                "autoencoder_weights": self.autoencoder_digest(),
                "processes": self.world,
            },
        )
        return path

    def autoencoder_digest(self) -> str | None:
        """A digest of the frozen autoencoder's weights (ldm stage): a denoiser learns the latents
        of one autoencoder, so a resumed run must encode with the same one. Of the weights, not
        of the file, whose header changes each time a VAE run re-exports it."""
        if self.config.stage != "ldm":
            return None
        if getattr(self, "_autoencoder_digest", None) is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.vae.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._autoencoder_digest = digest.hexdigest()
        return self._autoencoder_digest

    def validation_signature(self) -> dict[str, Any]:
        """What the validation numbers depend on besides the weights: a resumed run whose
        signature differs cannot compare its scores with the checkpoint's best."""
        return json.loads(json.dumps({  # as stored in a checkpoint (tuples become lists)
            "val_steps": self.config.val_steps,
            "max_val_batches": self.config.max_val_batches,
            "batch_size": self.config.batch_size,  # which triplets are scored, and with which noise
            "subjects": self.data_description["validation_subjects"],
            "triplets": self.data_description["validation_triplets"],
            "preprocess": self.data_description["preprocess"],
            "placeholder_spacing": self.data_description.get("placeholder_spacing"),
            "scored": "inside the image",  # earlier runs scored the whole crop, padding included
        }))

    def _resume(self) -> None:
        path = self.out / "checkpoints" / "last.safetensors"  # its presence was checked before any data was read
        modules = {"model": self.trained, "ema": self.ema}
        optimizers = {"optimizer": self.optimizer}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
            optimizers["disc_optimizer"] = self.disc_optimizer
        extra = load_training_state(path, modules, optimizers)
        processes = extra.get("processes")
        if processes is not None and int(processes) != self.world:
            # --batch-size is per process: the batch each step averages over changes with their number.
            before = int((extra.get("train_config") or {}).get("batch_size", self.config.batch_size))
            batch = self.config.batch_size
            self.resume_notes.append(
                f"processes: {processes} in the checkpoint, {self.world} from now on: {before} x {processes} = {before * int(processes)} "
                f"slices per step before, {batch} x {self.world} = {batch * self.world} from now on (--batch-size is per process)"
            )
        saved_config = _with_floor_snap(ModelConfig.from_dict(extra["model_config"]), 0.0)  # a calibration, not the architecture
        if self.config.stage == "vae":
            # The autoencoder's run does not build the denoiser: a later change to the named
            # configuration's denoiser (or its schedule) must not stop it from resuming.
            saved_config = saved_config.replace(denoiser=self.model_config.denoiser, schedule=self.model_config.schedule, default_steps=self.model_config.default_steps)
        if saved_config != _with_floor_snap(self.model_config, 0.0):
            raise InputError(path, "the checkpoint was made with another model configuration than this run's")
        self.step = int(extra["step"])
        self._note_changed_options(extra)
        if self.world > 1:
            # Only rank 0's random states are saved: restored on every rank, they would give all
            # ranks the same noise and dropout draws. Each rank reseeds from (seed, rank, step).
            self._seed_everything(self.config.seed + self.rank + 7919 * self.step)
        self.best_psnr = extra["best_psnr"] if extra.get("best_psnr") is not None else -math.inf
        saved_validation = extra.get("validation")
        if isinstance(saved_validation, dict) and "batch_size" not in saved_validation:  # checkpoints from before it was recorded
            saved_validation = {**saved_validation, "batch_size": (extra.get("train_config") or {}).get("batch_size")}
        if saved_validation != self.validation_signature() and math.isfinite(self.best_psnr):
            # A best score measured on other triplets, steps or preprocessing would keep every new
            # (and possibly better) model from being saved as best.safetensors.
            self.resume_notes.append(
                f"validation differs from the checkpoint's (steps, subjects or preprocessing): its best PSNR "
                f"{self.best_psnr:.2f} dB is not comparable, so best.safetensors starts afresh"
            )
            self.best_psnr = -math.inf
        elif saved_validation == self.validation_signature():
            # This run's best.safetensors may have been written at or after the last checkpoint (a crash, a
            # stop by force): its score stands, or a replayed, worse validation would replace it.
            self.best_psnr = max(self.best_psnr, _recorded_val_psnr(self.out / "best.safetensors", extra.get("run_id"), after_step=self.step))
        if self.is_main:
            for log in (self.out / "log.csv", self.out / "validation.csv"):
                _drop_rows_after(log, self.step)  # those steps are trained again
        self.latent_scale = float(extra["latent_scale"])
        if extra.get("initialised_from") and "initialised_from" not in self.data_description:
            self.data_description["initialised_from"] = extra["initialised_from"]  # resumed without --init-from
        self.scheduler.load_state_dict(extra["scheduler"])
        if extra["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(extra["scaler"])
        elif self.scaler.is_enabled():  # the checkpoint trained in bf16 or fp32: the scale starts afresh
            self.resume_notes.append("fp16 loss scaling starts afresh (the checkpoint was not trained in fp16)")
        # Loading an optimiser's state also restores its saved hyper-parameters: without this, a
        # resumed run would silently ignore a changed --lr or --weight-decay.
        self._apply_hyperparameters(self.optimizer, self.config.learning_rate, "learning rate", self.scheduler)
        if self.discriminator is not None:
            self._apply_hyperparameters(self.disc_optimizer, self.config.discriminator_learning_rate, "discriminator learning rate")

    def _refuse_another_autoencoder_or_optimiser(self, extra: dict[str, Any]) -> None:
        """A resume that would spoil the run: another autoencoder (the denoiser learnt one's
        latents) or another optimiser (its saved state would run on as the old one)."""
        recorded_autoencoder = extra.get("autoencoder_weights")
        if recorded_autoencoder is not None and recorded_autoencoder != self.autoencoder_digest():
            raise InputError(
                getattr(self, "vae_file", "") or "--vae",
                f"is not the autoencoder this run trained on until step {extra.get('step')} (its weights differ; a VAE run re-exports "
                f"model.safetensors as it trains): resume with the VAE file the run started with (each model file of this run holds it: "
                f"--vae {self.out / 'model.safetensors'}), or train into a new --out",
            )
        saved = extra.get("train_config") or {}
        if saved.get("optimizer") not in (None, self.config.optimizer):
            raise InputError("--optimizer", f"the checkpoint trained with {saved['optimizer']}; resume with --optimizer {saved['optimizer']}")

    def _refuse_trained_validation_subjects(self, extra: dict[str, Any], path: Path, train_ids: list[str], val_ids: list[str]) -> None:
        """Validation subjects that the run trained on (another --seed, --data, --val-fraction or
        --val-subjects) would no longer be held out."""
        trained_on = set(extra.get("train_subjects") or [])
        if not trained_on:
            earlier_validation = (extra.get("validation") or {}).get("subjects")
            if earlier_validation is None:  # checkpoints from before either was recorded: nothing to compare with
                self.resume_notes.append("the checkpoint does not record its subjects: check that the validation subjects are the same as before")
                return
            trained_on = (set(train_ids) | set(val_ids)) - set(earlier_validation)  # the data's subjects that did not validate then
        leaked = sorted(trained_on & set(val_ids))
        if leaked:
            raise InputError(
                path,
                f"validation subject(s) {', '.join(leaked[:5])}{' ...' if len(leaked) > 5 else ''} were training subjects of this run: "
                "their scores would not be held out. Resume with the run's own --data, --seed, --val-fraction and --val-subjects, or train into a new --out",
            )

    def _note_changed_options(self, extra: dict[str, Any]) -> None:
        """Every other option that differs from the checkpoint's, said (resume with the same command)."""
        saved = extra.get("train_config") or {}
        # Options a run may change when it resumes (the learning rate and weight decay are noted where they are applied).
        free = {"out_dir", "steps", "time_limit_minutes", "device", "num_workers", "checkpoint_every", "validate_every", "log_every",
                "cache_dir", "latent_cache_mb", "init_from", "vae_model", "lpips_weights", "learning_rate", "weight_decay", "batch_size",
                "val_subjects", "val_fraction", "model", "optimizer",  # checked above and by the architecture check
                "val_steps", "max_val_batches"}  # a changed validation is said by its own note
        current = json.loads(json.dumps(self.config.to_dict()))  # as stored (tuples become lists)
        denoiser_options = {"concat_neighbour_latents", "condition_dropout", "prediction", "residual_to_neighbours", "registered_neighbours"}
        for name in ("steps", "batch_size"):  # free to change, and worth saying
            if name in saved and saved[name] != current[name]:
                stretched = " (the cosine learning-rate decay now ends there)" if name == "steps" and current.get("lr_schedule") == "cosine" else ""
                self.resume_notes.append(f"{name.replace('_', ' ')}: {saved[name]!r} in the checkpoint, {current[name]!r} from now on{stretched}")
        for name in sorted(set(saved) & set(current) - free):
            if name in denoiser_options and current[name] is None:
                continue  # not given: the checkpoint's denoiser keeps its own
            if saved[name] != current[name]:
                self.resume_notes.append(f"{name.replace('_', ' ')}: {saved[name]!r} in the checkpoint, {current[name]!r} from now on")

    def _apply_hyperparameters(self, optimizer: torch.optim.Optimizer, learning_rate: float, what: str,
                               scheduler: torch.optim.lr_scheduler.LambdaLR | None = None) -> None:
        """Give a restored optimiser this run's peak learning rate and weight decay, noting changes."""
        group = optimizer.param_groups[0]
        old_lr, old_decay = group.get("initial_lr", group["lr"]), group["weight_decay"]
        if old_lr != learning_rate:
            self.resume_notes.append(f"{what} {old_lr:g} in the checkpoint, {learning_rate:g} from now on")
        if old_decay != self.config.weight_decay and what == "learning rate":
            self.resume_notes.append(f"weight decay {old_decay:g} in the checkpoint, {self.config.weight_decay:g} from now on")
        for group in optimizer.param_groups:
            group["initial_lr"] = learning_rate
            group["weight_decay"] = self.config.weight_decay
        if scheduler is not None:
            # The schedule's factor at the current step, times the new peak.
            scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * factor
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
        else:  # no schedule: the rate is constant
            for group in optimizer.param_groups:
                group["lr"] = learning_rate

    # ------------------------------------------------------------------ the loop
    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        self.stop_signal = signum

    def _agree_on_stopping(self) -> None:
        """Stop on a signal or at the time limit. With several processes all stop at the same step:
        a signal reaches them, and a clock crosses the limit, a step apart, and a lone stop would
        leave the others waiting in the next collective operation."""
        limit = self.config.time_limit_minutes
        up = limit is not None and time.perf_counter() - self.started >= 60.0 * limit
        if self.world > 1:
            flags = torch.tensor([float(up), float(self.stop_requested)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            up, self.stop_requested = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        if up:
            self.stop_requested = self.time_limit_reached = True

    def fit(self) -> dict[str, float]:
        """Train until ``steps`` (or a stop signal); returns the last validation metrics."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.step >= cfg.steps:
            return {}  # already trained that far: the exported models keep their metrics
        previous_handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        log_path, val_path = self.out / "log.csv", self.out / "validation.csv"
        metrics: dict[str, float] = {}
        progress = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_main, desc=f"train {cfg.stage}", unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        try:
            batches = self._batches()
            while self.step < cfg.steps and not self.stop_requested:
                logs = self.train_step(next(batches))
                self.step += 1
                self._agree_on_stopping()
                progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logs = mean_over_processes(logs, self.world, self.device)
                if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    progress.set_postfix(loss=f"{logs['loss']:.4f}")
                    _append_csv(log_path, {"step": self.step, "seconds": round(time.perf_counter() - started, 2), **logs})
                if self.step % cfg.validate_every == 0 or self.step == cfg.steps:
                    metrics = self._validate_and_export(val_path)
                if self.step % cfg.checkpoint_every == 0:
                    self._checkpoint(metrics)
            if self.stop_requested and self.is_main:
                why = f"time limit of {cfg.time_limit_minutes:g} min reached" if self.time_limit_reached else "stop requested"
                progress.write(f"{why}: saving a checkpoint at step {self.step}; continue with --resume")
            self._checkpoint(metrics, final=True)  # first: nothing below may cost the checkpoint
            # Stopped by the time limit before any validation of this run: validate once, so that best.safetensors
            # (what the next stage and `calid install` take) exists with its metrics. Not on a signal: a scheduler's
            # grace period may be short. (Decided alike on every process: best_psnr changes only on the main one,
            # and only once all have validated.)
            if (self.time_limit_reached and not self.validated_this_session and self.best_psnr == -math.inf
                    and len(self.val_set) > 0 and self.step % cfg.validate_every != 0):
                if self.is_main:
                    progress.write(f"no validation yet in this run: validating step {self.step} for best.safetensors")
                metrics = self._validate_and_export(val_path)
                if self.is_main:
                    self.export(self.out / "model.safetensors", metrics)  # with the metrics just measured
        finally:
            progress.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        return metrics

    def _validate_and_export(self, val_path: Path) -> dict[str, float]:
        self.validated_this_session = True  # on every process (best_psnr is the main process's)
        metrics = self.validate() if self.is_main else {}
        if self.is_main and metrics:
            _append_csv(val_path, {"step": self.step, **metrics})
            if metrics["val_psnr"] > self.best_psnr:
                self.best_psnr = metrics["val_psnr"]
                self.export(self.out / "best.safetensors", metrics)
        if self.world > 1:
            dist.barrier()
        return metrics

    def _checkpoint(self, metrics: dict[str, float], final: bool = False) -> None:
        """Training state for --resume, the EMA model file with the latest validation metrics,
        and the new latents (in shards of a few thousand, or all at the end)."""
        if self.is_main:
            self.save_checkpoint()
            self.export(self.out / "model.safetensors", metrics)
        if self.latent_cache is not None:  # every process: each encodes its own share of the slices
            self.latent_cache.save_new(min_count=1 if final else LATENT_SHARD_SIZE)
        if self.world > 1:
            dist.barrier()


def _recorded_val_psnr(model_file: Path, run_id: str | None, after_step: int) -> float:
    """The validation PSNR a model file records, when run ``run_id`` exported it at or after ``after_step``
    (the checkpoint's step: a stop by the time limit validates after its checkpoint); else -inf."""
    if run_id is None or not model_file.is_file():
        return -math.inf
    try:
        info = read_raw_header(model_file)["info"]
        if info.get("run_id") != run_id or int(info["step"]) < after_step:
            return -math.inf
        value = float(info["metrics"]["val_psnr"])
    except (CalidError, KeyError, TypeError, ValueError):
        return -math.inf
    return value if math.isfinite(value) else -math.inf


def _drop_rows_after(log: Path, step: int) -> None:
    """Keep a log's rows up to ``step`` (a resumed run logs the later steps again), atomically."""
    if not log.is_file():
        return
    with log.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
        columns = list(rows[0].keys()) if rows else []
    kept = [row for row in rows if str(row.get("step", "")).isdigit() and int(row["step"]) <= step]
    if len(kept) == len(rows):
        return
    with atomic_path(log) as tmp, Path(tmp).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Data-loading workers ignore SIGTERM and SIGINT: a scheduler's stop (SLURM, ``kill`` of the
    process group) reaches them too, and a worker that dies of it would crash the trainer before
    its stop checkpoint. The trainer stops at the end of the step and shuts them down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def mean_over_processes(logs: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """A logged step's losses averaged over all ``world`` processes (each saw its own share of
    the batch), so that log.csv describes the whole batch and not rank 0's share alone. Every
    process calls it at the same step, with the same names."""
    if world == 1:
        return logs
    names = sorted(logs)
    values = torch.tensor([float(logs[name]) for name in names], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(values, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return {name: float(value) / world for name, value in zip(names, values.tolist(), strict=True)}


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two networks hold the same tensors (a VAE file and a CaLID file's own autoencoder)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        state_a[k].shape == state_b[k].shape and torch.equal(state_a[k].detach().cpu().float(), state_b[k].detach().cpu().float()) for k in state_a
    )


def checkpoint_extra_for_stage(checkpoint: Path, stage: str) -> dict[str, Any]:
    """A checkpoint's ``extra`` dict, refused when it belongs to a run of another stage."""
    extra = read_training_extra(checkpoint)
    previous = (extra.get("train_config") or {}).get("stage")
    if previous != stage or "model_config" not in extra:
        raise InputError(checkpoint, f"is the checkpoint of a {previous or 'segmentation'} run, not of a {stage} run: use another --out folder")
    return extra


def _first_problem(error: Exception) -> str:
    """The first specific line of a load_state_dict error (its first line only names the class)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines[1:] if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    text = specific[0] if specific else (lines[0] if lines else type(error).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def _with_floor_snap(config: ModelConfig, floor_snap: float) -> ModelConfig:
    return config.replace(vae=dataclasses.replace(config.vae, floor_snap=floor_snap))


#: Latents per cache shard written at a periodic checkpoint (about 28 MB for the ``small`` VAE).
LATENT_SHARD_SIZE = 4096

LOG_COLUMNS = ("step", "seconds", "loss", "l1", "kl", "perceptual", "adversarial", "discriminator", "mse", "grad_norm", "lr")
VALIDATION_COLUMNS = ("step", "val_loss", "val_psnr", "val_ssim")


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    """Append a row with fixed columns (a loss that is not computed yet stays empty)."""
    columns = VALIDATION_COLUMNS if path.name == "validation.csv" else LOG_COLUMNS
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


__all__ = ["TrainConfig", "Trainer", "gather_volumes"]
