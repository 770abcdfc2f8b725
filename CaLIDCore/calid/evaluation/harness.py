"""``calid evaluate``: the paper's tables on any data, with baselines, metrics and figures.

Four tasks, each optional:

1. **Middle-slice interpolation** (the paper's Table I): every interior slice
   s(n) of every selected frame is predicted from s(n-1) and s(n+1) by every
   method and compared with the acquired slice on the model's normalised crop
   (the same [0, 1] crop for every method): PSNR, SSIM, LPIPS-alex, Fréchet
   distance on AlexNet conv5 features (not the Inception FID), generation time.
2. **Quality against DDIM steps** (Fig. 2) for ``calid`` and ``calid+`` on a
   fixed, evenly spread sample of the Task 1 slices.
3. **Downstream segmentation** (Table II): the predicted slices are pasted into
   the acquired frame (inside the model's crop, like the engine does), the
   frame is segmented, and each interior slice is scored against its
   ground-truth labels: Dice, HD95, ASD, ASSD (mm). The acquired frame gives the
   "real slice" upper bound.
4. **Real 3D truth** (beyond the paper): synthetic phantoms are upsampled from
   their sparse acquisition and compared with the dense truth: PSNR / SSIM of
   every new slice, Dice and absolute volume error of each structure after
   segmentation, LV ejection fraction error.

Means come with a 95 % confidence interval over subjects (Student t), so a
subject with many slices does not count more than one with few.

Outputs (written atomically into ``out_dir``): ``report.md``, ``results.json``
(:data:`SCHEMA`), ``task1_per_subject.csv``, ``task3_per_subject.csv``,
``task4_per_subject.csv``, ``steps.png`` and ``examples.png``.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from calid.atomic import atomic_path
from calid.data.datasets import find_image_files, subject_id
from calid.data.io import image_stem, read_stack
from calid.data.phantom import Phantom, PhantomConfig, make_phantom
from calid.data.preprocess import PreprocessConfig, PreprocessParams, preprocess, undo_preprocess
from calid.data.stack import CineStack, fixed_placeholder_mm
from calid.errors import InputError
from calid.evaluation.figures import save_figure
from calid.evaluation.methods import ALL_METHODS, METHODS, PIXEL_METHODS, STEP_SWEEP, TTA_METHODS  # noqa: F401 - re-exported
from calid.evaluation.metrics import frechet_distance, psnr, segmentation_scores, ssim
from calid.inference.pipeline import INVERSION_SLERP, UpsamplingPipeline, load_pipeline, parse_frames, seam_weight
from calid.models.checkpoint import recorded_training_data, subjects_learnt
from calid.models.config import ModelConfig, named_config

SCHEMA = "calid-evaluation/1"
#: The per-subject table of each task, and every figure a report can have (written in the output folder).
TABLES = {"task1": "task1_per_subject.csv", "task3": "task3_per_subject.csv", "task4": "task4_per_subject.csv", "temporal": "temporal_per_subject.csv"}
FIGURES = ("steps.png", "examples.png", "temporal_xt.png")
STRUCTURES = {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"}
IMAGE_METRICS = ("psnr", "ssim", "lpips")
#: ``--subjects held-out``: the validation subjects recorded in the model file.
HELD_OUT = "held-out"

#: Dimension of the AlexNet conv5 features of the Fréchet distance: fewer slices than this give
#: rank-deficient covariances (a biased, sometimes unstable estimate).
FRECHET_FEATURES = 256
TASK4_HEADERS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lv ef abs error (points)": "LV EF absolute error (points)"}
SEG_METRICS = ("dice", "hd95_mm", "asd_mm", "assd_mm")


def engine_mode(method: str) -> tuple[str, bool]:
    """An evaluation method -> (the engine's mode, test-time augmentation)."""
    return (method[: -len("-tta")], True) if method in TTA_METHODS else (method, False)
#: Label files next to the images or in ``--labels``: ``SUBJECT_frameNN_gt.*`` with NN counted from 1 (ACDC).
_LABEL_FILE = re.compile(r"_frame(\d+)_gt\.(nii\.gz|nii|nrrd|nhdr)$", re.IGNORECASE)

ProgressFn = Callable[[str], None]


@dataclass
class EvaluationConfig:
    """Every knob of an evaluation run (saved in results.json).

    Args:
        data: cine files, folders of them, or ``phantom:N`` (N synthetic subjects).
        out_dir: where the report goes.
        model: CaLID model (file, installed name, ``untrained:tiny``); None = default installed.
        methods: any of :data:`ALL_METHODS` (default :data:`METHODS`).
        steps: DDIM steps of calid / calid+ in Tasks 1, 3, 4.
        baseline_steps: DDIM steps of the inversion and the decoding of ``inversion-slerp``
            (DiffAE-style baselines decode with many steps).
        frames: ``labelled`` (frames with ground-truth labels, else the first frame),
            ``all``, or a selection such as ``0,5-9``.
        labels: folder of ``SUBJECT_frameNN_gt`` label files (ACDC layout, NN from 1).
        subjects: only these subject ids (``patient061..patient070`` ranges allowed), or
            ``("held-out",)``: the validation subjects the model's training recorded.
        tasks: which of 1-4 to run.
        sweep_steps / sweep_slices: Task 2 step counts and number of slices.
        phantoms / factor: Task 4 subjects and upsampling factor (2, 4 or 8).
        seg_model: segmentation model for Tasks 3 and 4; None = default installed.
        lpips_weights: AlexNet weights for LPIPS and the Fréchet distance.
        placeholder_spacing: in-plane pixel size for files saved without geometry (all
            spacings exactly 1 mm): ``model`` (the size the model's training assumed for such
            files, recorded in the model file; else keep), ``keep``, or a size in mm. Without
            it, such files reach the model at the wrong scale.
    """

    data: tuple[str, ...]
    out_dir: str
    model: str | None = None
    methods: tuple[str, ...] = METHODS
    steps: int | None = None  # None: the model's default_steps
    baseline_steps: int = 50
    frames: str = "labelled"
    labels: str | None = None
    subjects: tuple[str, ...] | None = None
    tasks: tuple[int, ...] = (1, 2, 3, 4)
    sweep_steps: tuple[int, ...] = STEP_SWEEP
    sweep_slices: int = 16
    phantoms: int = 2
    factor: int = 8
    seg_model: str | None = None
    lpips_weights: str | None = None
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    placeholder_spacing: str = "model"
    examples: int = 2
    #: A 2D+T model: adds the temporal comparison (2D model frame by frame vs the 2D+T model on whole cines).
    temporal_model: str | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise InputError("--methods", f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
        if not self.methods:
            raise InputError("--methods", "no method selected")
        bad_tasks = [t for t in self.tasks if t not in (1, 2, 3, 4)]
        if bad_tasks:
            raise InputError("--tasks", f"tasks are 1, 2, 3 and 4, got {bad_tasks}")
        if self.factor not in (2, 4, 8):
            raise InputError("--factor", f"the phantom truth supports factors 2, 4 and 8, got {self.factor}")
        for name in ("steps", "baseline_steps", "sweep_slices", "batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')}", f"must be at least 1, got {getattr(self, name)}")
        if 2 in self.tasks and (not self.sweep_steps or any(isinstance(n, bool) or int(n) < 1 for n in self.sweep_steps)):
            raise InputError("--sweep-steps", f"needs step counts of at least 1, got {list(self.sweep_steps)}")
        if 4 in self.tasks and int(self.phantoms) < 1:
            raise InputError("--phantoms", f"Task 4 needs at least 1 phantom, got {self.phantoms}")
        fixed_placeholder_mm(self.placeholder_spacing)  # a bad value fails before anything is loaded or written


# ---------------------------------------------------------------------- data


@dataclass
class EvalSubject:
    """One evaluated volume (a cine, or one labelled frame) of a subject, and its frames.

    Several volumes may belong to one subject (ACDC's separate ED and ES
    files): results are pooled per ``subject`` before means and intervals.
    """

    name: str
    subject: str
    stack: CineStack
    labels: dict[int, np.ndarray] = field(default_factory=dict)  # frame -> (Z, Y, X) labels
    frames: list[int] = field(default_factory=list)
    frame_note: str = ""
    cardiac_phases: dict[str, int] = field(default_factory=dict)  # ED / ES frame (0-based) when known
    #: The in-plane pixel size (mm) assumed because the file has no geometry, else None.
    assumed_spacing_mm: float | None = None


def expand_subjects(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Subject ids from a list that may hold ``first..last`` ranges (inclusive, over the sorted ids)."""
    ordered = sorted(set(available))
    chosen: list[str] = []
    for item in requested:
        item = item.strip()
        if not item:
            continue
        if ".." in item:
            first, last = (part.strip() for part in item.split("..", 1))
            for end in (first, last):
                if end not in ordered:
                    raise InputError("--subjects", f"subject {end!r} is not in the data")
            chosen.extend(ordered[ordered.index(first) : ordered.index(last) + 1])
        elif item in ordered:
            chosen.append(item)
        else:
            raise InputError("--subjects", f"subject {item!r} is not in the data ({len(ordered)} subjects found)")
    return sorted(set(chosen))


def find_label_files(folder: str | Path | None, subject: str) -> dict[int, Path]:
    """``{frame index (0-based): label file}`` of one subject in an ACDC-style label folder."""
    if folder is None:
        return {}
    found: dict[int, Path] = {}
    for path in sorted(Path(folder).glob(f"{subject}_frame*_gt.*")):
        match = _LABEL_FILE.search(path.name)
        if match:
            found[int(match.group(1)) - 1] = path
    return found


def sibling_label_file(image: Path) -> Path | None:
    """``NAME_gt.<ext>`` beside ``NAME.<ext>`` (the layout ``calid train seg`` reads), if present."""
    for ext in (".nii.gz", ".nii", ".nrrd"):
        if image.name.endswith(ext):
            candidate = image.with_name(image.name[: -len(ext)] + "_gt" + ext)
            return candidate if candidate.is_file() else None
    return None


def cardiac_phases(image: Path, subject: str) -> dict[str, int]:
    """ED / ES frames (0-based) from an ACDC ``SUBJECT_Info.cfg`` beside the image; empty when absent."""
    info = image.parent / f"{subject}_Info.cfg"
    phases: dict[str, int] = {}
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("ED", "ES") and value.strip().isdigit():
                phases[key.strip()] = int(value) - 1
    return phases


def _read_labels(image: Path, stack: CineStack, config: EvaluationConfig, subject: str) -> dict[int, np.ndarray]:
    labels: dict[int, np.ndarray] = {}
    sibling = sibling_label_file(image)
    if sibling is not None:
        label = read_stack(sibling, min_slices=1)
        if label.shape[1:] != stack.shape[1:] or label.n_frames not in (1, stack.n_frames):
            raise InputError(sibling, f"labels of shape {label.shape} do not fit the image {image} of shape {stack.shape}")
        for t in range(label.n_frames):
            labels[t] = np.rint(label.data[t]).astype(np.uint8)
    if stack.n_frames == 1:
        return labels  # frame-numbered label files belong to cines; a single-frame volume has its NAME_gt
    folder = config.labels if config.labels is not None else image.parent
    for frame, label_path in find_label_files(folder, subject).items():
        label = read_stack(label_path, min_slices=1)
        if label.shape[1:] != stack.shape[1:] or frame >= stack.n_frames:
            raise InputError(label_path, f"labels of shape {label.shape[1:]} (frame {frame + 1}) do not fit the cine {image} of shape {stack.shape}")
        labels[frame] = np.rint(label.data[0]).astype(np.uint8)
    return labels


def load_evaluation_subjects(
    config: EvaluationConfig, placeholder_spacing_mm: float | None = None, held_out: Sequence[str] | None = None, not_evaluated: list[str] | None = None
) -> list[EvalSubject]:
    """The volumes of ``config.data`` (files, folders, ``phantom:N``), filtered by subject and with their labels.

    Files saved without geometry are given ``placeholder_spacing_mm`` pixels when it is set. ``held_out``
    (``--subjects held-out``: a model's validation subjects) keeps those of them the data hold."""
    entries: list[tuple[str, Path | None, Phantom | None]] = []
    for entry in config.data:
        if entry.startswith("phantom:"):
            try:
                count = int(entry.split(":", 1)[1])
            except ValueError:
                raise InputError(entry, "phantom data is written phantom:N with N the number of subjects") from None
            entries.extend((f"phantom{2000 + i}", None, make_phantom(2000 + i, evaluation_phantom_config())) for i in range(count))
        elif Path(entry).is_dir():
            entries.extend((subject_id(p, entry), p, None) for p in find_image_files(entry))
        elif Path(entry).is_file():
            entries.append((subject_id(entry), Path(entry), None))
        else:
            raise InputError(entry, "evaluation data not found (a file, a folder or phantom:N)")
    if held_out is not None:
        available = {name for name, _, _ in entries}
        missing = [s for s in held_out if s not in available]
        if len(missing) == len(held_out):
            raise InputError(", ".join(config.data), f"holds none of the model's held-out subjects ({', '.join(held_out)})")
        if missing:
            warnings.warn(f"{len(missing)} of the model's {len(held_out)} held-out subjects are not in the data, and are not scored: {', '.join(missing)}", stacklevel=2)
        entries = [e for e in entries if e[0] in set(held_out)]
    elif config.subjects:
        keep = set(expand_subjects(config.subjects, [name for name, _, _ in entries]))
        entries = [e for e in entries if e[0] in keep]
    if not entries:
        raise InputError(", ".join(config.data), "no subjects to evaluate")
    volumes = []
    for subject, path, phantom in entries:
        if phantom is not None:
            volume = EvalSubject(
                name=subject,
                subject=subject,
                stack=phantom.sparse,
                labels={0: phantom.sparse_labels.data[0], phantom.es_frame: phantom.sparse_labels.data[phantom.es_frame]},
                cardiac_phases={"ED": 0, "ES": phantom.es_frame},
            )
        else:
            assert path is not None
            stack = read_stack(path, min_slices=1)
            if stack.n_slices < 3:  # a localiser or a single long-axis image among the cines: nothing to predict
                why = f"{stack.n_slices} slice(s), and a slice is predicted from two neighbours"
                warnings.warn(f"{path}: not evaluated: {why}", stacklevel=2)
                if not_evaluated is not None:  # for the report: a count of volumes that silently shrank would mislead
                    not_evaluated.append(f"{Path(path).name} ({why})")
                continue
            name = image_stem(path)
            if subject not in name:
                name = f"{subject}_{name}"  # one folder per subject with generic file names (P001/sa.nii.gz)
            labels = _read_labels(path, stack, config, subject)
            assumed = None
            if placeholder_spacing_mm is not None and stack.has_placeholder_spacing:
                assumed = float(placeholder_spacing_mm)
                stack = replace(stack, spacing=(assumed, assumed, stack.spacing[2]))
            volume = EvalSubject(name=name, subject=subject, stack=stack, labels=labels, assumed_spacing_mm=assumed)
            if stack.n_frames > 1:
                volume.cardiac_phases = {k: v for k, v in cardiac_phases(path, subject).items() if v < stack.n_frames}
        volumes.append(_select_frames(volume, config.frames))
    if not volumes:
        raise InputError(", ".join(config.data), "no volume with 3 or more slices to evaluate")
    return _without_repeated_volumes(volumes)


def _without_repeated_volumes(volumes: list[EvalSubject]) -> list[EvalSubject]:
    """Every volume once, under a name of its own (names key the results and the figures).

    ACDC's own layout keeps each subject's cine beside single-frame copies of its ED and ES
    frames (``patient001_4d`` and ``patient001_frame01``): those copies would score the same
    slices twice, so a single-frame volume is dropped when a cine of its subject holds the same
    frame (same grid, same voxels); other single-frame volumes stay."""
    cines = [v for v in volumes if v.stack.n_frames > 1]

    def copy_of_a_cine_frame(volume: EvalSubject) -> bool:
        return volume.stack.n_frames == 1 and any(
            cine.subject == volume.subject and cine.stack.shape[1:] == volume.stack.shape[1:] and cine.stack.same_geometry(volume.stack)
            and any(np.array_equal(frame, volume.stack.data[0]) for frame in cine.stack.data)
            for cine in cines
        )

    dropped = [v.name for v in volumes if copy_of_a_cine_frame(v)]
    if dropped:
        warnings.warn(f"not evaluated separately, their subjects' cines hold the same frames: {', '.join(dropped)}", stacklevel=2)
    kept = [v for v in volumes if v.name not in dropped]
    # Single frames of a subject that also has a cine, on another grid (ACDC's full field-of-view ED / ES files beside
    # its cropped cine): perhaps the same anatomy scored twice, which would weigh that subject's phases double.
    alongside = sorted(v.name for v in kept if v.stack.n_frames == 1 and any(c.subject == v.subject for c in cines))
    if alongside:
        warnings.warn(
            f"{len(alongside)} single-frame volume(s) are scored beside their subject's cine ({', '.join(alongside[:4])}{', ...' if len(alongside) > 4 else ''}): "
            "if they are frames of that cine on another grid, those phases count twice in the subject's mean; evaluate the folders separately",
            stacklevel=2,
        )
    names = [v.name for v in kept]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(", ".join(repeated), "two evaluation volumes have this name (same subject and file name); give each volume once")
    return kept


def evaluation_phantom_config() -> PhantomConfig:
    """Phantoms of the evaluation: 8 frames (so that end-systole is sampled), otherwise the defaults."""
    return PhantomConfig(n_frames=8)


def _select_frames(volume: EvalSubject, spec: str) -> EvalSubject:
    if spec == "labelled":
        if volume.labels:
            volume.frames = sorted(volume.labels)
        elif volume.cardiac_phases:
            volume.frames, volume.frame_note = sorted(set(volume.cardiac_phases.values())), "no labels: ED and ES frames (Info.cfg)"
        else:
            volume.frames, volume.frame_note = [0], "no labels: first frame only"
    else:
        selection = parse_frames(spec, volume.stack.n_frames, "--frames")
        volume.frames = list(range(volume.stack.n_frames)) if selection is None else selection
    return volume


def pool_by_subject(rows: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str], weight: str | None = None) -> list[dict[str, Any]]:
    """Rows of several volumes of one subject merged into one row per (subject, *keys): weighted means."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in ("subject", *keys)), []).append(row)
    pooled = []
    for group_key, members in groups.items():
        merged: dict[str, Any] = dict(zip(("subject", *keys), group_key))
        weights = np.asarray([m[weight] if weight else 1.0 for m in members], dtype=np.float64)
        if weight:
            merged[weight] = int(weights.sum())
        for metric in metrics:
            values = np.asarray([m.get(metric, float("nan")) for m in members], dtype=np.float64)
            # A metric undefined on some slices (a distance where a structure is absent) is weighted by the slices it has.
            counted = f"{weight} {metric}" if weight and all(f"{weight} {metric}" in m for m in members) else None
            metric_weights = np.asarray([m[counted] for m in members], dtype=np.float64) if counted else weights
            if counted:
                merged[counted] = int(metric_weights.sum())
            ok = np.isfinite(values)
            merged[metric] = float(np.average(values[ok], weights=metric_weights[ok])) if ok.any() and metric_weights[ok].sum() > 0 else float("nan")
        pooled.append(merged)
    return pooled


# ---------------------------------------------------------------------- statistics


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric (so its mean) can take. A Student t interval over a few subjects can
    reach past them (a Dice of 0.97 +- 0.05 above 1): the reported interval is clipped to them."""
    if metric.startswith("dice"):
        return 0.0, 1.0
    if metric == "ssim":
        return -1.0, 1.0
    if metric in ("lpips", "ms_per_slice", "change_error") or metric.endswith("_mm") or "abs error" in metric:
        return 0.0, math.inf
    return -math.inf, math.inf


def mean_ci(values: Sequence[float], metric: str = "") -> dict[str, float | int | list[float]]:
    """Mean and 95 % confidence interval (Student t) of per-subject values, NaNs ignored; the
    interval is clipped to the values the named metric can take."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    if n == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    mean = float(finite.mean())
    if n == 1:
        return {"mean": mean, "ci95": [float("nan"), float("nan")], "n": 1}
    half = float(stats.t.ppf(0.975, n - 1) * finite.std(ddof=1) / math.sqrt(n))
    low, high = metric_range(metric)
    return {"mean": mean, "ci95": [max(mean - half, low), min(mean + half, high)], "n": n}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ---------------------------------------------------------------------- perceptual metrics


class PerceptualMetrics:
    """LPIPS-alex and pooled AlexNet features; unavailable (with a reason) without the weights."""

    def __init__(self, weights: str | None) -> None:
        from calid.evaluation.lpips import LPIPS

        self.reason = ""
        self.network: Any = None
        try:
            self.network = LPIPS(weights)
        except Exception as error:  # noqa: BLE001 - any failure to get the weights means "not measured"
            self.reason = f"LPIPS and the Fréchet distance were not computed: the AlexNet weights could not be loaded ({error})"

    @property
    def available(self) -> bool:
        return self.network is not None

    @torch.no_grad()
    def lpips(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(N,) distances of (N, H, W) images in [-1, 1]."""
        out = [self.network(torch.from_numpy(a[i : i + 64, None]), torch.from_numpy(b[i : i + 64, None])).numpy() for i in range(0, len(a), 64)]
        return np.concatenate(out)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self.network.pooled_features(torch.from_numpy(images[i : i + 64, None])).numpy() for i in range(0, len(images), 64)])


# ---------------------------------------------------------------------- the harness


@dataclass
class _Triplets:
    """The Task 1 slices of one subject on the model's crop: previous, next, truth and their keys."""

    previous: np.ndarray
    following: np.ndarray
    truth: np.ndarray
    keys: list[tuple[int, int, int]]  # (seed, frame, slice)
    cropped: CineStack
    params: PreprocessParams

    @property
    def scored(self) -> tuple[slice, slice]:
        """(rows, columns) of the crop that lie inside the image. Where the field of view is
        smaller than the crop, the rest is padding (-1) that every method reproduces exactly;
        scoring it would add the same zero error to every method, raising PSNR and SSIM and
        shrinking their differences, and make the numbers incomparable with the paper's."""
        (y0, x0), (h, w), (height, width) = self.params.crop_start_yx, self.params.crop_size_yx, self.params.resampled_shape_yx
        return slice(max(0, -y0), max(0, min(h, height - y0))), slice(max(0, -x0), max(0, min(w, width - x0)))

    @property
    def scored_fraction(self) -> float:
        rows, columns = self.scored
        h, w = self.params.crop_size_yx
        return (rows.stop - rows.start) * (columns.stop - columns.start) / float(h * w)

    def within_image(self, images: np.ndarray) -> np.ndarray:
        """The scored part of (..., Y, X) crops."""
        rows, columns = self.scored
        return images[..., rows, columns]


def paste_predictions(frame: CineStack, predicted: np.ndarray, data: _Triplets, weight: np.ndarray, interior: list[int]) -> CineStack:
    """The acquired frame with its interior slices replaced by the predicted ones inside the crop
    and, as the engine does, by linear interpolation of their neighbours outside it (never by
    the true slice, which would pull every method towards the real one's scores)."""
    crop = data.cropped.select_frames([0]).with_data(predicted[None].astype(np.float32), frame_times_ms=None)
    restored = undo_preprocess(crop, data.params).data[0]
    out = frame.data.copy()
    linear = 0.5 * (frame.data[0, [n - 1 for n in interior]] + frame.data[0, [n + 1 for n in interior]])
    out[0, interior] = weight * restored + (1.0 - weight) * linear
    return frame.with_data(out)


def every_other_slice_predicted(
    pipeline: UpsamplingPipeline, stack: CineStack, mode: str, steps: int | None, seed: int, batch_size: int | str, tta: bool = False
) -> dict[int, np.ndarray]:
    """Each interior slice n of a cine, (T, Y, X), generated from slices n - 1 and n + 1 by the engine.

    The stack's even and its odd slices are each upsampled x2 as one cine (their own geometry,
    twice the spacing): the new slices fall on the left-out ones. Each input is normalised over
    half the cine, as the engine normalises a whole one, rather than over two slices only."""
    predicted: dict[int, np.ndarray] = {}
    for first in (0, 1):
        kept = list(range(first, stack.n_slices, 2))
        if len(kept) < 2:
            continue
        half = stack.with_data(stack.data[:, kept], spacing=(stack.spacing[0], stack.spacing[1], 2.0 * stack.spacing[2]), origin=tuple(stack.slice_origin(first)))
        dense = pipeline.upsample(half, 2, mode, steps, seed, batch_size=batch_size, tta=tta)
        for i in range(len(kept) - 1):
            predicted[kept[i] + 1] = dense.data[:, 2 * i + 1]
    return predicted


class Evaluation:
    """Runs the selected tasks and writes the report; see the module docstring."""

    def __init__(self, config: EvaluationConfig, progress: ProgressFn | None = None, command: str | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda message: None)
        self.command = command if command is not None else " ".join(["calid"] + sys.argv[1:])
        self.pipeline: UpsamplingPipeline = load_pipeline("linear" if set(config.methods) <= set(PIXEL_METHODS) else config.model, config.device)
        #: DDIM steps of calid / calid+ in Tasks 1, 3 and 4: the given count or the model's default.
        self.steps = self.pipeline.default_steps if config.steps is None else int(config.steps)
        if self.pipeline.model is not None and self.pipeline.model.config.temporal:
            raise InputError(
                "--model", f"{self.pipeline.name} is a 2D+T model; give a 2D model with --model and the 2D+T model with --temporal-model"
            )
        self.temporal_pipeline: UpsamplingPipeline | None = None
        if config.temporal_model is not None:
            self.temporal_pipeline = load_pipeline(config.temporal_model, config.device)
            if self.temporal_pipeline.model is None or not self.temporal_pipeline.model.config.temporal:
                raise InputError("--temporal-model", f"{config.temporal_model} is not a 2D+T model")
        self.preprocess_config: PreprocessConfig = self._crop_preprocessing()
        if 2 in config.tasks and self.pipeline.model is not None and any(engine_mode(m)[0] in ("calid", "calid+") for m in config.methods):
            for steps in config.sweep_steps:  # checked against the schedule now, not after hours of Task 1
                try:
                    self.pipeline._steps(int(steps))
                except InputError as error:
                    raise InputError("--sweep-steps", error.problem) from None
        self.skipped: dict[str, str] = {}
        self.placeholder_disagreement: dict[str, float] | None = None
        self.methods = [m for m in config.methods if self._method_available(m)]
        self.seg_model: Any = None
        self.seg_reason = ""

    def _method_available(self, method: str) -> bool:
        model = self.pipeline.model
        mode, _ = engine_mode(method)
        if method in PIXEL_METHODS:
            return True
        if model is None:
            self.skipped[method] = "no CaLID model is installed"
            return False
        if mode in ("calid", "calid+", INVERSION_SLERP) and model.net is None:
            self.skipped[method] = "the model is an autoencoder only"
            return False
        if method == INVERSION_SLERP and model.config.denoiser.condition_dropout <= 0 and not self.pipeline.untrained:
            self.skipped[method] = (
                "the model was trained without condition dropout, so its denoiser has no meaningful unconditioned mode; "
                "train with --condition-dropout 0.1 (or more) to evaluate this baseline"
            )
            return False
        return True

    def _crop_preprocessing(self) -> PreprocessConfig:
        """The crop every method is scored on: the model's, also when only pixel methods run (so
        that linear scores the same whichever methods it is listed with); the ``small``
        configuration's when no model is named."""
        if self.pipeline.model is not None:
            return self.pipeline.config.preprocess
        from calid.models.registry import UNTRAINED_PREFIX, default_model, resolve_model

        name = self.config.model
        if name in PIXEL_METHODS:  # --model registration / linear: no network, as no model named
            name = None
        if not name:
            installed = default_model("calid")
            return named_config("small").preprocess if installed is None else self._crop_of(resolve_model(None))
        if str(name).startswith(UNTRAINED_PREFIX):
            return named_config(str(name)[len(UNTRAINED_PREFIX):]).preprocess
        return self._crop_of(resolve_model(name))

    @staticmethod
    def _crop_of(model_file: Path) -> PreprocessConfig:
        from calid.models.checkpoint import read_header

        config: ModelConfig = read_header(model_file)["config"]
        return config.preprocess

    def _placeholder_spacing_mm(self) -> float | None:
        """The pixel size given to files without geometry (see ``EvaluationConfig.placeholder_spacing``)."""
        choice = str(self.config.placeholder_spacing).strip().lower()
        if choice == "keep":
            return None
        if choice == "model":
            from calid.models.checkpoint import recorded_placeholder_spacing

            # A linear-only run loads no network, but the data should still be seen as the model's training saw it.
            value = recorded_placeholder_spacing(self._model_header() or {})
            temporal = self.temporal_pipeline.placeholder_spacing_mm if self.temporal_pipeline is not None else None
            if value is None:
                return temporal  # the only recorded size (also when the 2D side is linear interpolation)
            if temporal is not None and abs(temporal - value) > 1e-6:
                # Both models must see the same data for a like-for-like comparison: the 2D model's size wins, and the report says so.
                self.placeholder_disagreement = {"model_mm": value, "temporal_model_mm": temporal}
            return value
        return fixed_placeholder_mm(choice)

    def _model_header(self) -> dict[str, Any] | None:
        """The header of the 2D model of this run: the loaded one's, or, when only pixel methods run (no network is
        loaded), that of the ``--model`` file; None without a trained model."""
        if self.pipeline.model is not None:
            return self.pipeline.model.info
        from calid.models.registry import UNTRAINED_PREFIX

        if not self.config.model or str(self.config.model).startswith(UNTRAINED_PREFIX):
            return None
        from calid.models.checkpoint import read_raw_header
        from calid.models.registry import resolve_model

        return read_raw_header(resolve_model(self.config.model))

    def _load_seg_model(self) -> None:
        if self.seg_model is not None or self.seg_reason:
            return
        from calid.device import resolve_device
        from calid.models.registry import resolve_model
        from calid.segmentation import load_segmenter

        try:
            self.seg_model = load_segmenter(resolve_model(self.config.seg_model, kind="segmentation"), device=resolve_device(self.config.device))
        except InputError as error:
            self.seg_reason = f"no segmentation model: {error}"

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        config = self.config
        out_dir = Path(config.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(out_dir, "exists and is not a folder; --out needs a folder for the report")
        started = time.perf_counter()
        held_out = None
        if config.subjects is not None and [s.strip().lower() for s in config.subjects] == [HELD_OUT]:
            held_out = self._held_out_subjects()
        assumed_mm = self._placeholder_spacing_mm()
        self.not_evaluated: list[str] = []
        subjects = load_evaluation_subjects(config, assumed_mm, held_out, self.not_evaluated) if set(config.tasks) & {1, 2, 3} or config.temporal_model else []
        self.perceptual = PerceptualMetrics(config.lpips_weights) if 1 in config.tasks or 2 in config.tasks else None
        triplets = {s.name: self._triplets(s) for s in subjects}
        # Only once the inputs have been read: a bad input leaves no empty report folder behind.
        out_dir.mkdir(parents=True, exist_ok=True)
        predictions: dict[str, dict[str, np.ndarray]] = {}
        results: dict[str, Any] = {
            "schema": SCHEMA,
            "command": self.command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": _jsonable(asdict(config)),
            "model": self.pipeline.describe(),
            "steps": self.steps,
            "methods": self.methods,
            "skipped_methods": dict(self.skipped),
            "subjects": sorted({s.subject for s in subjects}),
            "crop": _jsonable(asdict(self.preprocess_config)),
            "volumes": [{"volume": s.name, "subject": s.subject, "frames": s.frames, "labelled_frames": sorted(s.labels), "note": s.frame_note} for s in subjects],
        }
        trained_on = self._evaluated_subjects_trained_on(subjects)
        if trained_on:
            results["trained_on_evaluated_subjects"] = trained_on
            for name, names in trained_on.items():
                warnings.warn(
                    f"the model {name} was trained on {len(names)} of the evaluated subjects ({', '.join(names)}): its scores on them are optimistic; "
                    f"evaluate on subjects it never saw (`calid info {name}` lists its validation subjects)",
                    stacklevel=2,
                )
        assumed_volumes = [s.name for s in subjects if s.assumed_spacing_mm is not None]
        if assumed_volumes:
            results["placeholder_spacing"] = {"assumed_mm": assumed_mm, "volumes": assumed_volumes}
        if self.not_evaluated:
            results["not_evaluated"] = self.not_evaluated
        kept_volumes = [s.name for s in subjects if s.assumed_spacing_mm is None and s.stack.has_placeholder_spacing]
        if kept_volumes:
            # Scored at 1 mm, these volumes are at another scale than a model's evaluation that takes them at its
            # training's size (the crop holds more of the image): the report says so, for like-for-like comparisons.
            why = "--placeholder-spacing keep" if str(self.config.placeholder_spacing).strip().lower() == "keep" else "no model records a pixel size for such files"
            results["placeholder_spacing_kept"] = {"volumes": kept_volumes, "why": why}
            self.progress(f"note: {len(kept_volumes)} volume(s) carry no geometry and are scored at 1 mm pixels ({why}): {', '.join(kept_volumes)}")
        without_geometry = [s.name for s in subjects if s.assumed_spacing_mm is not None or s.stack.has_placeholder_spacing]
        if self.placeholder_disagreement is not None and without_geometry:
            results["placeholder_disagreement"] = {**self.placeholder_disagreement, "volumes": without_geometry}
            self.progress(
                f"note: the 2D+T model's training assumed {self.placeholder_disagreement['temporal_model_mm']:g} mm pixels for files without geometry, "
                f"the 2D model's {self.placeholder_disagreement['model_mm']:g} mm; both are shown {self.placeholder_disagreement['model_mm']:g} mm "
                "(--placeholder-spacing chooses)"
            )
        if 1 in config.tasks or 3 in config.tasks:
            results["task1"], predictions = self._task1(subjects, triplets)
            if 1 not in config.tasks:
                results.pop("task1")
        if 2 in config.tasks:
            results["task2"] = self._task2(subjects, triplets)
        if 3 in config.tasks:
            results["task3"] = self._task3(subjects, triplets, predictions)
        if 4 in config.tasks:
            results["task4"] = self._task4()
        if self.temporal_pipeline is not None:
            results["temporal"] = self._task_temporal(subjects)
        results["seconds"] = round(time.perf_counter() - started, 1)
        self._write(results, subjects, triplets, predictions)
        return results

    def _held_out_subjects(self) -> list[str]:
        """``--subjects held-out``: the validation subjects the model's training recorded, less any that its
        autoencoder or a model it was fine-tuned from learnt (and, with a 2D+T model, less those that one learnt)."""
        header = self._model_header()
        recorded = recorded_training_data(header, "validation_subjects") if header is not None else None
        if header is None or not isinstance(recorded, list) or not recorded:
            if header is not None or self.config.model:  # (an untrained model given with pixel methods only has no header read)
                what = f"the model {self.config.model or self.pipeline.name} records no validation subjects"
            else:
                what = "no trained model is given (--model)"
            raise InputError("--subjects", f"{HELD_OUT}: {what}; name the subjects instead")
        seen = subjects_learnt(header)
        if self.temporal_pipeline is not None and self.temporal_pipeline.model is not None:
            seen |= subjects_learnt(self.temporal_pipeline.model.info)
        unseen = [str(subject) for subject in recorded if str(subject) not in seen]
        if not unseen:
            raise InputError("--subjects", f"{HELD_OUT}: every validation subject of the model was learnt by its autoencoder or by a model it was fine-tuned from; name the subjects instead")
        return unseen

    def _evaluated_subjects_trained_on(self, subjects: list[EvalSubject]) -> dict[str, list[str]]:
        """For each model of this run, the evaluated subjects its training recorded as training subjects."""
        evaluated = {s.subject for s in subjects}
        found: dict[str, list[str]] = {}
        for pipeline, given in ((self.pipeline, self.config.model), (self.temporal_pipeline, self.config.temporal_model)):
            if pipeline is None or pipeline.model is None:
                continue
            overlap = sorted(evaluated & subjects_learnt(pipeline.model.info))
            if overlap:
                found[str(given or pipeline.name)] = overlap  # as the user named it (a file path, or the installed default)
        return found

    # ------------------------------------------------------------------ task 1
    def _triplets(self, subject: EvalSubject) -> _Triplets:
        cropped, params = preprocess(subject.stack, self.preprocess_config)
        previous, following, truth, keys = [], [], [], []
        for t in subject.frames:
            for n in range(1, subject.stack.n_slices - 1):
                previous.append(cropped.data[t, n - 1])
                following.append(cropped.data[t, n + 1])
                truth.append(cropped.data[t, n])
                keys.append((self.config.seed, t, n))
        return _Triplets(np.asarray(previous, np.float32), np.asarray(following, np.float32), np.asarray(truth, np.float32), keys, cropped, params)

    def _predict(self, method: str, previous: np.ndarray, following: np.ndarray, keys: list[tuple[int, int, int]], steps: int | None = None) -> np.ndarray:
        if steps is None:
            steps = self.config.baseline_steps if method == INVERSION_SLERP else self.steps
        mode, tta = engine_mode(method)
        return self.pipeline.interpolate_slices(previous, following, mode, steps, keys, batch_size=self.config.batch_size, tta=tta)

    def _task1(self, subjects: list[EvalSubject], triplets: dict[str, _Triplets]) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
        perceptual = self.perceptual
        per_subject: list[dict[str, Any]] = []
        predictions: dict[str, dict[str, np.ndarray]] = {s.name: {} for s in subjects}
        features: dict[str, list[np.ndarray]] = {m: [] for m in self.methods + ["real"]}
        for index, subject in enumerate(subjects):
            data = triplets[subject.name]
            if not len(data.truth):
                continue
            truth = data.within_image(data.truth)
            truth_unit = _unit(truth)
            if perceptual is not None and perceptual.available:
                features["real"].append(perceptual.features(truth))
            for method in self.methods:
                self.progress(f"task 1: {subject.subject} ({index + 1}/{len(subjects)}), {method}, {len(data.truth)} slices")
                started = time.perf_counter()
                predicted = self._predict(method, data.previous, data.following, data.keys)
                seconds = time.perf_counter() - started
                predictions[subject.name][method] = predicted
                predicted = data.within_image(predicted)
                unit = _unit(predicted)
                row: dict[str, Any] = {
                    "subject": subject.subject,
                    "volume": subject.name,
                    "method": method,
                    "slices": len(predicted),
                    "scored_fraction": data.scored_fraction,
                    "psnr": float(np.mean(psnr(unit, truth_unit))),
                    "ssim": float(np.mean(ssim(unit, truth_unit))),
                    "lpips": float("nan"),
                    "ms_per_slice": 1000.0 * seconds / len(predicted),
                }
                if perceptual is not None and perceptual.available:
                    row["lpips"] = float(np.mean(perceptual.lpips(predicted, truth)))
                    features[method].append(perceptual.features(predicted))
                per_subject.append(row)
        per_volume = per_subject
        per_subject = pool_by_subject(per_volume, ("method",), IMAGE_METRICS + ("ms_per_slice",), weight="slices")
        summary: dict[str, Any] = {}
        for method in self.methods:
            rows = [r for r in per_subject if r["method"] == method]
            summary[method] = {metric: mean_ci([r[metric] for r in rows], metric) for metric in IMAGE_METRICS + ("ms_per_slice",)}
            summary[method]["slices"] = int(sum(r["slices"] for r in rows))
            summary[method]["frechet_alexnet"] = self._frechet(features.get(method, []), features["real"])
        notes = []
        if perceptual is not None and not perceptual.available:
            notes.append(perceptual.reason)
        crop = self.preprocess_config
        if crop.crop_size is not None:
            notes.append(
                f"Every method is scored on the same {crop.crop_size[1]} x {crop.crop_size[0]} pixel crop around the heart"
                + (f" at {crop.target_spacing_mm:g} mm pixels" if crop.target_spacing_mm else "")
                + " (the model's preprocessing; the `small` configuration's when no model is named or installed): compare with reports made on the same crop."
            )
        fractions = [triplets[s.name].scored_fraction for s in subjects if len(triplets[s.name].truth)]
        scored_fraction = float(np.mean(fractions)) if fractions else float("nan")
        if fractions and min(fractions) < 1.0:
            notes.append(
                f"Scored inside the image only: where the field of view is smaller than the model's crop, the padding is left out "
                f"({100 * scored_fraction:.0f} % of the crop scored on average, {100 * min(fractions):.0f} % at least)."
            )
        notes.append("Fréchet distance on AlexNet conv5 features pooled over space (not the Inception FID of the paper; no Inception weights are used).")
        if any(len(np.concatenate(f)) < FRECHET_FEATURES for f in features.values() if f):
            notes.append(f"The Fréchet distance from fewer than {FRECHET_FEATURES} slices (the feature dimension) is biased upwards; compare it between methods only.")
        unstable = [m for m in self.methods if not math.isfinite(summary[m]["frechet_alexnet"]) and features.get(m)]
        if unstable:
            notes.append(f"No Fréchet distance for {', '.join(unstable)}: too few slices for a stable estimate.")
        return {
            "per_subject": per_subject, "per_volume": per_volume, "summary": summary, "notes": notes, "device": self.pipeline.describe()["device"], "scored_fraction": scored_fraction,
        }, predictions

    @staticmethod
    def _frechet(generated: list[np.ndarray], real: list[np.ndarray]) -> float:
        if not generated or not real:
            return float("nan")
        a, b = np.concatenate(generated), np.concatenate(real)
        if len(a) < 2 or len(b) < 2:
            return float("nan")
        try:
            return frechet_distance(a, b)
        except ValueError:  # the matrix square root of rank-deficient covariances: no stable estimate
            return float("nan")

    # ------------------------------------------------------------------ task 2
    def _task2(self, subjects: list[EvalSubject], triplets: dict[str, _Triplets]) -> dict[str, Any]:
        modes = [m for m in ("calid", "calid+") if m in self.methods]
        if not modes:
            return {"skipped": "needs the calid or calid+ method (and a CaLID model); the -tta variants are not swept"}
        pool = [(name, i) for name in (s.name for s in subjects) for i in range(len(triplets[name].truth))]
        if not pool:
            return {"skipped": "no interior slices"}
        chosen = [pool[int(i)] for i in np.unique(np.linspace(0, len(pool) - 1, min(self.config.sweep_slices, len(pool))).round().astype(int))]
        previous = np.stack([triplets[n].previous[i] for n, i in chosen])
        following = np.stack([triplets[n].following[i] for n, i in chosen])
        truth = np.stack([triplets[n].truth[i] for n, i in chosen])
        keys = [triplets[n].keys[i] for n, i in chosen]
        windows = [triplets[n] for n, _ in chosen]

        def scores(predicted: np.ndarray, perceptual: bool) -> dict[str, float]:
            """Mean PSNR, SSIM (and LPIPS) over the chosen slices, each inside its own image."""
            pairs = [(w.within_image(p)[None], w.within_image(t)[None]) for w, p, t in zip(windows, predicted, truth)]
            out = {
                "psnr": float(np.mean([psnr(_unit(p), _unit(t))[0] for p, t in pairs])),
                "ssim": float(np.mean([ssim(_unit(p), _unit(t))[0] for p, t in pairs])),
            }
            if perceptual and self.perceptual is not None and self.perceptual.available:
                out["lpips"] = float(np.mean([self.perceptual.lpips(p, t)[0] for p, t in pairs]))
            return out

        rows = []
        for mode in modes:
            for steps in self.config.sweep_steps:
                self.progress(f"task 2: {mode}, {steps} steps, {len(chosen)} slices")
                started = time.perf_counter()
                predicted = self._predict(mode, previous, following, keys, steps)
                seconds = time.perf_counter() - started
                rows.append({"method": mode, "steps": int(steps), "lpips": float("nan"), **scores(predicted, perceptual=True), "ms_per_slice": 1000.0 * seconds / len(chosen)})
        references = {}
        for method in ("linear", "registration", "latent-linear"):
            if method in self.methods:
                references[method] = scores(self._predict(method, previous, following, keys), perceptual=False)
        return {"slices": len(chosen), "rows": rows, "references": references}

    # ------------------------------------------------------------------ task 3
    def _task3(self, subjects: list[EvalSubject], triplets: dict[str, _Triplets], predictions: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        from calid.segmentation.inference import segment

        labelled = [s for s in subjects if set(s.labels) & set(s.frames)]
        if not labelled:
            return {"skipped": "no evaluated frame has ground-truth labels (give --labels with SUBJECT_frameNN_gt files)"}
        self._load_seg_model()
        if self.seg_model is None:
            return {"skipped": self.seg_reason}
        per_subject: list[dict[str, Any]] = []
        methods = ["real"] + self.methods
        for index, subject in enumerate(labelled):
            data = triplets[subject.name]
            weight = seam_weight(data.params)
            spacing_yx = (subject.stack.spacing[1], subject.stack.spacing[0])
            interior = list(range(1, subject.stack.n_slices - 1))
            for method in methods:
                self.progress(f"task 3: {subject.name} ({index + 1}/{len(labelled)}), {method}")
                scores: dict[int, dict[str, list[float]]] = {v: {m: [] for m in SEG_METRICS} for v in STRUCTURES}
                for position, t in enumerate(subject.frames):
                    if t not in subject.labels:
                        continue
                    frame = subject.stack.select_frames([t])
                    if method != "real":
                        rows = slice(position * len(interior), (position + 1) * len(interior))
                        frame = paste_predictions(frame, predictions[subject.name][method][rows], data, weight, interior)
                    labels = segment(frame, self.seg_model).data[0]
                    for n in interior:
                        for value, values in segmentation_scores(labels[n], subject.labels[t][n], spacing_yx, tuple(STRUCTURES)).items():
                            for metric in SEG_METRICS:
                                scores[value][metric].append(values[metric])
                for value, name in STRUCTURES.items():
                    per_subject.append(
                        {
                            "subject": subject.subject, "volume": subject.name, "method": method, "structure": name, "slices": len(scores[value]["dice"]),
                            **{m: _nanmean(scores[value][m]) for m in SEG_METRICS},
                            **{f"slices {m}": int(np.isfinite(np.asarray(scores[value][m], dtype=np.float64)).sum()) for m in SEG_METRICS},
                        }
                    )
        per_volume = per_subject
        per_subject = pool_by_subject(per_volume, ("method", "structure"), SEG_METRICS, weight="slices")
        summary = {
            method: {
                name: {m: mean_ci([r[m] for r in per_subject if r["method"] == method and r["structure"] == name], m) for m in SEG_METRICS}
                for name in STRUCTURES.values()
            }
            for method in methods
        }
        # Subjects the segmenter was trained on flatter every method (and the real slices) alike: say so.
        training = self.seg_model.info.get("training_data") if isinstance(self.seg_model.info, dict) else None
        trained_on = sorted({s.subject for s in labelled} & set(training.get("train", []) if isinstance(training, dict) else []))
        notes = []
        if trained_on:
            notes.append(
                f"The segmentation model was trained on {len(trained_on)} of these {len({s.subject for s in labelled})} subjects "
                f"({', '.join(trained_on)}): their scores are optimistic for every method; score on its held-out subjects for a fair comparison."
            )
        # Not trained on, but its checkpoint was chosen by the validation Dice on them: a milder optimism, said too.
        chose_on = sorted({s.subject for s in labelled} & set(training.get("validation", []) if isinstance(training, dict) else []))
        if chose_on:
            notes.append(
                f"The segmentation model's checkpoint was chosen by its validation Dice on {len(chose_on)} of these subjects ({', '.join(chose_on)}): "
                "not trained on, but its scores on them (the real slices' included) are slightly optimistic, alike for every method."
            )
        return {
            "per_subject": per_subject, "per_volume": per_volume, "summary": summary, "notes": notes, "segmenter_training_subjects": trained_on,
            "segmentation_model": self.config.seg_model or Path(self.seg_model.path).stem,  # as asked for: the installed default by name
        }

    # ------------------------------------------------------------------ task 4
    def _task4(self) -> dict[str, Any]:
        from calid.geometry.volumes import cardiac_function, structure_volumes_ml
        from calid.segmentation.inference import segment

        self._load_seg_model()
        methods = [m for m in self.methods if m != INVERSION_SLERP]
        notes = []
        if INVERSION_SLERP in self.methods:
            notes.append("inversion-slerp is a single-gap baseline and is not run through the bisection engine in Task 4.")
        if any(engine_mode(m)[0] not in PIXEL_METHODS for m in methods):
            notes.append(
                "PSNR / SSIM over the whole field of view, as `calid upsample` writes it: the model methods generate new slices inside the "
                "model's crop around the heart and interpolate them linearly outside it (Task 1 scores the crop only)."
            )
        factor = self.config.factor
        per_subject: list[dict[str, Any]] = []
        for i in range(self.config.phantoms):
            phantom = make_phantom(3000 + i, evaluation_phantom_config())
            frames = [0, phantom.es_frame]
            truth = phantom.truth_for_factor(factor).select_frames(frames)
            true_labels = phantom.labels_for_factor(factor).select_frames(frames)
            true_labels.metadata["upsampling"] = {"input_slice_spacing_mm": phantom.sparse.slice_spacing}
            low, high = (float(v) for v in np.percentile(phantom.sparse.data, self.preprocess_config.percentiles))
            new = np.array([k for k in range(truth.n_slices) if k % factor])
            true_function = cardiac_function(true_labels, ed_frame=0, es_frame=1)
            candidates: list[tuple[str, CineStack | None]] = [(m, None) for m in methods] + [("truth image", truth)]
            for method, given in candidates:
                self.progress(f"task 4: phantom {i + 1}/{self.config.phantoms}, {method}")
                mode, tta = engine_mode(method)
                dense = given if given is not None else self.pipeline.upsample(
                    phantom.sparse, factor, mode, self.steps, self.config.seed, frames=frames, batch_size=self.config.batch_size, tta=tta
                )
                row: dict[str, Any] = {"subject": f"phantom{3000 + i}", "method": method}
                if given is None:
                    a = np.clip((dense.data[:, new] - low) / (high - low), 0, 1).reshape(-1, *dense.shape[2:])
                    b = np.clip((truth.data[:, new] - low) / (high - low), 0, 1).reshape(-1, *truth.shape[2:])
                    row.update(psnr=float(np.mean(psnr(a, b))), ssim=float(np.mean(ssim(a, b))))
                if self.seg_model is not None:
                    labels = segment(dense, self.seg_model)
                    labels.metadata["upsampling"] = {"input_slice_spacing_mm": phantom.sparse.slice_spacing}
                    for value, name in STRUCTURES.items():
                        p, t = np.rint(labels.data) == value, np.rint(true_labels.data) == value
                        total = p.sum() + t.sum()
                        row[f"dice {name}"] = float(2 * (p & t).sum() / total) if total else float("nan")
                        predicted_ml, true_ml = structure_volumes_ml(labels, value), structure_volumes_ml(true_labels, value)
                        # Absolute: an over-estimate at ED and an under-estimate at ES must not cancel.
                        row[f"volume abs error % {name}"] = float(np.mean(100.0 * np.abs(predicted_ml - true_ml) / np.maximum(true_ml, 1e-6)))
                    try:
                        row["lv ef abs error (points)"] = abs(cardiac_function(labels, ed_frame=0, es_frame=1).summary["lv_ef_percent"] - true_function.summary["lv_ef_percent"])
                    except InputError:
                        row["lv ef abs error (points)"] = float("nan")
                per_subject.append(row)
            if self.seg_model is not None:
                sparse_labels = segment(phantom.sparse.select_frames(frames), self.seg_model)
                try:
                    ef = cardiac_function(sparse_labels, ed_frame=0, es_frame=1).summary["lv_ef_percent"]
                except InputError:
                    ef = float("nan")
                per_subject.append({"subject": f"phantom{3000 + i}", "method": "sparse stack (Simpson's)", "lv ef abs error (points)": abs(ef - true_function.summary["lv_ef_percent"])})
        if self.seg_model is None:
            notes.append(f"segmentation scores not computed: {self.seg_reason}")
        else:
            notes.append(
                "The segmenter was trained on real scans; on the synthetic phantoms even the true image segments imperfectly, "
                "so read the segmentation columns against the `truth image` row rather than as absolute accuracy."
            )
        metrics = sorted({k for r in per_subject for k in r if k not in ("subject", "method")}, key=_metric_order)
        summary = {
            method: {m: mean_ci([r.get(m, float("nan")) for r in per_subject if r["method"] == method], m) for m in metrics}
            for method in dict.fromkeys(r["method"] for r in per_subject)
        }
        return {"factor": factor, "phantoms": self.config.phantoms, "per_subject": per_subject, "summary": summary, "metrics": metrics, "notes": notes}

    # ------------------------------------------------------------------ 2D+T
    def _task_temporal(self, subjects: list[EvalSubject]) -> dict[str, Any]:
        """Every interior slice of every cine over the whole cycle, from its two neighbours: the 2D
        model frame by frame against the 2D+T model on whole cines (the engine, factor 2)."""
        assert self.temporal_pipeline is not None
        from calid.evaluation.temporal import frame_to_frame_change

        # label -> (pipeline, test-time augmentation, mode); the tta pairs only when -tta methods were asked for.
        models: dict[str, tuple[UpsamplingPipeline, bool, str]] = {"2D frame by frame": (self.pipeline, False, "calid")}
        if self.pipeline.model is None or self.pipeline.model.net is None:
            models = {"linear": (self.pipeline, False, "linear")}
        if "registration" in self.methods:
            models["registration"] = (self.pipeline, False, "registration")
        models["2D+T"] = (self.temporal_pipeline, False, "calid")
        if any(method in TTA_METHODS for method in self.methods):
            if self.pipeline.model is not None and self.pipeline.model.net is not None:
                models["2D frame by frame, tta"] = (self.pipeline, True, "calid")
            models["2D+T, tta"] = (self.temporal_pipeline, True, "calid")
        per_subject: list[dict[str, Any]] = []
        example: dict[str, np.ndarray] = {}
        scored_fractions: list[float] = []
        for index, subject in enumerate(s for s in subjects if s.stack.n_frames > 1):
            stack = subject.stack
            low, high = (float(v) for v in np.percentile(stack.data, self.preprocess_config.percentiles))
            rows, columns = self._generated_region(stack, [pipeline for pipeline, _, _ in models.values()])
            scored_fractions.append((rows.stop - rows.start) * (columns.stop - columns.start) / float(stack.shape[2] * stack.shape[3]))
            for label, (pipeline, tta, mode) in models.items():
                self.progress(f"temporal: {subject.name}, {label}")
                middles = every_other_slice_predicted(pipeline, stack, mode, self.config.steps, self.config.seed, self.config.batch_size, tta)
                interior = sorted(middles)
                # (slices, T, Y, X), inside the part of the image every model generates
                generated = np.stack([np.clip((middles[n][:, rows, columns] - low) / (high - low), 0, 1) for n in interior])
                truth = np.stack([np.clip((stack.data[:, n, rows, columns] - low) / (high - low), 0, 1) for n in interior])
                change_error = [abs(frame_to_frame_change(g) - frame_to_frame_change(t)) for g, t in zip(generated, truth)]
                per_subject.append(
                    {
                        "subject": subject.subject,
                        "volume": subject.name,
                        "method": label,
                        "slices": int(generated.shape[0]),
                        "psnr": float(np.mean(psnr(generated.reshape(-1, *generated.shape[2:]), truth.reshape(-1, *truth.shape[2:])))),
                        "ssim": float(np.mean(ssim(generated.reshape(-1, *generated.shape[2:]), truth.reshape(-1, *truth.shape[2:])))),
                        "change_error": float(np.mean(change_error)),
                    }
                )
                if index == 0:
                    example["truth"], example[label] = truth[len(truth) // 2], generated[len(generated) // 2]
        if not per_subject:
            return {"skipped": "no cine (more than one frame) to evaluate"}
        pooled = pool_by_subject(per_subject, ("method",), ("psnr", "ssim", "change_error"), weight="slices")
        summary = {label: {m: mean_ci([r[m] for r in pooled if r["method"] == label], m) for m in ("psnr", "ssim", "change_error")} for label in models}
        figure = None
        if example:
            figure = "temporal_xt.png"
            plot_xt(example, Path(self.config.out_dir) / figure)
        return {
            "per_subject": pooled, "summary": summary, "models": {k: {**v.describe(), "tta": tta, "mode": mode} for k, (v, tta, mode) in models.items()},
            "figure": figure, "scored_fraction": float(np.mean(scored_fractions)),
        }

    @staticmethod
    def _generated_region(stack: CineStack, pipelines: list[UpsamplingPipeline]) -> tuple[slice, slice]:
        """The rows and columns of the field of view that every model among ``pipelines`` generates: the
        engine fills the rest by linear interpolation, so scoring it would dilute the models' differences
        (as the padding did in Task 1). The whole field of view when no model crops it."""
        from calid.inference.pipeline import seam_weight

        inside = np.ones(stack.shape[2:], dtype=bool)
        for pipeline in {id(p): p for p in pipelines}.values():  # each model once (it serves its plain and its tta rows)
            if pipeline.model is not None:
                _, params = preprocess(stack, pipeline.model.config.preprocess)  # the whole cine, as the engine normalises it
                inside &= seam_weight(params) >= 1.0 - 1e-6  # where the engine's output is the model's alone (not the blend at the seam)
        rows, columns = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if rows.size == 0 or columns.size == 0:
            return slice(0, stack.shape[2]), slice(0, stack.shape[3])
        return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)

    # ------------------------------------------------------------------ outputs
    def _write(self, results: dict[str, Any], subjects: list[EvalSubject], triplets: dict[str, _Triplets], predictions: dict[str, dict[str, np.ndarray]]) -> None:
        out = Path(self.config.out_dir)
        figures = []
        if "task2" in results and "rows" in results["task2"]:
            figures.append(("steps.png", "Quality against the number of DDIM steps (Task 2)"))
            plot_steps(results["task2"], out / "steps.png")
        if predictions and any(predictions.values()):
            figures.append(("examples.png", "Examples: neighbours, truth, each method and its absolute error (Task 1)"))
            plot_examples(subjects, triplets, predictions, self.methods, out / "examples.png", self.config.examples)
        if results.get("temporal", {}).get("figure"):
            figures.append((results["temporal"]["figure"], "x–t and y–t cuts through the middle of one generated slice over the cardiac cycle (2D vs 2D+T)"))
        results["figures"] = [name for name, _ in figures]
        results["tables"] = []
        for task, name in TABLES.items():
            rows = results.get(task, {}).get("per_subject")
            if rows:
                write_csv(rows, out / name)
                results["tables"].append(name)
        # A folder evaluated again with fewer tasks: an earlier run's tables and figures would sit beside a report that no longer has them.
        for name in set(TABLES.values()) | set(FIGURES):
            if name not in results["tables"] and name not in results["figures"]:
                (out / name).unlink(missing_ok=True)
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
        with atomic_path(out / "report.md") as tmp:
            tmp.write_text(render_report(results, figures))


# ---------------------------------------------------------------------- helpers


def _unit(images: np.ndarray) -> np.ndarray:
    """Normalised crops [-1, 1] -> [0, 1], the range every metric is computed on."""
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _metric_order(name: str) -> tuple[int, str]:
    order = ("psnr", "ssim", "dice", "volume", "lv ef")
    return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order)), name


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: NaN / inf become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def plot_steps(task2: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        for method in dict.fromkeys(r["method"] for r in task2["rows"]):
            rows = [r for r in task2["rows"] if r["method"] == method]
            ax.plot([r["steps"] for r in rows], [r[metric] for r in rows], marker="o", label=method)
        for (method, values), style in zip(task2.get("references", {}).items(), ("--", ":", "-.")):
            ax.axhline(values[metric], color="grey", linestyle=style, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("DDIM steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"Middle-slice quality against DDIM steps ({task2['slices']} slices)")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_examples(
    subjects: list[EvalSubject], triplets: dict[str, _Triplets], predictions: dict[str, dict[str, np.ndarray]], methods: list[str], path: Path, count: int
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for subject in subjects[: max(1, count)]:
        data = triplets[subject.name]
        if len(data.truth):
            picks.append((subject.name, len(data.truth) // 2))
    columns = 3 + len(methods)
    figure, axes = plt.subplots(2 * len(picks), columns, figsize=(1.9 * columns, 4.0 * len(picks)), squeeze=False)
    for row, (name, index) in enumerate(picks):
        data = triplets[name]
        key = data.keys[index]
        top, bottom = axes[2 * row], axes[2 * row + 1]
        panels = [("previous", data.previous[index]), ("next", data.following[index]), (f"truth\n{name} t{key[1]} z{key[2]}", data.truth[index])]
        panels += [(method, predictions[name][method][index]) for method in methods]
        for ax, (title, image) in zip(top, panels):
            ax.imshow(_unit(image), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
        for ax, method in zip(bottom[3:], methods):
            error = np.abs(_unit(predictions[name][method][index]) - _unit(data.truth[index]))
            ax.imshow(error, cmap="magma", vmin=0, vmax=0.5)
            # The PSNR of the tables: inside the image, without the crop's padding.
            scored = psnr(_unit(data.within_image(predictions[name][method][index]))[None], _unit(data.within_image(data.truth[index]))[None])
            ax.set_title(f"|error| {float(np.mean(scored)):.1f} dB", fontsize=8)
        for ax in list(top) + list(bottom):
            ax.axis("off")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_xt(example: dict[str, np.ndarray], path: Path) -> Path:
    """x–t and y–t cuts (through the image centre) of the true and generated slices over the cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calid.evaluation.temporal import xt_cuts

    figure, axes = plt.subplots(2, len(example), figsize=(2.6 * len(example), 5.0), squeeze=False)
    for column, (label, clip) in enumerate(example.items()):
        x_t, y_t = xt_cuts(clip)
        for row, (cut, name) in enumerate(((x_t, "x–t"), (y_t, "y–t"))):
            axes[row][column].imshow(cut, cmap="gray", vmin=0, vmax=1, aspect="auto")
            axes[row][column].set_title(f"{label}: {name}", fontsize=8)
            axes[row][column].set_xlabel("x" if row == 0 else "y", fontsize=7)
            axes[row][column].set_ylabel("frame", fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def _fmt(summary: dict[str, Any], digits: int = 2) -> str:
    mean, (low, high) = summary["mean"], summary["ci95"]
    if mean is None or not math.isfinite(mean):
        return "–"
    if low is None or not math.isfinite(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def render_report(results: dict[str, Any], figures: list[tuple[str, str]]) -> str:
    """The markdown report: setup, then one section with tables per task."""
    model = results["model"]
    lines = [
        "# CaLID evaluation report",
        "",
        f"Produced by `{results['command']}` on {results['created']} ({results['seconds']} s).",
        "",
        (f"- Model: `{model['model']}`" + (f" (sha256 `{model['model_sha256'][:16]}…`)" if model.get("model_sha256") else ""))
        if model["model"] not in PIXEL_METHODS
        else "- Model: none (the methods evaluated need no model)"
        + (f"; crop and pixel sizes from `{results['config']['model']}`"
           if (results.get("config") or {}).get("model") not in (None, "", *PIXEL_METHODS) else ""),
        f"- Device: {model['device']}",
        f"- Subjects: {len(results['subjects'])} ({', '.join(results['subjects'][:13])}{', …' if len(results['subjects']) > 13 else ''}); "
        f"{_counted(len(results['volumes']), 'volume')}, {_counted(sum(len(v['frames']) for v in results['volumes']), 'frame')}",
        f"- DDIM steps: {results['steps']} (inversion-slerp: {results['config']['baseline_steps']}); seed {results['config']['seed']}",
        "- Means over subjects with 95 % confidence intervals (Student t, clipped to the range of the metric, e.g. Dice at most 1) in brackets.",
    ]
    if results.get("placeholder_spacing"):
        assumed = results["placeholder_spacing"]
        lines.append(
            f"- {len(assumed['volumes'])} volume(s) carry no geometry (1 x 1 x 1 mm): their pixels were taken as {assumed['assumed_mm']:g} mm "
            f"(`--placeholder-spacing`; by default the size the model's training assumed): {', '.join(assumed['volumes'])}"
        )
    if results.get("not_evaluated"):
        lines.append(f"- Not evaluated: {'; '.join(results['not_evaluated'])}")
    if results.get("placeholder_spacing_kept"):
        kept = results["placeholder_spacing_kept"]
        lines.append(
            f"- {len(kept['volumes'])} volume(s) carry no geometry (1 x 1 x 1 mm) and were scored at 1 mm pixels ({kept['why']}): "
            f"{', '.join(kept['volumes'])}. An evaluation that takes them at a model's training size (`--placeholder-spacing MM`, or a "
            "`--model` that records one) scores them at another scale: compare like with like."
        )
    if results.get("placeholder_disagreement"):
        disagreement = results["placeholder_disagreement"]
        lines.append(
            f"- The 2D+T model's training assumed {disagreement['temporal_model_mm']:g} mm pixels for files without geometry, the 2D model's "
            f"{disagreement['model_mm']:g} mm: both models were shown {disagreement['model_mm']:g} mm pixels, to compare them like for like."
        )
    if model.get("untrained"):
        lines += ["", "> **UNTRAINED MODEL**: these numbers only show that the harness runs; they say nothing about CaLID."]
    for name, names in results.get("trained_on_evaluated_subjects", {}).items():
        lines += ["", f"> **Not held out**: the model {name} was trained on {len(names)} of these subjects ({', '.join(names)}); its scores on them are optimistic."]
    for method, reason in results.get("skipped_methods", {}).items():
        lines.append(f"- `{method}` not evaluated: {reason}")
    if "task1" in results:
        task = results["task1"]
        lines += [
            "",
            "## Task 1: middle-slice interpolation (paper Table I)",
            "",
            "Each interior slice predicted from its two acquired neighbours, scored on the model's crop normalised to [0, 1], inside the image (padding left out).",
            "",
            "| Method | Slices | PSNR (dB) ↑ | SSIM ↑ | LPIPS-alex ↓ | Fréchet (AlexNet) ↓ | ms / slice |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, s in task["summary"].items():
            fd = s["frechet_alexnet"]
            fd_text = "–" if fd is None or not math.isfinite(fd) else f"{fd:.2f}"
            lines.append(f"| {method} | {s['slices']} | {_fmt(s['psnr'])} | {_fmt(s['ssim'], 3)} | {_fmt(s['lpips'], 3)} | {fd_text} | {_fmt(s['ms_per_slice'], 2)} |")
        lines += [""] + [f"- {note}" for note in task["notes"]] + [f"- Times on {task['device']}."]
    if "task2" in results:
        task = results["task2"]
        lines += ["", "## Task 2: quality against DDIM steps (paper Fig. 2)", ""]
        if "skipped" in task:
            lines.append(f"Not run: {task['skipped']}.")
        else:
            lines += [f"{task['slices']} slices spread evenly over the Task 1 slices.", "", "| Method | Steps | PSNR (dB) | SSIM | LPIPS | ms / slice |", "|---|---|---|---|---|---|"]
            for r in task["rows"]:
                lpips_text = "–" if r["lpips"] is None or not math.isfinite(r["lpips"]) else f"{r['lpips']:.3f}"
                lines.append(f"| {r['method']} | {r['steps']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {lpips_text} | {r['ms_per_slice']:.1f} |")
            for method, values in task.get("references", {}).items():
                lines.append(f"| {method} (reference) | – | {values['psnr']:.2f} | {values['ssim']:.3f} | – | – |")
    if "task3" in results:
        task = results["task3"]
        lines += ["", "## Task 3: downstream segmentation (paper Table II)", ""]
        if "skipped" in task:
            lines.append(f"Not run: {task['skipped']}.")
        else:
            lines += [
                f"Interior slices replaced by each method's prediction (inside the model's crop; linear interpolation outside it), segmented with `{Path(task['segmentation_model']).name}`, "
                "scored per slice against the ground truth; `real` segments the acquired slices (upper bound).",
                "",
                "| Method | Structure | Dice ↑ | HD95 (mm) ↓ | ASD (mm) ↓ | ASSD (mm) ↓ |",
                "|---|---|---|---|---|---|",
            ]
            for method, structures in task["summary"].items():
                for name, s in structures.items():
                    lines.append(f"| {method} | {name} | {_fmt(s['dice'], 3)} | {_fmt(s['hd95_mm'])} | {_fmt(s['asd_mm'])} | {_fmt(s['assd_mm'])} |")
            if task.get("notes"):
                lines += [""] + [f"- {note}" for note in task["notes"]]
    if "task4" in results:
        task = results["task4"]
        lines += [
            "",
            "## Task 4: phantoms with a dense 3D truth (beyond the paper)",
            "",
            f"{task['phantoms']} synthetic cines upsampled ×{task['factor']} (ED and ES frames) and compared with the truth acquired at every position; "
            "PSNR / SSIM over the new slices; Dice and absolute volume error (% of the true volume, ED and ES frames) after segmenting the whole dense stack; "
            "absolute LV ejection fraction error in percentage points. `truth image` segments the true dense image (upper bound of the segmentation); "
            "`sparse stack (Simpson's)` is the clinical routine on the acquired slices.",
            "",
            "| Method | " + " | ".join(TASK4_HEADERS.get(m, m) for m in task["metrics"]) + " |",
            "|---|" + "---|" * len(task["metrics"]),
        ]
        for method, s in task["summary"].items():
            lines.append(f"| {method} | " + " | ".join(_fmt(s[m], 3 if m.startswith(("ssim", "dice")) else 2) for m in task["metrics"]) + " |")
        lines += [""] + [f"- {note}" for note in task["notes"]]
    if "temporal" in results:
        task = results["temporal"]
        lines += ["", "## 2D+T: temporal coherence (paper Fig. 7)", ""]
        if "skipped" in task:
            lines.append(f"Not run: {task['skipped']}.")
        else:
            lines += [
                "Every interior slice over the whole cycle, from its two neighbours; intensities in [0, 1] from the cine's percentiles; "
                f"scored inside the part of the field of view the models generate ({100 * task.get('scored_fraction', 1.0):.0f} % on average: "
                "the engine fills the rest by linear interpolation). "
                "Change error: |mean frame-to-frame absolute change of the generated slice − that of the true slice| (lower = as smooth in time as the truth).",
                "",
                "| Model | PSNR (dB) ↑ | SSIM ↑ | change error ↓ |",
                "|---|---|---|---|",
            ]
            for label, s in task["summary"].items():
                lines.append(f"| {label} | {_fmt(s['psnr'])} | {_fmt(s['ssim'], 3)} | {_fmt(s['change_error'], 4)} |")
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{caption}]({name})\n\n{caption}.\n" for name, caption in figures]
    return "\n".join(lines) + "\n"


def evaluate(config: EvaluationConfig, progress: ProgressFn | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the evaluation of ``config`` and write its report; returns the results (as in results.json)."""
    return Evaluation(config, progress, command).run()


def _counted(count: int, noun: str) -> str:
    """``1 volume``, ``3 volumes``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
