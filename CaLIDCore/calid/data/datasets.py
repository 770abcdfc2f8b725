"""Training data: subject-level splits, a preprocessing cache, and torch datasets.

* :func:`find_image_files` lists the image files of a data folder (labels excluded).
* :func:`subject_id` maps file names of one subject to one id (``patient001_4d``
  and ``patient001_frame01`` are both ``patient001``), so that a split never
  puts one subject on both sides.
* :func:`split_subjects` makes a deterministic train / validation split by subject.
* :func:`load_subjects` reads and preprocesses every file once; with a
  ``cache_dir`` the result is kept as ``.npy`` keyed by file identity and
  preprocessing settings, so later runs and epochs never re-read NIfTI files.
* :class:`TripletDataset` yields ``(s[n-g], s[n], s[n+g])`` slice triplets over
  subjects, frames, slices and gaps g; :class:`ClipDataset` yields the same
  triplets as clips of consecutive frames (cyclic over the cardiac cycle) for
  2D+T models.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from calid.data.io import read_stack
from calid.data.preprocess import PreprocessConfig, preprocess
from calid.data.stack import CineStack, label_map_warning
from calid.errors import InputError

_LABEL_NAME = re.compile(r"(_gt|_seg|_label|_labels|_mask)(\.|$)", re.IGNORECASE)
_SUBJECT_SUFFIX = re.compile(r"(_4d|_sa|_frame\d+|_ed|_es)+$", re.IGNORECASE)
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def find_image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files (NIfTI / NRRD) under ``folder``, label files excluded, sorted."""
    return image_and_label_files(folder)[0]


def image_and_label_files(folder: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """The image files (NIfTI / NRRD) under ``folder`` and, apart, the label files that are left out
    by their names (``*_gt``, ``*_seg``, ``*_label(s)``, ``*_mask``); both sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    candidates = [p for p in files if p.name.lower().endswith(_IMAGE_SUFFIXES)]
    images = [p for p in candidates if not _LABEL_NAME.search(p.name)]
    if not images:
        from calid.data.dicom_io import looks_like_dicom

        hint = ""
        if any(p.suffix.lower() in (".dcm", ".ima") or looks_like_dicom(p) for p in files[:50]):
            hint = "; it holds DICOM files: convert each cine first (calid convert DICOM_FOLDER cine.nii.gz)"
        raise InputError(folder, f"contains no NIfTI or NRRD image files{hint}")
    return images, [p for p in candidates if _LABEL_NAME.search(p.name)]


def subject_folder(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str | None:
    """The first subfolder of ``root`` that holds ``path`` (``root/P001/sa.nii.gz``: ``P001``), or None.

    Compared as written (made absolute, links not followed): a subject's file may be a link to a file
    kept elsewhere, and it is still that folder's subject."""
    if root is None:
        return None
    relative = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
    if relative.parts and relative.parts[0] == os.pardir:  # not under root as written: perhaps through linked folders
        try:
            relative = Path(path).resolve().relative_to(Path(root).resolve())
        except ValueError:
            return None
    return relative.parts[0] if len(relative.parts) > 1 else None


def subject_id(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """Subject of a file.

    With ``root`` given and the file in a subfolder of it (``root/P001/sa.nii.gz``),
    the subject is that first subfolder: many datasets keep one folder per subject
    with generic file names. Otherwise it is the file name without extension and
    per-file suffixes (``patient001_4d`` and ``patient001_frame01``: ``patient001``).
    """
    folder = subject_folder(path, root)
    if folder is not None:
        return folder
    name = Path(path).name
    for suffix in (".seq.nrrd",) + _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _SUBJECT_SUFFIX.sub("", name)


def split_subjects(
    subjects: Iterable[str],
    val_fraction: float = 0.15,
    seed: int = 0,
    val_subjects: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) lists of unique subject ids; no id is in both.

    ``val_subjects`` fixes the validation set explicitly (for example the same
    held-out subjects across experiments).
    """
    unique = sorted(set(subjects))
    if val_subjects is not None:
        missing = sorted(set(val_subjects) - set(unique))
        if missing:
            raise InputError("validation subjects", f"not in the data: {', '.join(missing)}")
        val = sorted(set(val_subjects))
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise InputError("--val-fraction", f"must be from 0 up to (not including) 1, got {val_fraction}")
        order = unique.copy()
        random.Random(seed).shuffle(order)
        n_val = int(round(val_fraction * len(order)))
        if val_fraction > 0 and n_val == 0 and len(order) > 1:
            n_val = 1
        val = sorted(order[:n_val])
    train = [s for s in unique if s not in set(val)]
    if val_subjects is None and val_fraction > 0 and len(unique) < 2:
        warnings.warn(f"only {len(unique)} subject(s) found: no validation subject can be held out", stacklevel=2)
    return train, val


@dataclass
class SubjectVolume:
    """One preprocessed image of one subject: ``data`` (T, Z, H, W) float32 in [-1, 1]."""

    subject: str
    data: np.ndarray
    source: str
    #: The in-plane pixel size (mm) assumed for a file saved without its geometry, else None.
    assumed_spacing_mm: float | None = None
    #: The file had no geometry (all spacings exactly 1 mm), whether a size was assumed or its 1 mm kept.
    without_geometry: bool = False

    def __post_init__(self) -> None:
        self.without_geometry = self.without_geometry or self.assumed_spacing_mm is not None  # a size is only assumed for such files


def typical_pixel_spacing(paths: Sequence[str | os.PathLike[str]], min_slices: int = 3) -> float | None:
    """Median in-plane pixel size (mm) of the files with a real geometry; None if none has one.

    Reads every file (also when their preprocessed data are cached): a few seconds for a
    data set of ACDC's size, and the cache key depends on the result."""
    sizes = []
    for path in paths:
        stack = read_stack(path, min_slices=min_slices)
        if not stack.has_placeholder_spacing:
            sizes.append(float(np.mean(stack.spacing[:2])))
    return float(np.median(sizes)) if sizes else None


def _cache_key(path: Path, config: PreprocessConfig, placeholder_spacing_mm: float | None = None) -> str:
    stat = path.stat()
    identity: list[Any] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns, config.to_dict()]
    if placeholder_spacing_mm is not None:
        identity.append(placeholder_spacing_mm)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def load_subjects(
    paths: Sequence[str | os.PathLike[str]],
    config: PreprocessConfig = PreprocessConfig(),
    cache_dir: str | os.PathLike[str] | None = None,
    min_slices: int = 3,
    root: str | os.PathLike[str] | None = None,
    placeholder_spacing_mm: float | None = None,
) -> list[SubjectVolume]:
    """Read and preprocess every file (through the cache when given); subjects as :func:`subject_id` with ``root``.

    ``placeholder_spacing_mm``: the pixel size to assume for files saved without their
    geometry (:attr:`CineStack.has_placeholder_spacing`). Preprocessing resamples every slice to
    the model's pixel size, so a 1.5 mm image read as 1 mm would shrink to two thirds
    and the network would learn hearts at two scales.
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    volumes: list[SubjectVolume] = []
    for raw_path in paths:
        path = Path(raw_path)
        subject = subject_id(path, root)
        key = _cache_key(path, config, placeholder_spacing_mm)
        cached = cache / f"{subject}-{key}.npy" if cache is not None else None
        assumed_marker = cache / f"{subject}-{key}.assumed" if cache is not None else None
        bare_marker = cache / f"{subject}-{key}.nogeometry" if cache is not None else None
        assumed: float | None = None
        if cached is not None and cached.exists():
            data = np.load(cached, mmap_mode="r")
            assumed = placeholder_spacing_mm if assumed_marker is not None and assumed_marker.exists() else None
            without_geometry = bare_marker is not None and bare_marker.exists()
        else:
            stack = read_stack(path, min_slices=min_slices)
            if label_map_warning(stack):
                # A segmentation among the images would teach the network label maps, silently.
                raise InputError(path, "holds only the values 0-3: it is a label map (segmentation), not an image; train on the grey-level cines "
                                 "(in a folder, files named *_gt, *_seg, *_label(s) or *_mask are left out)")
            without_geometry = stack.has_placeholder_spacing
            if placeholder_spacing_mm is not None and without_geometry:
                assumed = float(placeholder_spacing_mm)
                stack = replace(stack, spacing=(assumed, assumed, stack.spacing[2]))
            data = preprocess(stack, config)[0].data.astype(np.float16)
            if cached is not None:
                # One temporary file per process: under torchrun every rank fills a fresh cache at
                # once, and a shared name would let one rank move another's file away mid-write.
                tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, data)
                if assumed is not None and assumed_marker is not None:
                    assumed_marker.write_text(f"{assumed}\n")
                if without_geometry and bare_marker is not None:
                    bare_marker.write_text("all spacings 1 mm\n")
                os.replace(tmp, cached)
        volumes.append(
            SubjectVolume(subject=subject, data=np.asarray(data), source=str(path), assumed_spacing_mm=assumed, without_geometry=without_geometry)
        )
    return volumes


#: ``format`` of a packed-volumes file (:func:`write_packed_volumes`).
PACKED_FORMAT = "calid-packed-volumes"


def write_packed_volumes(path: str | os.PathLike[str], volumes: Sequence[SubjectVolume], config: PreprocessConfig) -> Path:
    """Write preprocessed training volumes as one compressed ``.npz`` (atomically).

    For moving a data set to a training machine: ACDC's 70 cines at the ``small``
    preprocessing take 46 MiB. The reader decodes every volume into memory (float16;
    about 250 MB for ACDC, per training process). Clipped data in [-1, 1] are stored as uint8 (step
    2/255, far below the noise of a cine; -1 and +1 exactly), as differences between
    consecutive frames (modulo 256), which bzip2 compresses to 41 % where the frames
    themselves only reach 53 %; unclipped data as float16. The file is a plain
    ``.npz`` (numpy reads bzip2 members). Only file names of the sources are kept.
    """
    import zipfile

    from calid.atomic import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InputError(path, "a packed data file must end in .npz")
    if not volumes:
        raise InputError(path, "no volumes to pack")
    encoding = "uint8-frame-delta" if config.clip else "float16"
    arrays: dict[str, np.ndarray] = {}
    for index, volume in enumerate(volumes):
        data = np.asarray(volume.data, dtype=np.float32)
        if encoding == "uint8-frame-delta":
            levels = np.rint((np.clip(data, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
            arrays[f"volume_{index:05d}"] = np.diff(levels, axis=0, prepend=np.zeros_like(levels[:1]))  # uint8: wraps modulo 256
        else:
            arrays[f"volume_{index:05d}"] = data.astype(np.float16)
    meta = {
        "format": PACKED_FORMAT,
        "version": 1,
        "encoding": encoding,
        "preprocess": config.to_dict(),
        "subjects": [v.subject for v in volumes],
        "sources": [Path(v.source).name for v in volumes],
        "assumed_spacing_mm": [v.assumed_spacing_mm for v in volumes],
        "without_geometry": [v.without_geometry for v in volumes],
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_BZIP2, compresslevel=9) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return path


def is_packed_volumes(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(".npz") and Path(path).is_file()


def read_packed_volumes(path: str | os.PathLike[str], config: PreprocessConfig | None = None) -> list[SubjectVolume]:
    """The volumes of a :func:`write_packed_volumes` file.

    ``config``: the preprocessing the model needs; a file packed with another one
    (pixel size, crop, intensity window) is refused rather than trained on at the
    wrong scale.
    """
    import zipfile

    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputError(path, "not a CaLID packed data file (one array, not an .npz archive); write one with calid pack")
        with loaded as archive:
            if "meta" not in archive.files:
                raise InputError(path, "not a CaLID packed data file (no 'meta' entry); write one with calid pack")
            meta = json.loads(bytes(archive["meta"]).decode())
            if meta.get("format") != PACKED_FORMAT:
                raise InputError(path, f"not a CaLID packed data file (format {meta.get('format')!r})")
            if int(meta.get("version", 0)) > 1:
                raise InputError(path, f"packed by a newer CaLID (version {meta['version']}); update calid to read it")
            packed = PreprocessConfig.from_dict(meta["preprocess"])
            if config is not None and packed != config:
                raise InputError(
                    path,
                    f"packed for pixel size {packed.target_spacing_mm} mm, crop {packed.crop_size}, percentiles {packed.percentiles}; "
                    f"this model needs {config.target_spacing_mm} mm, {config.crop_size}, {config.percentiles}: pack the images again with this --config",
                )
            volumes = []
            for index, subject in enumerate(meta["subjects"]):
                stored = archive[f"volume_{index:05d}"]
                if meta["encoding"] == "uint8-frame-delta":
                    levels = np.cumsum(stored, axis=0, dtype=np.uint8)  # undoes the modulo-256 differences
                    data = (levels.astype(np.float32) / 127.5 - 1.0).astype(np.float16)
                elif meta["encoding"] == "float16":
                    data = stored.astype(np.float16)
                else:
                    raise InputError(path, f"unknown encoding {meta['encoding']!r}")
                if data.ndim != 4:
                    raise InputError(path, f"volume {index} ({subject}) has shape {data.shape}, expected (frames, slices, rows, columns)")
                assumed = meta["assumed_spacing_mm"][index]
                bare = bool(meta.get("without_geometry", [False] * len(meta["subjects"]))[index])  # older packs: known from the assumed size alone
                volumes.append(
                    SubjectVolume(subject=str(subject), data=data, source=f"{path.name}:{meta['sources'][index]}", assumed_spacing_mm=assumed, without_geometry=bare)
                )
    except InputError:
        raise
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as error:  # JSONDecodeError is a ValueError
        raise InputError(path, f"cannot read this packed data file: {error}") from error
    return volumes


def volumes_from_stacks(stacks: Sequence[CineStack], config: PreprocessConfig = PreprocessConfig()) -> list[SubjectVolume]:
    """Preprocess in-memory stacks (e.g. phantoms); the subject is ``metadata['subject']``."""
    out = []
    for index, stack in enumerate(stacks):
        subject = str(stack.metadata.get("subject", f"stack{index:04d}"))
        out.append(SubjectVolume(subject=subject, data=preprocess(stack, config)[0].data.astype(np.float16), source=stack.source))
    return out


def image_extent(data: np.ndarray) -> tuple[slice, slice]:
    """(rows, columns) of a preprocessed volume's crops (..., H, W) that hold image: those where any
    frame or slice rises above the padding value -1. The crop pads a small field of view with -1;
    rows and columns of the image that are -1 everywhere (dark, clipped) go with it, which changes
    nothing for scoring (every method reproduces a constant border). The whole crop when all is -1."""
    above = np.asarray(data).reshape(-1, *np.shape(data)[-2:]) > -1.0 + 1e-3
    rows, columns = np.flatnonzero(above.any(axis=(0, 2))), np.flatnonzero(above.any(axis=(0, 1)))
    if rows.size == 0 or columns.size == 0:
        return slice(0, np.shape(data)[-2]), slice(0, np.shape(data)[-1])
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


class TripletDataset(Dataset[dict[str, Any]]):
    """Slice triplets ``(s[n-g], s[n], s[n+g])`` for interpolation training.

    Every (volume, frame, middle slice n, gap g) with both neighbours inside the
    stack is one item. Items are dicts of float32 tensors ``previous``,
    ``middle``, ``next`` of shape (1, H, W) plus ``subject``, ``frame``,
    ``slice``, ``gap`` and ``keys`` (3, 4): which (volume, frame, slice, flips)
    each of the three tensors shows.

    Args:
        volumes: preprocessed subjects (one split: never mix train and validation).
        gaps: neighbour distances in slices; 1 is the task, larger gaps add
            training pairs at other scales (bisection also meets half gaps).
        flips: random horizontal / vertical flips, the same for the three slices.
        transposes: also swap the two in-plane axes at random (square crops only); with
            the flips, every one of the 8 in-plane rotations and reflections of a slice.
        swap_neighbours: randomly exchange previous and next (the task is symmetric).
        frames: restrict to these frame indices (e.g. ED / ES); default all.
        seed: augmentations are a function of (seed, epoch, item) alone, so they are
            the same whatever the number of loader workers and after a resumed run.
        moved_neighbours: for a registration-guided model, ``moved_neighbours(volume, frame,
            n, gap)`` gives the (2, H, W) previous and next slices already moved to the middle
            (e.g. a :class:`MovedNeighbourTable`); the items then carry those instead of the
            acquired neighbours, with their own keys (flip code bit 3 set, the gap and the
            side in the higher bits), and the same augmentations.
    """

    #: Flip-code bit of a neighbour moved to the middle of its gap (see ``moved_neighbours``).
    MOVED = 8

    def __init__(
        self,
        volumes: Sequence[SubjectVolume],
        gaps: Sequence[int] = (1,),
        flips: bool = True,
        swap_neighbours: bool = False,
        frames: Sequence[int] | None = None,
        seed: int = 0,
        transposes: bool = False,
        moved_neighbours: Callable[[int, int, int, int], np.ndarray] | None = None,
    ) -> None:
        self.volumes = list(volumes)
        self.moved_neighbours = moved_neighbours
        self.flips = flips
        self.transposes = transposes
        if transposes and any(v.data.shape[-1] != v.data.shape[-2] for v in self.volumes):
            raise InputError("transposes", "swapping the in-plane axes needs square crops")
        self.swap_neighbours = swap_neighbours
        self.seed = seed
        self.epoch = 0
        index: list[tuple[int, int, int, int]] = []
        for v, volume in enumerate(self.volumes):
            n_frames, n_slices = volume.data.shape[:2]
            frame_list = range(n_frames) if frames is None else [f for f in frames if 0 <= f < n_frames]
            for gap in gaps:
                for t in frame_list:
                    for n in range(gap, n_slices - gap):
                        index.append((v, t, n, gap))
        self.index = index

    @property
    def subjects(self) -> list[str]:
        return sorted({v.subject for v in self.volumes})

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Draw other augmentations in every epoch (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _augment(self, slices: list[torch.Tensor], slice_indices: list[Any], item: int) -> tuple[list[torch.Tensor], list[Any], int]:
        """Flipped (and maybe swapped) slices, their identities (slice indices) in the same order, and the
        flip code (bit 0: flipped along x, bit 1: along y, bit 2: then x and y swapped)."""
        seed = int(np.random.SeedSequence([self.seed, self.epoch, item]).generate_state(1)[0])
        draws = torch.rand(4 if self.transposes else 3, generator=torch.Generator().manual_seed(seed))
        dims = []
        flip_code = 0
        if self.flips and draws[0] < 0.5:
            dims.append(-1)
            flip_code |= 1
        if self.flips and draws[1] < 0.5:
            dims.append(-2)
            flip_code |= 2
        if dims:
            slices = [s.flip(dims) for s in slices]
        if self.transposes and draws[3] < 0.5:
            slices = [s.transpose(-1, -2).contiguous() for s in slices]
            flip_code |= 4
        if self.swap_neighbours and draws[2] < 0.5:
            slices, slice_indices = slices[::-1], slice_indices[::-1]
        return slices, slice_indices, flip_code

    def _frames(self, frame: int, n_frames: int) -> int | np.ndarray:
        """Which frame(s) an item takes: one frame here, a cyclic clip in :class:`ClipDataset`."""
        return frame

    def __getitem__(self, item: int) -> dict[str, Any]:
        v, t, n, gap = self.index[item]
        data = self.volumes[v].data
        frames = self._frames(t, data.shape[0])
        # Each tensor's identity for its latent-cache key: (slice, extra flip-code bits).
        identities = [(n - gap, 0), (n, 0), (n + gap, 0)]
        slices = [torch.from_numpy(np.asarray(data[frames, k], dtype=np.float32)).unsqueeze(0) for k, _ in identities]
        if self.moved_neighbours is not None:
            moved = np.asarray(self.moved_neighbours(v, t, n, gap), dtype=np.float32)
            slices[0], slices[2] = torch.from_numpy(moved[0]).unsqueeze(0), torch.from_numpy(moved[1]).unsqueeze(0)
            # Keyed by the middle slice: the same slice moved across another gap, or from the other side, differs.
            identities[0], identities[2] = (n, self.MOVED | (gap << 5)), (n, self.MOVED | 16 | (gap << 5))
        (previous, middle, following), identities, flip_code = self._augment(slices, identities, item)
        return {
            "previous": previous,
            "middle": middle,
            "next": following,
            # What each of the three tensors is, exactly: (volume, frame, slice, flip code) rows, so
            # a trainer can reuse a tensor's encoding whenever the same one comes back.
            "keys": torch.tensor([[v, t, k, flip_code | extra] for k, extra in identities], dtype=torch.long),
            "subject": self.volumes[v].subject,
            "frame": t,
            "slice": n,
            "gap": gap,
        }


class ClipDataset(TripletDataset):
    """Triplets of clips for 2D+T models: tensors of shape (1, clip_length, H, W).

    Item (volume, start frame, n, g) takes frames start, start+1, ... cyclically
    (a cine covers one cardiac cycle, so the sequence wraps around), so any
    number of frames yields clips of a fixed length.
    """

    def __init__(
        self,
        volumes: Sequence[SubjectVolume],
        clip_length: int = 32,
        gaps: Sequence[int] = (1,),
        flips: bool = True,
        swap_neighbours: bool = False,
        start_stride: int = 1,
        seed: int = 0,
        transposes: bool = False,
    ) -> None:
        super().__init__(volumes, gaps=gaps, flips=flips, swap_neighbours=swap_neighbours, seed=seed, transposes=transposes)
        self.clip_length = clip_length
        self.index = [entry for entry in self.index if entry[1] % start_stride == 0]

    def _frames(self, frame: int, n_frames: int) -> int | np.ndarray:
        return (frame + np.arange(self.clip_length)) % n_frames
