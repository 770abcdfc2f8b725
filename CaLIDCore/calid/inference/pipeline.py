"""The upsampling engine: a pipeline loaded once from a model file, with one call.

:meth:`UpsamplingPipeline.upsample` turns a sparse short-axis stack or cine
into a dense one by bisection: every gap between two known slices gets its
middle slice, first between the acquired slices (factor 2), then between
those and the new ones (factor 4), and so on. Each level fills the gaps of
all frames of a chunk in large batches:

1. preprocess the whole selection once (in-plane resampling, robust
   normalisation, crop around the heart: the model's training preprocessing);
2. encode the acquired slices (VAE posterior mean, scaled);
3. per level, for a batch of gaps: start latent (``calid``: seeded noise;
   ``calid+``: fixed-point DDIM inversion of both neighbours, slerped), DDIM
   sampling conditioned on the two neighbour slices, decode. New latents are
   kept, so the next level never re-encodes a slice;
4. undo the preprocessing and paste the new slices into the full field of
   view. Outside the crop the new slices are linearly interpolated (the model
   never saw that area), with a soft seam of a few millimetres.

Acquired slices are copied bit for bit; the output's slice spacing is the
input's divided by the factor, origin and direction are unchanged.

Random numbers are drawn per generated slice from a generator seeded by
(seed, frame, output slice index), so the result does not depend on the batch
size or on how frames are chunked, only on the seed (and, in the last bits,
the device).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from calid.data.preprocess import PreprocessParams, preprocess, undo_preprocess
from calid.data.stack import SELECTION_KEYS, CineStack, fixed_placeholder_mm, label_map_warning
from calid.device import available_memory_bytes, describe_device, resolve_device
from calid.diffusion.ddim import NoiseSchedule, ddim_loop, inversion_grid, sampling_grid, slerp
from calid.errors import Cancelled, InputError
from calid.evaluation.methods import INVERSION_SLERP, PIXEL_METHODS, UPSAMPLE_MODES  # also the evaluation's DiffAE-style baseline, run by the engine
from calid.inference.baselines import chained_upsampling_warning, check_factor, upsample_linear, upsampling_record
from calid.inference.registration import RegistrationSettings, moved_to_middle, upsample_registration
from calid.inference.registration import midpoints as registration_midpoints
from calid.models.checkpoint import LoadedModel, load_model, recorded_training_data
from calid.models.config import ModelConfig, named_config
from calid.models.networks import CaLIDNet, apply_floor_snap, build_vae
from calid.models.registry import UNTRAINED_PREFIX, resolve_model, sha256_of

#: ``progress(done, total, message)``: ``done`` and ``total`` count generated slices (``done`` may be fractional).
ProgressFn = Callable[[float, float, str], None]
#: ``cancel()`` returns True to stop as soon as possible.
CancelFn = Callable[[], bool]

MODES: tuple[str, ...] = UPSAMPLE_MODES
MODEL_MODES = ("calid", "calid+", "latent-linear")
#: Modes that need no model: they work on the whole field of view, frame by frame.
PIXEL_MODES = PIXEL_METHODS
# Modes that test-time augmentation applies to (latent-linear and linear are already symmetric under
# turns of the plane; registration nearly so, and it estimates each gap deterministically).
TTA_MODES = ("calid", "calid+")
# The 8 rotations and reflections of the slice plane: (quarter turns, mirror).
PLANE_SYMMETRIES: tuple[tuple[int, bool], ...] = tuple((turns, flip) for flip in (False, True) for turns in range(4))
#: Width (mm) of the band inside the crop border over which generated slices fade into the linear ones.
SEAM_MM = 6.0


def parse_frames(spec: str | int | Sequence[int] | None, n_frames: int, source: str = "--frames", as_given: bool = False) -> list[int] | None:
    """Frame selection from ``None`` (all), an index, a list, or text such as ``"0,5-9"`` or ``"all"``.

    Negative indices count from the end. The result is sorted and unique (a cine runs forward in
    time); ``as_given``: in the order given, repeats kept (to tell the user what was changed).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "all"):
            return None
        values: list[int] = []
        for part in text.split(","):
            single, span = re.fullmatch(r"\s*(-?\d+)\s*", part), re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
            if single:
                values.append(int(single.group(1)))
            elif span and int(span.group(1)) <= int(span.group(2)):
                values.extend(range(int(span.group(1)), int(span.group(2)) + 1))
            elif span:
                first, last = int(span.group(1)), int(span.group(2))
                across = f", or {first}-{n_frames - 1},0-{last} for the frames across the end of the cycle" if first < n_frames else ""
                raise InputError(source, f"the range {first}-{last} runs backwards; write {last}-{first}{across} (frames are always taken in the cine's order)")
            else:
                raise InputError(source, f"cannot read frame selection {spec!r}; write e.g. 0,5-9 or all")
    else:
        items = [spec] if isinstance(spec, (int, np.integer, float, np.floating)) else list(spec) if isinstance(spec, Iterable) else [spec]
        # Whole numbers only: 1.9 or True picking frame 1 would hide a mistake in the caller.
        odd = [v for v in items if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))]
        if odd:
            raise InputError(source, f"frame numbers are whole numbers (e.g. [0, 5, 9] or '0,5-9'); got {odd[0]!r}")
        values = [int(v) for v in items]
    resolved = []
    for value in values:
        if not -n_frames <= value < n_frames:
            raise InputError(source, f"frame {value} does not exist; the cine has {n_frames} frame(s): 0 .. {n_frames - 1}, or -{n_frames} .. -1 counted from the end")
        resolved.append(value % n_frames)
    if not resolved:
        raise InputError(source, "the frame selection is empty")
    return resolved if as_given else sorted(set(resolved))


@dataclass
class _Tracker:
    """Progress in generated slices, and the cancel check between network evaluations."""

    total: float
    progress: ProgressFn | None
    cancel: CancelFn | None
    done: float = 0.0
    message: str = ""

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("upsampling cancelled; nothing was written")

    def advance(self, amount: float, message: str | None = None) -> None:
        self.done = min(self.total, self.done + amount)
        if message is not None:
            self.message = message
        if self.progress is not None:
            self.progress(self.done, self.total, self.message)
        self.check()

    def finish(self, message: str) -> None:
        self.done = self.total
        self.message = message
        if self.progress is not None:
            self.progress(self.total, self.total, message)


@dataclass
class UpsamplingPipeline:
    """A loaded model and the device it runs on; call :meth:`upsample`.

    Build it with :func:`load_pipeline`. ``model`` is None for a pipeline that
    only offers the modes that need no model (``registration`` and ``linear``).
    """

    model: LoadedModel | None
    device: torch.device
    name: str = ""
    untrained: bool = False
    sha256: str = ""
    inversion_iterations: int = 3
    schedule: NoiseSchedule = field(init=False)

    def __post_init__(self) -> None:
        config = self.model.config if self.model is not None else ModelConfig()
        self.schedule = NoiseSchedule(config.schedule)

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> ModelConfig:
        if self.model is None:
            raise InputError("--model", "this pipeline has no model (only the modes 'registration' and 'linear' are available)")
        return self.model.config

    @property
    def default_steps(self) -> int:
        """DDIM steps when the caller does not choose: the model's validated default."""
        return self.model.config.default_steps if self.model is not None else ModelConfig().default_steps

    def describe(self) -> dict[str, Any]:
        """What produced an output: model name, file hash, whether it was trained, device."""
        return {
            "model": self.name,
            "model_sha256": self.sha256,
            "untrained": self.untrained,
            "device": describe_device(self.device),
        }

    def _batch_size(self, batch_size: int | str) -> int:
        """``"auto"`` (from free memory) or a whole number of at least 1; anything else is an input error."""
        batch = 0
        if isinstance(batch_size, str):
            text = batch_size.strip().lower()
            if text == "auto":
                return self.auto_batch_size()
            batch = int(text) if text.isdigit() else 0
        elif isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool):
            batch = int(batch_size)
        if batch < 1:
            raise InputError("batch_size", f"must be a whole number of at least 1 or 'auto', got {batch_size!r}")
        return batch

    def _steps(self, steps: int | None) -> int:
        """The DDIM step count (None: the model's default), checked against the schedule."""
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= int(steps) <= self.schedule.num_train_timesteps:
            raise InputError("steps", f"the number of DDIM steps must be an integer from 1 to {self.schedule.num_train_timesteps}, got {steps!r}")
        return int(steps)

    def auto_batch_size(self) -> int:
        """Slices per network call that fit comfortably in the device's free memory.

        Activation memory of one slice is estimated from the configuration
        (feature maps of every level of the U-Net and ControlNet, and of the
        VAE decoder at full resolution) with a generous factor for temporaries;
        a quarter of the free memory is used.
        """
        config = self.config
        latent = config.latent_size
        denoiser = sum(c * (latent / 2**level) ** 2 for level, c in enumerate(config.denoiser.channels)) * 2 * 12
        decoder = sum(c * (config.image_size / 2**level) ** 2 for level, c in enumerate(config.vae.channels)) * 12
        per_slice = 4.0 * max(denoiser, decoder) * 2  # float32, inversion doubles the batch (calid+)
        if config.temporal:
            per_slice *= config.clip_length  # one batch entry is a whole clip
        budget = available_memory_bytes(self.device) / 4
        limit = 256 if self.device.type == "cuda" else 64
        return int(max(1, min(limit, budget // per_slice)))

    # ------------------------------------------------------------------ the call
    def upsample(
        self,
        stack: CineStack,
        factor: int = 4,
        mode: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        frames: str | int | Sequence[int] | None = None,
        batch_size: int | str = "auto",
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        centre_lps: Sequence[float] | np.ndarray | None = None,
        temporal: bool | None = None,
        assumed_pixel_mm: float | None = None,
        tta: bool = False,
    ) -> CineStack:
        """The dense stack: ``(Z - 1) * factor + 1`` slices at ``slice_spacing / factor``.

        Args:
            stack: the sparse short-axis stack or cine (not modified).
            factor: 2, 4, 8, 16 or 32 (bisection levels).
            mode: ``calid`` (from seeded noise, fast), ``calid+`` (from the slerped DDIM
                inversions of the neighbours), ``latent-linear`` (midpoint of the
                neighbours' VAE latents), ``linear`` (pixel space) or ``registration``
                (the neighbours registered to each other and morphed; see
                :mod:`calid.inference.registration`); the last two need no model.
                None: ``calid`` with a model; without one, the pipeline's own name
                (``load_pipeline("linear")`` or ``load_pipeline("registration")``).
            steps: DDIM steps per generated slice (and per inversion in ``calid+``);
                None = the model's default (:attr:`default_steps`).
            seed: seed of the starting noise (``calid``); the result is reproducible.
            frames: which frames to upsample (None = all; ``"0,5-9"``; a list). The
                output holds these frames only, with their trigger times.
            batch_size: slices per network call, or ``"auto"`` (from free memory).
            progress: ``progress(done, total, message)`` in generated slices.
            cancel: polled between network calls; True raises :class:`Cancelled`.
            centre_lps: physical point (LPS mm) to centre the model's crop on
                (default: the centre of the field of view, as in training).
            temporal: run a 2D+T model on whole cines (clips over the cardiac cycle).
                None follows the model; True with a 2D model is an error. A 2D+T
                model always sees the whole cine (so that every clip is complete);
                ``frames`` then only selects what is returned.
            assumed_pixel_mm: for a stack saved without its geometry (all spacings exactly
                1 mm, :attr:`CineStack.has_placeholder_spacing`): the in-plane pixel size the
                network is shown, e.g. :attr:`placeholder_spacing_mm` (what the model's
                training assumed for such files). The output keeps the stack's stored
                geometry either way; ignored for stacks with a real geometry.
            tta: test-time augmentation (``calid`` and ``calid+``): every gap is generated
                in the 8 rotations and reflections of the slice plane, and the 8 decoded
                slices, turned back, are averaged. About 8 times the denoiser's work; the result is an average,
                smoother than one sample, and scores higher with few steps.
        """
        factor = check_factor(factor, "factor")
        if mode is None:
            mode = ("registration" if self.name == "registration" else "linear") if self.model is None else "calid"
        if not isinstance(stack, CineStack):
            raise TypeError(f"upsample(stack, ...): stack must be a CineStack (calid.read_stack(path) gives one), not {type(stack).__name__}")
        if mode not in MODES:
            raise InputError("mode", f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
            # The noise generator takes 32-bit seeds: a larger or negative one would silently repeat another's results.
            raise InputError("seed", f"must be a whole number from 0 to {2**32 - 1}, got {seed!r}")
        if stack.n_slices < 2:
            raise InputError(stack.source, f"has {stack.n_slices} slice(s); upsampling needs a stack of at least 2 slices")
        steps = self._steps(steps)
        if mode in MODEL_MODES and self.model is None:
            raise InputError("mode", f"mode {mode!r} needs a model; load one with load_pipeline(path or name) or use mode 'registration' or 'linear'")
        if mode in ("calid", "calid+") and self.model is not None and self.model.net is None:
            raise InputError(self.name, f"is an autoencoder only; mode {mode!r} needs a full CaLID model")
        is_temporal = self.model is not None and self.model.config.temporal and mode not in PIXEL_MODES
        if temporal and mode in PIXEL_MODES:
            raise InputError("temporal", f"mode {mode!r} interpolates each frame on its own; temporal upsampling needs mode calid, calid+ or latent-linear and a 2D+T model")
        if temporal and not is_temporal:
            raise InputError("temporal", f"the model {self.name} is a 2D model; temporal upsampling needs a 2D+T model (calid train vae --config small-2d+t)")
        if temporal is False and is_temporal:
            raise InputError("temporal", f"the model {self.name} is a 2D+T model: it always works on whole cines")
        selection = parse_frames(frames, stack.n_frames, "frames")
        processed = None if is_temporal else selection  # a 2D+T model needs every frame of the cycle
        selected = stack if processed is None else stack.select_frames(processed)
        frame_ids = list(range(stack.n_frames)) if processed is None else processed
        n_new = selected.n_frames * (selected.n_slices - 1) * (factor - 1)
        tracker = _Tracker(total=float(n_new), progress=progress, cancel=cancel)
        tracker.check()
        started = time.perf_counter()

        # The pixel size a file without geometry is shown at (the network and the registration work in mm).
        assumed = self._check_assumed_pixel(stack, assumed_pixel_mm) if mode != "linear" else None
        if mode == "registration":
            dense = self._upsample_registration(stack, selected, frame_ids, factor, tracker, assumed)
        else:
            dense = upsample_linear(selected, factor)
        info: dict[str, Any] = {
            **upsampling_record(stack, factor, mode),
            "frames": list(range(stack.n_frames)) if selection is None else selection,
            "temporal": is_temporal,
        }
        warnings = [label_map_warning(stack), chained_upsampling_warning(stack, factor)]
        if assumed is not None:
            info["assumed_pixel_mm"] = assumed
        if mode == "registration":
            info["registration"] = dense.metadata["upsampling"]["registration"]
            warnings.append(placeholder_warning(stack, assumed, "the registration"))
        elif mode != "linear":
            batch = self._batch_size(batch_size)
            # Intensity normalisation from the whole cine, so that a frame comes out the
            # same whichever frames are selected with it.
            seen = stack
            if assumed is not None:
                # Shown to the network at the assumed scale; a centre point keeps its pixel position.
                seen = dataclasses.replace(stack, spacing=(assumed, assumed, stack.spacing[2]))
                if centre_lps is not None:
                    centre_lps = seen.index_to_physical(stack.physical_to_index(np.asarray(centre_lps, dtype=float)))
            cropped, params = preprocess(seen, self.config.preprocess, centre_lps)
            if processed is not None:
                cropped = cropped.select_frames(processed)
            if is_temporal:
                self._fill_crop_temporal(dense, cropped, params, factor, mode, int(steps), seed, batch, tracker, tta)
                if selection is not None:
                    dense = dense.select_frames(selection)
                    # Named as a selection of the input would be: the input may itself be a selection known by its record.
                    for key in SELECTION_KEYS:
                        dense.metadata.pop(key, None)
                    dense.metadata.update(stack.selection_record(selection))
            else:
                self._fill_crop(dense, cropped, params, factor, mode, int(steps), seed, frame_ids, batch, tracker, tta)
            info.update(self.describe())
            info.update(
                steps=int(steps),
                seed=int(seed),
                batch_size=batch,
                tta=bool(tta) and mode in TTA_MODES,
                generated_region=(
                    f"new slices are generated by {mode} inside a {params.crop_size_yx[1]} x {params.crop_size_yx[0]} pixel window of "
                    f"{params.resampled_spacing_xy[0]:g} mm around the heart; outside it they are linearly interpolated"
                ),
                crop=params.to_dict(),
            )
            warnings += [
                None if params.crop_mask().any() else
                "the model's window lies outside the image (check the centre point): every new slice was linearly interpolated, none generated",
                "UNTRAINED MODEL: the generated slices are not meaningful; for testing the pipeline only" if self.untrained else None,
                # The crop is resampled to the model's pixel size: a wrong size shows the network hearts at another scale.
                placeholder_warning(stack, assumed, "the model"),
            ]
        if any(warnings):
            info["warning"] = " | ".join(w for w in warnings if w)
        info["seconds"] = round(time.perf_counter() - started, 3)
        cine_frames = stack.recorded_frames()  # read before the output's record replaces the input's
        dense.metadata["upsampling"] = info
        if cine_frames is not None and "source_frames" not in dense.metadata:
            # An input that is itself a selection known only by its record (a Slicer node upsampled
            # again): the output names the same frames of the cine, not its positions in the input.
            dense.metadata["source_frames"] = [cine_frames[f] for f in info["frames"]]
        tracker.finish(f"done: {dense.n_slices} slices at {dense.slice_spacing:g} mm")
        return dense

    @staticmethod
    def _upsample_registration(stack: CineStack, selected: CineStack, frame_numbers: Sequence[int], factor: int, tracker: _Tracker, assumed: float | None) -> CineStack:
        """Registration-based interpolation of the selected frames, on the whole field of view."""
        seen = selected if assumed is None else dataclasses.replace(selected, spacing=(assumed, assumed, selected.spacing[2]))
        # The whole cine's intensity percentiles, so that a frame comes out the same whichever frames are selected with it.
        low, high = (float(v) for v in np.percentile(stack.data, (0.5, 99.5)))
        dense = upsample_registration(
            seen, factor, gap_done=lambda amount, message: tracker.advance(amount, message), intensity_range=(low, high), frame_numbers=frame_numbers
        )
        # The registration smooths in mm, so it saw the assumed pixels; the output keeps the stored geometry.
        return dense if assumed is None else dense.with_data(dense.data, spacing=(selected.spacing[0], selected.spacing[1], dense.spacing[2]))

    @property
    def placeholder_spacing_mm(self) -> float | None:
        """The pixel size the model's training gave files saved without geometry (None: unknown)."""
        from calid.models.checkpoint import recorded_placeholder_spacing

        return recorded_placeholder_spacing(self.model.info) if self.model is not None else None

    def assumed_pixel_mm_for(self, choice: str | float | None = "model") -> float | None:
        """The ``assumed_pixel_mm`` of :meth:`upsample` for a choice as the command line and the
        Slicer panel word it: ``model`` (or None: what the model's training assumed; None when it
        recorded nothing), ``keep`` (None: the stored 1 mm) or a pixel size in mm (checked)."""
        choice = "model" if choice is None else choice
        size = fixed_placeholder_mm(choice)
        if size is None and str(choice).strip().lower() == "model":
            return self.placeholder_spacing_mm
        return size

    @staticmethod
    def _check_assumed_pixel(stack: CineStack, assumed_pixel_mm: float | None) -> float | None:
        if assumed_pixel_mm is None or not stack.has_placeholder_spacing:
            return None
        return fixed_placeholder_mm(assumed_pixel_mm, words=(), option="assumed_pixel_mm")

    @torch.no_grad()
    def interpolate_slices(
        self,
        previous: np.ndarray,
        following: np.ndarray,
        mode: str = "calid",
        steps: int | None = None,
        seeds: Sequence[tuple[int, int, int]] | None = None,
        batch_size: int | str = "auto",
        tta: bool = False,
    ) -> np.ndarray:
        """The middle slice of each pair of normalised crops, (N, H, W) in [-1, 1] -> (N, H, W).

        One gap per pair, no bisection: what the evaluation scores. ``mode`` is an
        upsampling mode or ``inversion-slerp`` (the unconditioned baseline, which
        needs a denoiser trained with condition dropout to be meaningful).
        ``seeds`` gives the (seed, frame, slice) key of each pair's noise (``calid``).
        ``tta``: average over the 8 rotations and reflections (as in :meth:`upsample`).
        """
        if mode not in MODES + (INVERSION_SLERP,):
            raise InputError("mode", f"unknown mode {mode!r}; choose one of {', '.join(MODES + (INVERSION_SLERP,))}")
        previous = np.asarray(previous, dtype=np.float32)
        following = np.asarray(following, dtype=np.float32)
        if previous.shape != following.shape or previous.ndim not in (3, 4):
            raise InputError("interpolate_slices", f"needs two (N, H, W) (or (N, T, H, W) clips) arrays of the same shape, got {previous.shape} and {following.shape}")
        if mode == "linear":
            return 0.5 * (previous + following)
        if mode == "registration":
            if previous.ndim != 3:
                raise InputError("interpolate_slices", "mode 'registration' takes (N, H, W) slices, not clips")
            # The crops' pixel size: the model's preprocessing (the default model's without a model).
            pixel_mm = (self.config.preprocess if self.model is not None else named_config("small").preprocess).target_spacing_mm
            return registration_midpoints(previous, following, pixel_mm or 1.0)
        if self.model is None:
            raise InputError("mode", f"mode {mode!r} needs a model")
        if mode != "latent-linear" and self.model.net is None:
            raise InputError(self.name, f"is an autoencoder only; mode {mode!r} needs a full CaLID model")
        size = self.config.image_size
        expected = (self.config.clip_length, size, size) if self.config.temporal else (size, size)
        if previous.shape[1:] != expected:
            raise InputError("interpolate_slices", f"the model takes crops of shape {expected}, got {previous.shape[1:]}")
        n = previous.shape[0]
        steps = self._steps(steps)
        keys = list(seeds) if seeds is not None else [(0, 0, i) for i in range(n)]
        batch = self._batch_size(batch_size)
        tracker = _Tracker(total=float(n), progress=None, cancel=None)
        out = np.empty_like(previous)
        for start in range(0, n, batch):
            part = slice(start, min(n, start + batch))
            prev_t = torch.from_numpy(previous[part]).to(self.device)
            next_t = torch.from_numpy(following[part]).to(self.device)
            z_prev, z_next = self._encode(prev_t.unsqueeze(1)), self._encode(next_t.unsqueeze(1))
            condition = torch.stack([prev_t, next_t], dim=1)
            _, image_mid = self._generate(mode, condition, z_prev, z_next, int(steps), keys[part], tracker, "", tta)
            out[part] = image_mid.cpu().numpy()
        return out

    # ------------------------------------------------------------------ internals
    def _fill_crop(
        self,
        dense: CineStack,
        cropped: CineStack,
        params: PreprocessParams,
        factor: int,
        mode: str,
        steps: int,
        seed: int,
        frame_ids: list[int],
        batch: int,
        tracker: _Tracker,
        tta: bool = False,
    ) -> None:
        """Generate the new slices inside the crop, frame chunk by frame chunk, and paste them into ``dense``."""
        new_slices = np.array([i for i in range(dense.n_slices) if i % factor], dtype=np.int64)
        weight = seam_weight(params)
        chunk = max(1, math.ceil(batch / max(1, cropped.n_slices - 1)))
        for first in range(0, cropped.n_frames, chunk):
            frames = slice(first, min(cropped.n_frames, first + chunk))
            generated = self._bisect(cropped.data[frames], factor, mode, steps, seed, frame_ids[frames], batch, tracker, tta)
            new_crop = cropped.with_data(generated[:, new_slices], frame_times_ms=None)
            restored = undo_preprocess(new_crop, params).data
            linear = dense.data[frames, new_slices]
            dense.data[frames, new_slices] = (weight * restored + (1.0 - weight) * linear).astype(dense.data.dtype)

    def _fill_crop_temporal(
        self,
        dense: CineStack,
        cropped: CineStack,
        params: PreprocessParams,
        factor: int,
        mode: str,
        steps: int,
        seed: int,
        batch: int,
        tracker: _Tracker,
        tta: bool = False,
    ) -> None:
        """2D+T: generate whole clips of the cardiac cycle and paste them into ``dense`` (all frames).

        A cine of up to ``clip_length`` frames is one clip, padded cyclically (a cine is
        one cycle); only each frame's first occurrence is kept. Longer cines are cut
        into cyclic clips overlapping by half, blended with triangular weights.
        """
        assert self.model is not None
        length = self.model.config.clip_length
        n_frames = cropped.n_frames
        if n_frames <= length:
            starts = [0]
            position_weight = (np.arange(length) < n_frames).astype(np.float64)
        else:
            starts = list(range(0, n_frames, length // 2))
            position_weight = np.minimum(np.arange(1, length + 1), np.arange(length, 0, -1)).astype(np.float64)
        new_slices = np.array([i for i in range(dense.n_slices) if i % factor], dtype=np.int64)
        accumulated = np.zeros((n_frames, len(new_slices)) + cropped.shape[2:], dtype=np.float64)
        total_weight = np.zeros(n_frames, dtype=np.float64)
        tracker.total = float(len(starts) * (cropped.n_slices - 1) * (factor - 1))
        clips_per_chunk = max(1, math.ceil(batch / max(1, cropped.n_slices - 1)))
        for first in range(0, len(starts), clips_per_chunk):
            chunk = starts[first : first + clips_per_chunk]
            indices = [(start + np.arange(length)) % n_frames for start in chunk]
            clips = np.stack([np.moveaxis(cropped.data[index], 0, 1) for index in indices])  # (clips, Z, L, H, W)
            # Noise keys, one per latent frame: the frame it starts at. Overlapping clips then draw the
            # same noise for the same frames and agree where they are blended (with a downsampled time
            # axis too, as clips start at multiples of half a clip).
            keys: list[Any] = clip_noise_keys(indices, self.model.config.vae.downsampling if self.model.config.time_downsampling else 1)
            generated = self._bisect(clips, factor, mode, steps, seed, keys, batch, tracker, tta)  # (clips, n_dense, L, H, W)
            for index, clip in zip(indices, generated):
                for position, frame in enumerate(index):
                    if position_weight[position] > 0:
                        accumulated[frame] += position_weight[position] * clip[new_slices, position]
                        total_weight[frame] += position_weight[position]
        new_crop = cropped.with_data((accumulated / total_weight[:, None, None, None]).astype(np.float32), frame_times_ms=None)
        restored = undo_preprocess(new_crop, params).data
        weight = seam_weight(params)
        dense.data[:, new_slices] = (weight * restored + (1.0 - weight) * dense.data[:, new_slices]).astype(dense.data.dtype)

    @torch.no_grad()
    def _bisect(
        self, crops: np.ndarray, factor: int, mode: str, steps: int, seed: int, frame_ids: Sequence[Any], batch: int, tracker: _Tracker, tta: bool = False
    ) -> np.ndarray:
        """(U, Z, *E) normalised crops -> (U, (Z - 1) * factor + 1, *E), acquired slices unchanged.

        A unit is one frame (E = (H, W)) for a 2D model, or one clip (E = (L, H, W))
        for a 2D+T model; ``frame_ids`` keys the noise of each unit.
        """
        assert self.model is not None
        device = self.device
        n_frames, n_slices = crops.shape[:2]
        element = tuple(crops.shape[2:])
        n_dense = (n_slices - 1) * factor + 1
        config = self.model.config
        channels, size = config.vae.latent_channels, config.latent_size
        latent_element = (config.latent_clip_length, size, size) if config.temporal else (size, size)
        images = torch.empty((n_frames, n_dense) + element, dtype=torch.float32, device=device)
        latents = torch.empty((n_frames, n_dense, channels) + latent_element, dtype=torch.float32, device=device)
        images[:, ::factor] = torch.from_numpy(crops).to(device)
        acquired = [(t, z) for t in range(n_frames) for z in range(0, n_dense, factor)]
        for start in range(0, len(acquired), batch):
            t_index, z_index = (torch.tensor(v, device=device) for v in zip(*acquired[start : start + batch]))
            latents[t_index, z_index] = self._encode(images[t_index, z_index].unsqueeze(1))
            tracker.check()
        stride, level, levels = factor, 1, int(math.log2(factor))
        while stride > 1:
            half = stride // 2
            gaps = [(t, z) for t in range(n_frames) for z in range(half, n_dense, stride)]
            message = f"level {level}/{levels}"
            for start in range(0, len(gaps), batch):
                part = gaps[start : start + batch]
                t_index, z_index = (torch.tensor(v, device=device) for v in zip(*part))
                previous, following = z_index - half, z_index + half
                condition = torch.stack([images[t_index, previous], images[t_index, following]], dim=1)
                z_prev, z_next = latents[t_index, previous], latents[t_index, following]
                seeds = [(seed, frame_ids[t], z) for t, z in part]
                z_mid, image_mid = self._generate(mode, condition, z_prev, z_next, steps, seeds, tracker, message, tta)
                latents[t_index, z_index] = z_mid
                images[t_index, z_index] = image_mid
                if mode == "latent-linear":
                    tracker.advance(len(part), message)
            stride, level = half, level + 1
        return images.cpu().numpy()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        z_mu, _ = self.model.vae.encode(images)
        return z_mu.float() * self.model.latent_scale

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        decoded = self.model.vae.decode(latents / self.model.latent_scale).float().clamp(-1.0, 1.0)[:, 0]
        return apply_floor_snap(decoded, self.config.vae.floor_snap)

    def _generate(
        self,
        mode: str,
        condition: torch.Tensor,
        z_prev: torch.Tensor,
        z_next: torch.Tensor,
        steps: int,
        seeds: Sequence[tuple[Any, ...]],
        tracker: _Tracker,
        message: str,
        tta: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The middle slices of one batch of gaps: (latents, decoded images in [-1, 1])."""
        if mode in ("calid", "calid+") and self.config.denoiser.registered_neighbours:
            # A registration-guided model sees both neighbours moved to the middle of the gap
            # (and their encodings), as in its training; the baselines keep the acquired ones.
            pixel_mm = float(self.config.preprocess.target_spacing_mm or 1.0)
            pairs = condition.cpu().numpy()
            condition = torch.from_numpy(moved_to_middle(pairs[:, 0], pairs[:, 1], pixel_mm, self._training_registration())).to(condition.device)
            z_prev, z_next = (self._encode(condition[:, k].unsqueeze(1)) for k in (0, 1))
        if not (tta and mode in TTA_MODES):
            z_mid = self._interpolate(mode, condition, z_prev, z_next, steps, seeds, tracker, message)
            return z_mid, self._decode(z_mid)
        # Test-time augmentation: the average over the dihedral group of the slice plane.
        # Each member interpolates the turned / mirrored neighbour images in its own frame
        # (their own encodings, as in training, which encodes turned images; the same
        # noise), its decoded slice is turned back, and the images are averaged. Averaging
        # images rather than latents: a latent generated in a turned frame, turned back, is
        # not the latent of the turned-back image (the encoder is not equivariant), and
        # averaging such latents measured worse. The average is exactly equivariant to
        # turning both neighbour images (a registration-guided model's only as far as the
        # registration is); the next bisection level gets its encoding.
        total = torch.zeros_like(condition[:, 0])
        for turns, flip in PLANE_SYMMETRIES:
            moved = turn_plane(condition, turns, flip)
            if turns == 0 and not flip:
                member_prev, member_next = z_prev, z_next  # already the encodings of the unturned images
            else:
                member_prev, member_next = (self._encode(moved[:, k].unsqueeze(1)) for k in (0, 1))
            member = self._interpolate(mode, moved, member_prev, member_next, steps, seeds, tracker, message, share=1.0 / len(PLANE_SYMMETRIES))
            total += turn_plane(self._decode(member), turns, flip, inverse=True)
        image_mid = total / len(PLANE_SYMMETRIES)
        return self._encode(image_mid.unsqueeze(1)), image_mid

    def _training_registration(self) -> RegistrationSettings:
        """The registration settings a registration-guided model was trained with (its file records
        them; the current defaults for a file without the record)."""
        assert self.model is not None
        recorded = recorded_training_data(self.model.info, "moved_neighbours", "registration")
        if not isinstance(recorded, dict) or not recorded:
            return RegistrationSettings()
        try:
            return RegistrationSettings(**recorded)
        except TypeError as error:
            raise InputError(self.name, f"records registration settings this version does not know ({error}); update CaLID") from error

    def _interpolate(
        self,
        mode: str,
        condition: torch.Tensor,
        z_prev: torch.Tensor,
        z_next: torch.Tensor,
        steps: int,
        seeds: Sequence[tuple[Any, ...]],
        tracker: _Tracker,
        message: str,
        share: float = 1.0,
    ) -> torch.Tensor:
        """Latents of the middle slices of one batch of gaps; ``share`` of the batch's progress is reported."""
        if mode == "latent-linear":
            return 0.5 * (z_prev + z_next)
        assert self.model is not None and self.model.net is not None
        net: CaLIDNet = self.model.net
        if mode == INVERSION_SLERP:
            return self._inversion_slerp(net, z_prev, z_next, steps)
        prediction = self.model.config.denoiser.prediction
        concat = self.model.config.denoiser.concat_neighbour_latents
        batch = z_prev.shape[0]
        iterations = self.inversion_iterations
        # Work of one batch in network evaluations: sampling, plus both inversions in calid+.
        inversion_cost = 2 * steps * (1 + iterations) if mode == "calid+" else 0
        per_evaluation = share * batch / float(steps + inversion_cost)

        def bound(cond: torch.Tensor, neighbour_latents: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return net(x, t, cond, neighbour_latents)

            return model

        neighbour_latents = torch.cat([z_prev, z_next], dim=1) if concat else None
        if mode == "calid+":
            # Both neighbours inverted in one batch, conditioned on the same pair.
            both = torch.cat([z_prev, z_next])
            doubled = bound(torch.cat([condition, condition]), None if neighbour_latents is None else torch.cat([neighbour_latents, neighbour_latents]))
            grid = inversion_grid(steps, self.schedule.num_train_timesteps)
            inverted = ddim_loop(
                doubled,
                both,
                grid,
                self.schedule,
                prediction,
                fixed_point_iterations=iterations,
                callback=lambda i, n: tracker.advance(per_evaluation * 2 * (1 + iterations), message + ", inverting neighbours"),
            )
            z_start = slerp(inverted[:batch], inverted[batch:], 0.5)
        else:
            z_start = torch.stack([self._noise(s, z_prev.shape[1:]) for s in seeds]).to(z_prev.device)
        return ddim_loop(
            bound(condition, neighbour_latents),
            z_start,
            sampling_grid(steps, self.schedule.num_train_timesteps),
            self.schedule,
            prediction,
            callback=lambda i, n: tracker.advance(per_evaluation, message),
        )

    def _inversion_slerp(self, net: CaLIDNet, z_prev: torch.Tensor, z_next: torch.Tensor, steps: int) -> torch.Tensor:
        """DiffAE-style: plain DDIM inversion of both neighbours without the condition, slerp, decode."""
        assert self.model is not None
        prediction = self.model.config.denoiser.prediction

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net.unconditioned(x, t)

        batch = z_prev.shape[0]
        inverted = ddim_loop(model, torch.cat([z_prev, z_next]), inversion_grid(steps, self.schedule.num_train_timesteps), self.schedule, prediction)
        start = slerp(inverted[:batch], inverted[batch:], 0.5)
        return ddim_loop(model, start, sampling_grid(steps, self.schedule.num_train_timesteps), self.schedule, prediction)

    @staticmethod
    def _noise(key: tuple[Any, ...], shape: torch.Size) -> torch.Tensor:
        """Gaussian noise of one generated slice from (seed, frame, output slice index).

        For a clip whose latent keeps every frame, ``frame`` is the tuple of the clip's
        frames and the noise is drawn frame by frame (axis 1 of ``shape``): a frame gets
        the same noise in every overlapping clip, so that overlapping clips agree.
        """
        seed, frame, z = key
        if isinstance(frame, tuple):
            if len(frame) != shape[1]:
                raise ValueError(f"{len(frame)} frames for a latent clip of {shape[1]}")
            per_frame = (shape[0],) + tuple(shape[2:])
            return torch.stack([UpsamplingPipeline._noise((seed, f, z), torch.Size(per_frame)) for f in frame], dim=1)
        state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2, dtype=np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def placeholder_warning(stack: CineStack, assumed: float | None, user: str) -> str | None:
    """What to say about a stack saved without geometry (all spacings exactly 1 mm), whose pixel
    size ``user`` (the model, the registration: both work in mm) was given as ``assumed`` or left at 1 mm."""
    if assumed is not None:
        return (
            f"{stack.source} carries no geometry (all spacings exactly 1 mm, the NIfTI default); its pixels were taken as "
            f"{assumed:g} mm for {user} (the output keeps the stored 1 mm geometry): write the image with its true geometry to be sure"
        )
    if stack.has_placeholder_spacing:
        return (
            f"{stack.source} carries no geometry (all spacings exactly 1 mm, the NIfTI default); {user} was given 1 mm pixels, which is "
            "probably wrong: write the image with its true pixel size and slice spacing, or give the pixel size (--placeholder-spacing MM)"
        )
    return None


def clip_noise_keys(clip_frames: Sequence[np.ndarray], time_step: int = 1) -> list[tuple[int, ...]]:
    """Per clip, the frame each latent frame starts at (every ``time_step``-th frame of the clip):
    the noise keys that make clips overlapping on the same frames draw the same noise there."""
    return [tuple(int(f) for f in np.asarray(frames)[::time_step]) for frames in clip_frames]


def turn_plane(x: torch.Tensor, turns: int, flip: bool, inverse: bool = False) -> torch.Tensor:
    """``x`` turned by ``turns`` quarter turns in its last two axes, then mirrored along the last one if
    ``flip``; ``inverse`` undoes exactly that move."""
    if not inverse:
        x = torch.rot90(x, turns, dims=(-2, -1))
    x = x.flip(-1) if flip else x
    return torch.rot90(x, -turns, dims=(-2, -1)) if inverse else x


def seam_weight(params: PreprocessParams) -> np.ndarray:
    """(Y, X) weight of generated data in the full field of view: 1 inside the crop, fading to 0 at its border."""
    mask = params.crop_mask()
    if mask.all():
        return np.ones(mask.shape, dtype=np.float32)
    distance = ndimage.distance_transform_edt(mask, sampling=(params.source_spacing_xy[1], params.source_spacing_xy[0]))
    return np.clip(np.asarray(distance, dtype=np.float32) / SEAM_MM, 0.0, 1.0)


def untrained_model(config_name: str, seed: int = 0) -> LoadedModel:
    """A randomly initialised model of a named configuration (deterministic for the seed)."""
    try:
        config = named_config(config_name)
    except ValueError as error:
        raise InputError(f"{UNTRAINED_PREFIX}{config_name}", str(error)) from None
    torch.manual_seed(seed)
    vae, net = build_vae(config).eval(), CaLIDNet(config).eval()
    with torch.no_grad():
        # Diffusion networks start with zero output and ControlNet layers, which would make
        # an untrained denoiser ignore its input; small random weights there make every
        # part of the network count, so that trying (and testing) the pipeline exercises it.
        for parameter in net.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter[0].numel()))  # unit gain: 1 / sqrt(fan-in)
    return LoadedModel(config=config, vae=vae, net=net, latent_scale=1.0, info={"info": {"untrained": True}}, path=f"{UNTRAINED_PREFIX}{config_name}")


def load_pipeline(model: str | os.PathLike[str] | None = None, device: str | torch.device = "auto") -> UpsamplingPipeline:
    """Load a model once for many :meth:`UpsamplingPipeline.upsample` calls.

    Args:
        model: a model file, the name of an installed model (``calid info`` lists
            them), ``"untrained:tiny"`` (random weights, for trying the pipeline),
            ``"linear"`` or ``"registration"`` (no model: only the modes that need none,
            with that one as the default), or None for the
            default installed model.
        device: ``auto`` (a CUDA GPU when present, else the CPU), ``cpu``, ``cuda:N``.
    """
    target = resolve_device(device)
    if model is not None and os.fspath(model) in PIXEL_MODES:
        return UpsamplingPipeline(model=None, device=target, name=os.fspath(model))
    if model is not None and os.fspath(model).startswith(UNTRAINED_PREFIX):
        loaded = untrained_model(os.fspath(model)[len(UNTRAINED_PREFIX) :])
        loaded.vae.to(target)
        assert loaded.net is not None
        loaded.net.to(target)
        return UpsamplingPipeline(model=loaded, device=target, name=os.fspath(model), untrained=True)
    path = resolve_model(model)
    loaded = load_model(path, device=target)
    return UpsamplingPipeline(model=loaded, device=target, name=_display_name(model, path), sha256=sha256_of(path))


def _display_name(model: str | os.PathLike[str] | None, path: Path) -> str:
    """The registered name when the file is an installed model, else the file name."""
    from calid.models.registry import registered_models

    for entry in registered_models():
        if entry.path.resolve() == path.resolve():
            return entry.name
    return path.name
