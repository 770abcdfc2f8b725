"""The ``calid`` command (also ``python -m calid``).

Every subcommand exits with status 0 on success, 2 on bad input (with a
message naming the file and the problem) and 1 on unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import calid
from calid.data.io import image_stem
from calid.data.stack import CineStack, describe_upsampling
from calid.errors import CalidError, Cancelled, InputError, OutputError
from calid.evaluation.methods import UPSAMPLE_MODES

EXIT_BAD_INPUT = 2


def _seed(text: str) -> int:
    """argparse type: a seed the random generators take, 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number from 0 to {2**32 - 1}, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expects a whole number from 0 to {2**32 - 1}, got {value}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (checked before anything is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number of at least 1, got {value}")
    return value


def _batch_size(text: str) -> int | str:
    """argparse type: ``auto`` or an integer of at least 1."""
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def _same_file(a: Path, b: Path) -> bool:
    """The same file, by path, symbolic link or hard link."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_output(source: Path, target: Path, overwrite: bool) -> None:
    """Every reason the output could not be written, before any work (a run can take hours)."""
    from calid.data.io import check_output_path

    if _same_file(source, target):
        raise InputError(target, "the output would overwrite the input; choose another output path")
    check_output_path(target, overwrite=overwrite)


def _output_folder(path: str) -> Path:
    """An output folder, made (with its parents) when missing; an existing file there is refused."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "exists and is not a folder; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(folder, f"cannot be created ({error.strerror or error})") from error
    return folder


#: What lax, surfaces and volumes write into their --out folder (glob patterns): an earlier run's
#: files of these names are refused, or replaced with --overwrite, never mixed with a new run's.
LAX_OUTPUTS = tuple(f"{tag}.{kind}" for tag in ("4-chamber", "2-chamber", "3-chamber", "short-axis", "user") for kind in ("nii.gz", "png")) + ("planes.json",)
SURFACE_OUTPUTS = ("frame[0-9][0-9][0-9]_*.vtp", "frame[0-9][0-9][0-9]_*.stl", "frame[0-9][0-9][0-9]_*.obj", "frame[0-9][0-9][0-9]_render.png")
VOLUME_OUTPUTS = ("volumes.csv", "volume_curves.png")


def _clear_earlier_outputs(folder: str, patterns: tuple[str, ...], overwrite: bool, inputs: Sequence[str | None] = ()) -> None:
    """Refuse (or, with --overwrite, remove) an earlier run's outputs in ``folder``: a rerun with other
    frames or planes would otherwise leave the old files beside the new ones, as if from this run.
    The command's own ``inputs`` are never among them."""
    path = Path(folder)
    given = {Path(p).resolve() for p in inputs if p}
    earlier = sorted({f for pattern in patterns for f in path.glob(pattern) if f.is_file() and f.resolve() not in given}) if path.is_dir() else []
    if earlier and not overwrite:
        raise OutputError(earlier[0], f"exists from an earlier run (with {len(earlier) - 1} other file(s)); choose another --out, or give --overwrite to replace that run's files")
    for old in earlier:
        old.unlink()


class _ProgressBar:
    """A tqdm bar (slices, time left) on stderr fed by the engine's ``progress(done, total, message)``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, done: float, total: float, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            # Whole slices read as such ("3/12", not "3.0/12.0"); a registration reports fractions of a gap.
            self.bar = tqdm(total=_whole_if_whole(total), unit="slice", file=sys.stderr, dynamic_ncols=True, leave=False)
        self.bar.set_description_str(message, refresh=False)
        self.bar.update(_whole_if_whole(done) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _whole_if_whole(value: float) -> float:
    value = round(float(value), 3)
    return int(value) if value.is_integer() else value


class _JsonProgress:
    """One JSON object per line on stdout (``{"done": .., "total": .., "message": ..}``) for a
    program that runs ``calid`` in the background, such as the Slicer module."""

    def __call__(self, done: float, total: float, message: str) -> None:
        import json

        print(json.dumps({"done": round(done, 3), "total": round(total, 3), "message": message}), flush=True)

    def close(self) -> None:
        pass


def _stop_requested_by(stop_file: str | None) -> Any:
    """The cancel check for ``--stop-file``: the file exists, or its folder is gone.

    A program that runs ``calid`` through a launcher (Slicer's PythonSlicer) cannot always signal
    the Python process itself: killing the launcher may leave it running. Such a program creates
    the file to cancel, and a worker whose folder was cleaned up stops as well."""
    if stop_file is None:
        return None
    path = Path(stop_file).absolute()
    if not path.parent.is_dir():  # a mistyped path must not look like a cancel
        raise InputError("--stop-file", f"the folder {path.parent} does not exist")

    def stop_requested() -> bool:
        return path.exists() or not path.parent.is_dir()

    return stop_requested


def _stop_if_requested(stop_requested: Any, what: str) -> None:
    """Checked before an output is written: a cancel that came after the last network call."""
    if stop_requested is not None and stop_requested():
        raise Cancelled(f"{what} cancelled; nothing was written")


def _run_upsampling(pipeline: Any, stack: Any, show_progress: bool | str, **options: Any) -> Any:
    bar: Any = _JsonProgress() if show_progress == "json" else _ProgressBar(bool(show_progress))
    try:
        return pipeline.upsample(stack, progress=bar, **options)
    finally:
        bar.close()


def _parse_point(text: str | None, option: str) -> np.ndarray | None:
    """``"R,A,S"`` in mm (RAS, as Slicer and ITK-SNAP show) -> an LPS point."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise InputError(option, f"expects three numbers R,A,S in mm, got {text!r}")
    return np.array([-values[0], -values[1], values[2]])


def _psnr_of_new_slices(dense: Any, truth: Any, factor: int) -> float:
    new = np.ones(dense.n_slices, dtype=bool)
    new[::factor] = False
    error = dense.data[:, new] - truth.data[:, new]
    peak = float(truth.data.max() - truth.data.min())
    return float(10.0 * np.log10(peak**2 / max(float(np.mean(error**2)), 1e-12)))


def _cmd_demo(args: argparse.Namespace) -> int:
    from calid.data.io import write_stack
    from calid.data.phantom import PhantomConfig, make_phantom
    from calid.evaluation.figures import save_comparison
    from calid.inference.baselines import check_factor
    from calid.inference.pipeline import PIXEL_MODES, load_pipeline
    from calid.models.registry import default_model

    factor = check_factor(args.factor, "--factor")
    out = _output_folder(args.out)
    started = time.perf_counter()
    model = args.model
    if args.mode is None:
        args.mode = "calid" if model is not None or default_model() is not None else "registration"
        if args.mode == "registration":
            print(
                "NOTE: no trained CaLID model is installed, so the demo uses registration-based interpolation,\n"
                "which needs none (--mode registration). The pixel-space linear baseline is written beside it.\n"
                "On this phantom, whose true slices are 8 mm thick averages (as smooth through-plane as linear\n"
                "interpolation), registration scores a little below linear; on real held-out cines it scores\n"
                "about 1 dB above it (README, 'Registration-based interpolation').\n"
                "To run the diffusion pipeline end to end with random weights: --model untrained:tiny.",
                flush=True,
            )
    if args.mode in PIXEL_MODES:
        if model is not None:
            print(f"note: mode {args.mode} needs no model; --model is not used", file=sys.stderr)
        model = args.mode  # no network at all
    elif model is None and default_model() is None:
        raise InputError("--mode", f"mode {args.mode} needs a CaLID model and none is installed; use --mode registration or linear, or --model untrained:tiny to try the pipeline")
    pipeline = load_pipeline(model, device=args.device)
    if pipeline.untrained:
        print(f"NOTE: {pipeline.name} is an UNTRAINED network: its slices are not meaningful; it shows the pipeline end to end.", flush=True)
    print(f"Generating the synthetic cine phantom (seed {args.seed}, {args.phantom_frames} frames) ...", flush=True)
    phantom = make_phantom(args.seed, PhantomConfig(n_frames=args.phantom_frames, dense_factor=max(8, factor)))  # a true slice at every new one
    ed, es = 0, phantom.es_frame
    frames = sorted({ed, es}) if args.frames is None else args.frames
    args.steps = pipeline.default_steps if args.steps is None else args.steps
    if args.tta and args.mode not in ("calid", "calid+"):
        print(f"note: --tta applies to modes calid and calid+; it has no effect on mode {args.mode}", file=sys.stderr)
    tta = args.tta and args.mode in ("calid", "calid+")
    averaged = ", averaged over 8 turns/mirrors" if tta else ""
    how = {"linear": "linear interpolation", "registration": "registration-based interpolation"}.get(args.mode, f"{pipeline.name} ({args.mode}, {args.steps} step{'' if args.steps == 1 else 's'}{averaged})")
    print(f"Upsampling x{factor} with {how} on {pipeline.describe()['device']} ...", flush=True)
    dense = _run_upsampling(pipeline, phantom.sparse, not args.quiet, factor=factor, mode=args.mode, steps=args.steps, seed=args.seed, frames=frames, tta=tta)
    chosen = dense.metadata["upsampling"]["frames"]
    linear = load_pipeline("linear").upsample(phantom.sparse, factor, mode="linear", frames=chosen)
    sparse = phantom.sparse.select_frames(chosen)
    truth = phantom.truth_for_factor(factor).select_frames(chosen)
    psnr = {"linear": _psnr_of_new_slices(linear, truth, factor), args.mode: _psnr_of_new_slices(dense, truth, factor)}
    label = f"{args.mode}{' tta' if tta else ''} x{factor}" + (" (UNTRAINED)" if pipeline.untrained else "")
    mode_tag = args.mode.replace("+", "plus") + ("_tta" if tta else "")
    files = {
        "sparse": write_stack(sparse, out / "phantom_sparse.nii.gz"),
        **({} if args.mode == "linear" else {"dense": write_stack(dense, out / f"phantom_{mode_tag}_x{factor}.nii.gz")}),
        "linear": write_stack(linear, out / f"phantom_linear_x{factor}.nii.gz"),
        "truth": write_stack(truth, out / f"phantom_truth_x{factor}.nii.gz"),
        "labels": write_stack(phantom.labels_for_factor(factor).select_frames(chosen), out / f"phantom_truth_labels_x{factor}.nii.gz", dtype="uint8"),
    }
    shown = chosen.index(es) if es in chosen else 0
    thickness = phantom.sparse.metadata["slice_thickness_mm"]
    figures = {
        "long-axis views": save_comparison(
            [(f"acquired ({phantom.sparse.slice_spacing:g} mm apart)", sparse), (label, dense)],
            out / "phantom_long_axis.png",
            frame=shown,
            title=f"Two long-axis cuts, frame {chosen[shown]}",
            axes_shown=("row", "column"),
        ),
        "before / after": save_comparison(
            [(f"acquired ({phantom.sparse.slice_spacing:g} mm apart)", sparse), (f"linear x{factor}", linear), (label, dense), (f"truth ({thickness:g} mm slices)", truth)],
            out / "phantom_before_after.png",
            frame=shown,
            title=f"Long-axis cut, frame {chosen[shown]}. PSNR of the new slices: linear {psnr['linear']:.1f} dB, {args.mode} {psnr[args.mode]:.1f} dB",
        ),
    }
    elapsed = time.perf_counter() - started
    print(
        f"{phantom.sparse.n_slices} slices at {phantom.sparse.slice_spacing:g} mm -> {dense.n_slices} slices at {dense.slice_spacing:g} mm, "
        f"frames {','.join(str(f) for f in chosen)}, {elapsed:.1f} s in all. PSNR of the new slices against the truth: "
        + ", ".join(f"{k} {v:.2f} dB" for k, v in psnr.items())
    )
    for name, path in files.items():
        print(f"  {name:16s} {path}")
    for name, path in figures.items():
        print(f"  {name:16s} {path}")
    return 0


def _cmd_upsample(args: argparse.Namespace) -> int:
    from calid.data.io import read_stack, write_stack
    from calid.inference.baselines import check_factor
    from calid.inference.pipeline import PIXEL_MODES, load_pipeline, parse_frames

    source, target = Path(args.input), Path(args.output)
    _check_output(source, target, args.overwrite)
    factor = check_factor(args.factor, "--factor")
    centre = _parse_point(args.centre_ras, "--centre-ras")
    from calid.data.stack import fixed_placeholder_mm

    fixed_placeholder_mm(args.placeholder_spacing)  # checked before anything is loaded
    if args.tta and args.mode not in ("calid", "calid+"):
        print(f"note: --tta applies to modes calid and calid+; it has no effect on mode {args.mode}", file=sys.stderr)
    if args.steps is not None and args.mode not in ("calid", "calid+"):
        print(f"note: --steps applies to modes calid and calid+; mode {args.mode} takes no diffusion steps", file=sys.stderr)
    started = time.perf_counter()
    pipeline = load_pipeline(args.mode if args.mode in PIXEL_MODES and args.model is None else args.model, device=args.device)
    assumed_pixel = pipeline.assumed_pixel_mm_for(args.placeholder_spacing)
    stack = read_stack(source, series=args.series)
    if not args.quiet:
        _print_reading_note(stack)
    label_warning = _warn_if_labels(stack)  # now, before a run of minutes (the record repeats it)
    frames = parse_frames(args.frames, stack.n_frames)
    if frames is not None and parse_frames(args.frames, stack.n_frames, as_given=True) != frames:
        print(f"note: --frames {args.frames}: the frames are taken in the cine's order, each once: {', '.join(map(str, frames))}", file=sys.stderr)
    args.steps = pipeline.default_steps if args.steps is None else args.steps
    if args.mode in PIXEL_MODES and (args.centre_on_heart or centre is not None):
        print(f"note: the model's window (--centre-ras, --centre-on-heart) has no effect on mode {args.mode}: it works on the whole field of view", file=sys.stderr)
        centre = None
    if args.centre_on_heart and args.mode not in PIXEL_MODES:
        from calid.segmentation.inference import heart_centre_lps

        if centre is not None:
            raise InputError("--centre-on-heart", "give either --centre-on-heart or --centre-ras, not both")
        centre = heart_centre_lps(stack, frame=frames[0] if frames else 0)
        if not args.quiet:
            print(f"centring the model's crop on the heart at R,A,S {-centre[0]:.1f},{-centre[1]:.1f},{centre[2]:.1f} mm", flush=True,
                  file=sys.stderr if args.progress == "json" else sys.stdout)
    stop_requested = _stop_requested_by(args.stop_file)
    dense = _run_upsampling(
        pipeline, stack, "json" if args.progress == "json" else not args.quiet, factor=factor, mode=args.mode, steps=args.steps, seed=args.seed, frames=frames, batch_size=args.batch_size, centre_lps=centre,
        temporal=True if args.temporal else None, assumed_pixel_mm=assumed_pixel, tta=args.tta, cancel=stop_requested,
    )
    _stop_if_requested(stop_requested, "upsampling")
    write_stack(dense, target, overwrite=args.overwrite)
    _note_if_dicom(target, dense)
    info = dense.metadata["upsampling"]
    steps = f", {args.steps} step{'' if args.steps == 1 else 's'}{', averaged over 8 turns/mirrors' if info.get('tta') else ''}" if args.mode in ("calid", "calid+") else ""
    how = f"mode {args.mode}" + ("" if args.mode in PIXEL_MODES else f"{steps}, model {pipeline.name}" + (" (UNTRAINED)" if pipeline.untrained else ""))
    print(
        f"{stack.n_slices} -> {dense.n_slices} slices, {stack.slice_spacing:g} -> {dense.slice_spacing:g} mm, "
        f"{dense.n_frames} frame(s), {how}, {time.perf_counter() - started:.1f} s on {pipeline.describe()['device']}: {target}",
        file=sys.stderr if args.progress == "json" else sys.stdout,  # --progress json: stdout holds JSON lines only
    )
    remaining = [part for part in info.get("warning", "").split(" | ") if part and part != label_warning]
    if remaining:
        _print_warning(" | ".join(remaining))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from calid.models.card import model_card_text
    from calid.models.registry import default_model, model_folders, registered_models

    if args.model is None:
        models = registered_models()
        defaults = {model.path for model in (default_model(kind) for kind in {m.kind for m in models}) if model is not None}
        print("installed models:" if models else "no trained model is installed")
        for model in models:
            described = f": {model.description}" if model.description else f" ({'CaLID' if model.kind == 'calid' else model.kind} model, installed without a description)"
            print(f"  {model.name}{' (default)' if model.path in defaults else ''}{described} [{model.path}]")
        folders = model_folders()
        print("searched folders: " + (", ".join(str(f) for f in folders) or "none exist") + " (add one with $CALID_MODEL_DIR)")
        missing = [entry for entry in os.environ.get("CALID_MODEL_DIR", "").split(os.pathsep) if entry.strip() and not Path(entry).expanduser().is_dir()]
        if missing:
            print(f"note: $CALID_MODEL_DIR names folder(s) that do not exist: {', '.join(missing)}")
        if default_model("calid") is None:
            print("no CaLID interpolation model is installed: --mode registration (or linear) needs none; train one (calid train) and install it (calid install)")
        return 0
    print(model_card_text(args.model))
    return 0


def _load_segmenter(name: str | None, device: str) -> Any:
    from calid.device import resolve_device
    from calid.models.registry import resolve_model
    from calid.segmentation import load_segmenter

    return load_segmenter(resolve_model(name, kind="segmentation"), device=resolve_device(device))


def _cmd_segment(args: argparse.Namespace) -> int:
    from calid.data.io import read_stack, write_stack
    from calid.inference.pipeline import parse_frames
    from calid.segmentation import segment

    source, target = Path(args.input), Path(args.output)
    _check_output(source, target, args.overwrite)  # labels drawn or corrected by hand must never be lost
    started = time.perf_counter()
    model = _load_segmenter(args.model, args.device)
    stack = read_stack(source, series=args.series)
    _warn_if_labels(stack)
    if stack.has_placeholder_spacing:
        _print_warning(
            f"{source} carries no geometry (all spacings exactly 1 mm, the NIfTI default): the segmenter sees 1 mm pixels, "
            "probably the wrong scale, and volumes from these labels are in voxels; write the image with its true geometry"
        )
    frames = parse_frames(args.frames, stack.n_frames)
    if frames is not None:
        stack = stack.select_frames(frames)
    bar: Any = _JsonProgress() if args.progress == "json" else _ProgressBar(not args.quiet)
    stop_requested = _stop_requested_by(args.stop_file)
    try:
        labels = segment(stack, model, progress=bar, cancel=stop_requested)
    finally:
        bar.close()
    _stop_if_requested(stop_requested, "segmentation")
    write_stack(labels, target, dtype="uint8", overwrite=args.overwrite)
    _note_if_dicom(target, labels)
    counts = {name: int((labels.data == value).sum()) for value, name in model.config.labels.items()}
    print(f"{stack.n_frames} frame(s) x {stack.n_slices} slices segmented in {time.perf_counter() - started:.1f} s ({', '.join(f'{k}: {v} voxels' for k, v in counts.items())}): {target}",
          file=sys.stderr if args.progress == "json" else sys.stdout)  # --progress json: stdout holds JSON lines only
    return 0


def _read_labels(path: str) -> Any:
    """A label stack (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity); an intensity image
    given by mistake is refused (its pixels of value 1, 2, 3 would be measured as heart)."""
    from calid.data.io import read_stack

    labels = read_stack(path)
    data = labels.data
    outside = (data < 0) | (data > 3) | (data != np.rint(data))  # one pass: a dense x8 cine has ~10^8 voxels
    if outside.any():
        unexpected = np.unique(data[outside])
        shown = ", ".join(f"{v:g}" for v in unexpected[:5]) + (", ..." if unexpected.size > 5 else "")
        raise InputError(path, f"is not a label image: it holds values other than 0-3 ({shown}); give labels as `calid segment` writes them "
                               "(0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity)")
    return labels


def _labels_for(args: argparse.Namespace, image: Any) -> Any:
    """The label stack given with --labels, or a segmentation of ``image``."""
    from calid.segmentation import segment

    if args.labels:
        return _read_labels(args.labels)  # any grid: planes are placed in physical space
    if image is None:
        raise InputError("--labels", "give a label file, or an image to segment")
    return segment(image, _load_segmenter(args.seg_model, args.device))


#: Stacks with slices this far apart (mm) are shown as acquired (nearest slice) in long-axis views.
SPARSE_SLICE_SPACING_MM = 5.0


def _view(name: str, stack: Any, plane: Any, spacing: float) -> tuple[str, Any]:
    from calid.geometry.reslice import reslice

    if stack.slice_spacing >= SPARSE_SLICE_SPACING_MM and "upsampling" not in stack.metadata:  # an upsampled stack is shown as made
        return f"{name} (acquired slices)", reslice(stack, plane, spacing, through_plane="nearest")
    return name, reslice(stack, plane, spacing)


def _check_labels_lie_on_the_image(label_path: str, labels: CineStack, label_frame: int, image_path: str, image: CineStack, frame: int) -> None:
    """Labels of another scan (another subject, or a file that lost its geometry) would place the
    planes and outlines on the wrong anatomy: refused when they miss the image, else a warning."""
    from calid.geometry.reslice import BLOOD_TO_MUSCLE_MINIMUM, label_fit

    fraction, ratio = label_fit(labels, label_frame, image, frame)
    if fraction is None:
        return  # no heart labelled: the planes' own error says so
    lost = " (its spacings are all 1 mm: its geometry was probably lost)" if labels.has_placeholder_spacing else ""
    if fraction == 0.0:
        raise InputError(
            label_path, f"does not lie on the image {image_path}: none of its heart voxels falls inside the image's volume{lost}; "
            f"give labels of this scan in its coordinates, e.g. from `calid segment {image_path}`",
        )
    if fraction < 0.5:
        _print_warning(f"{label_path}: only {fraction:.0%} of its heart voxels lie inside the image {image_path}{lost}: are the labels of this scan?")
    if ratio is not None and ratio < BLOOD_TO_MUSCLE_MINIMUM:
        _print_warning(
            f"{label_path}: in the image {image_path} (frame {frame}), the labels' LV cavity is not brighter than their myocardium "
            f"(median ratio {ratio:.2f}; a bright-blood cine usually gives 1.5 or more): the labels may be of another scan or another phase"
        )


def _cmd_lax(args: argparse.Namespace) -> int:
    import json

    from calid.atomic import atomic_path
    from calid.data.io import read_stack, write_stack
    from calid.geometry.planes import PLANES_COORDINATES, Plane, standard_planes
    from calid.geometry.reslice import compare_with_acquired, frame_matching, matching_frame, resample_onto, save_plane_png, source_frames

    if not args.spacing > 0:
        raise InputError("--spacing", f"the reslice pixel size must be a positive number of mm, got {args.spacing}")
    image = read_stack(args.input)
    input_name = image_stem(args.input)
    others = list(zip(_distinct_names(args.compare or [], "compared images", taken=(input_name, "input")), [read_stack(p) for p in args.compare or []]))
    frame = args.frame
    if not -image.n_frames <= frame < image.n_frames:
        raise InputError("--frame", f"frame {frame} does not exist (the cine has {image.n_frames} frames)")
    frame %= image.n_frames  # -1: the last
    planes: dict[str, Any] = {}
    if args.plane_ras:
        parts = args.plane_ras.split(";")
        if len(parts) != 3:
            raise InputError("--plane-ras", "give CENTRE;NORMAL;AXIS, each as R,A,S (the axis becomes the image's horizontal direction)")
        centre, normal, axis = (_parse_point(text, "--plane-ras") for text in parts)
        planes = {"user": Plane("user", centre, normal, axis)}  # type: ignore[arg-type]
        labels = _read_labels(args.labels) if args.labels else None
    elif args.points_ras:
        points = [_parse_point(text, "--points-ras") for text in args.points_ras.split(";")]
        if len(points) != 3:
            raise InputError("--points-ras", "give exactly three points R,A,S (centre, a point along the long axis, a third point in the plane)")
        planes = {"user": Plane.from_points("user", *points)}  # type: ignore[arg-type]
        labels = _read_labels(args.labels) if args.labels else None
    else:
        labels = _labels_for(args, image)
    # Labels of other frames (e.g. of one phase only, from calid segment --frames): the phase of the shown frame,
    # found by trigger time or recorded frame numbers. Without either, only labels of one frame or of every frame
    # say which phase they hold.
    image_numbers = source_frames(image)  # the image a selection (--frames 0,11) of a cine: labels of that whole cine fit
    whole_cine = image.metadata.get("source_frame_count") if image_numbers is not None else None
    labels_of_whole_cine = labels is not None and image_numbers is not None and (
        labels.n_frames == whole_cine if isinstance(whole_cine, int) else labels.n_frames > max(image_numbers)
    )
    if (labels is not None and labels.n_frames not in (1, image.n_frames) and frame_matching(labels, image) != "trigger time"
            and source_frames(labels) is None and not labels_of_whole_cine):
        raise InputError(
            args.labels or "labels",
            f"has {labels.n_frames} frames, the image {image.n_frames}, and no frame times to tell which phases they are: "
            "give labels of every frame, or of the shown frame only (calid segment --frames N)",
        )
    label_frame = None if labels is None else matching_frame(labels, image, frame)
    if args.labels and labels is not None and label_frame is not None:
        _check_labels_lie_on_the_image(args.labels, labels, label_frame, args.input, image, frame)
    if labels is not None and labels.n_frames != image.n_frames:
        print(f"note: the labels have {labels.n_frames} frame(s), the image {image.n_frames}: planes and outlines come from label frame {label_frame} "
              f"(matched by {frame_matching(labels, image)})", file=sys.stderr)
    if not planes:
        assert labels is not None and label_frame is not None
        planes = standard_planes(labels, label_frame, three_chamber_point=_parse_point(args.three_chamber_ras, "--three-chamber-ras"))
    views_of_planes = {name: [_view(input_name, image, plane, args.spacing)] + [_view(n, s, plane, args.spacing) for n, s in others] for name, plane in planes.items()}
    for name, views in views_of_planes.items():
        if views[0][1].metadata["covered_fraction"] == 0.0:
            raise InputError(f"plane {name}", f"does not cross the image {args.input}: check the coordinates (RAS millimetres, as Slicer shows them)")
    summary: dict[str, Any] = {"coordinates": PLANES_COORDINATES, "planes": {}}
    if args.acquired_lax:  # compared before anything is written: an image that does not fit leaves no half-made folder
        acquired = read_stack(args.acquired_lax, min_slices=1)
        summary["comparison_with_acquired"] = {n: compare_with_acquired(s, acquired) for n, s in [("input", image), *others]}
    given = [args.input, args.labels, args.acquired_lax, *(args.compare or [])]
    written = [Path(args.out) / f"{name.replace(' ', '-')}.{kind}" for name in planes for kind in ("nii.gz", "png")] + [Path(args.out) / "planes.json"]
    clash = sorted({str(path) for path in written for other in given if other and path.resolve() == Path(other).resolve()})
    if clash:
        raise OutputError(clash[0], "is an input of this command and would be replaced by a view; give another --out")
    _clear_earlier_outputs(args.out, LAX_OUTPUTS, args.overwrite, given)
    out = _output_folder(args.out)  # once the images are read and the frame and planes checked: no empty folder on a mistake
    # The compared cines may have other frame counts: each shows the frame of the same cardiac phase.
    view_frames = [frame] + [matching_frame(stack, image, frame) for _, stack in others]
    if others:
        summary["compared_frames"] = {n: {"frame": k, "matched_by": frame_matching(s, image)} for (n, s), k in zip(others, view_frames[1:])}
    # The title names the cine's own frame number for a selection, and which label frame is outlined when it is another file's.
    shown = f"frame {frame}" + (f" (frame {image_numbers[frame]} of the cine)" if image_numbers is not None and image_numbers[frame] != frame else "")
    if labels is not None and labels.n_frames != image.n_frames:
        shown += f"; outlines: label frame {label_frame} (matched by {frame_matching(labels, image)})"
    for name, plane in planes.items():
        tag = name.replace(" ", "-")
        views = views_of_planes[name]
        outline = resample_onto(labels.select_frames([label_frame]), views[0][1]) if labels is not None else None  # labels on any grid
        write_stack(views[0][1], out / f"{tag}.nii.gz")
        png = save_plane_png(views, out / f"{tag}.png", frame=view_frames, labels=outline, title=f"{name} plane, {shown}")
        summary["planes"][name] = plane.to_record()
        print(f"  {name:15s} {png}")
    if args.acquired_lax:
        for n, result in summary["comparison_with_acquired"].items():
            print(f"  vs {Path(args.acquired_lax).name}: {n}: PSNR {result['psnr_db']:.2f} dB, SSIM {result['ssim']:.3f}, NCC {result['ncc']:.3f} (frames matched by {result['frames_matched_by']})")
    with atomic_path(out / "planes.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"planes and views written to {out}")
    return 0


def _cmd_surfaces(args: argparse.Namespace) -> int:
    import os

    from calid.geometry.surfaces import label_surface, render_surfaces, write_surface
    from calid.inference.pipeline import parse_frames
    from calid.segmentation.model import LABELS

    labels = _read_labels(args.labels)
    frames = parse_frames(args.frames, labels.n_frames) or list(range(labels.n_frames))
    surfaces_of = {frame: {name: label_surface(labels, value, frame) for value, name in LABELS.items()} for frame in frames}
    if not any(surface.GetNumberOfPoints() for surfaces in surfaces_of.values() for surface in surfaces.values()):
        raise InputError(args.labels, f"has no {', '.join(LABELS.values())} label in frame(s) {', '.join(map(str, frames))}: no surface written")
    _clear_earlier_outputs(args.out, SURFACE_OUTPUTS, args.overwrite, [args.labels])
    out = _output_folder(args.out)  # only once there is something to write
    written = 0
    for frame, surfaces in surfaces_of.items():
        for name, surface in surfaces.items():
            if surface.GetNumberOfPoints():
                write_surface(surface, out / f"frame{frame:03d}_{name.replace(' ', '_').lower()}.{args.format}")
                written += 1
        if args.render:
            os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
            render_surfaces(surfaces, out / f"frame{frame:03d}_render.png")
    print(f"{written} surface(s) of {len(frames)} frame(s) (LPS mm) written to {out}")
    return 0


def _frames_of_one_cine(inputs: list[tuple[str, Any]]) -> Any:
    """Single-frame label files of one heart (ACDC's ED and ES files, e.g.) as the frames of one cine,
    in the order given; they must share one grid (the same acquisition)."""
    if len(inputs) < 2:
        raise InputError("--frames-of-one-cine", "give at least two label files (e.g. the ED and the ES file)")
    first_path, first = inputs[0]
    for path, labels in inputs[1:]:
        if not labels.same_geometry(first):
            raise InputError(path, f"has another grid than {first_path}; --frames-of-one-cine needs label files of one acquisition")
    if any(labels.n_frames != 1 for _, labels in inputs):
        raise InputError("--frames-of-one-cine", "takes single-frame label files (e.g. the ED and the ES file)")
    joined = first.with_data(np.concatenate([labels.data for _, labels in inputs]), frame_times_ms=None)
    for key in ("source_frames", "source_frame_count"):  # the first file's record is not the joined stack's
        joined.metadata.pop(key, None)
    return joined


def _distinct_names(paths: Sequence[str], what: str, taken: Sequence[str] = ()) -> list[str]:
    """A name for each file, to label results: its stem, with its folder where two stems are the same
    (sparse/labels.nii.gz and dense/labels.nii.gz), or where a stem is one of ``taken``."""
    names = [image_stem(path) for path in paths]
    names = [f"{Path(path).resolve().parent.name}/{name}" if names.count(name) > 1 or name in taken else name for path, name in zip(paths, names)]
    if len(set(names)) < len(names) or set(names) & set(taken):
        raise InputError(", ".join(str(path) for path in paths), f"two {what} have the same name and folder name; give each its own name")
    return names


def _cmd_volumes(args: argparse.Namespace) -> int:
    from calid.geometry.reslice import source_frames
    from calid.geometry.volumes import cardiac_function, plot_volume_curves, write_function_csv

    results = {}
    inputs = [(path, _read_labels(path)) for path in args.labels]
    if args.frames_of_one_cine:
        inputs = [(args.labels[0], _frames_of_one_cine(inputs))]
    names = _distinct_names([path for path, _ in inputs], "label files")
    for (path, labels), name in zip(inputs, names):
        result = cardiac_function(labels, args.ed, args.es, method=Path(path).name, acquired_slice_spacing_mm=args.acquired_slice_spacing)
        results[name] = result
        acquired = args.acquired_slice_spacing or labels.recorded_acquired_spacing()
        if acquired is not None and float(acquired) > labels.slice_spacing:
            print(f"{path}: dense stack ({labels.slice_spacing:g} mm) made from slices {float(acquired):g} mm apart: its end slices also stand for the outer half slab")
        elif labels.slice_spacing < SPARSE_SLICE_SPACING_MM and not labels.has_placeholder_spacing:  # 1 mm placeholders: warned about below
            result.warnings.append(
                f"{path}: slices {labels.slice_spacing:g} mm apart and no record of the acquired spacing: if this is an upsampled stack, give "
                "--acquired-slice-spacing so that its end slices stand for the half slab beyond them (else the volumes are a little low)"
            )
        for warning in result.warnings:
            _print_warning(warning)
    _clear_earlier_outputs(args.out, VOLUME_OUTPUTS, args.overwrite, list(args.labels))
    out = _output_folder(args.out)
    csv_path = write_function_csv(results, out / "volumes.csv")
    png = plot_volume_curves(results, out / "volume_curves.png")
    for (name, result), (_, labels) in zip(results.items(), inputs):
        s = result.summary
        recorded = source_frames(labels)  # labels of --frames 0,11: say which frames of the cine they are too

        def frame(index: int | None, recorded: list[int] | None = recorded) -> str:
            if index is None:
                return "?"
            return f"{index} (cine frame {recorded[index]})" if recorded is not None else str(index)

        ed, es, rv_ed, rv_es = (frame(f) for f in (result.ed_frame, result.es_frame, result.rv_ed_frame, result.rv_es_frame))
        # Without geometry an "ml" counts placeholder 1 mm pixels, and a mass means nothing: said beside the numbers.
        no_geometry = labels.has_placeholder_spacing or labels.made_from_placeholder_spacing
        ml = "ml*" if no_geometry else "ml"
        mass = "mass unknown (no geometry)" if no_geometry else f"mass {s['lv_mass_ed_g']:.1f} g"
        print(
            f"{name}: ED frame {ed}, ES frame {es}; LV EDV {s['lv_edv_ml']:.1f} {ml}, ESV {s['lv_esv_ml']:.1f} {ml}, "
            f"SV {s['lv_sv_ml']:.1f} {ml}, EF {s['lv_ef_percent']:.1f} %, {mass}; RV (ED frame {rv_ed}, ES frame {rv_es}) "
            f"EDV {s['rv_edv_ml']:.1f} {ml}, ESV {s['rv_esv_ml']:.1f} {ml}, EF {s['rv_ef_percent']:.1f} % (frames of the file, counted from 0, as --ed / --es take them)"
        )
        if no_geometry:
            print("  * not ml: the file has no geometry, and these count its placeholder 1 mm pixels; only the ejection fractions are meaningful")
    print(f"  table  {csv_path}\n  plot   {png}")
    return 0


def _json_object(path: str, option: str) -> dict[str, Any]:
    """A JSON object read from ``path``, or an :class:`InputError` naming the file and the problem."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise InputError(path, f"is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputError(path, f"must hold a JSON object for {option}, not {type(value).__name__}")
    return value


def _cmd_install(args: argparse.Namespace) -> int:
    from calid.models.registry import install_model

    model = install_model(
        args.model, args.name, folder=args.folder, description=args.description or "", default=args.default, half_precision=not args.keep_precision, card=args.card,
        default_steps=args.default_steps, info=_json_object(args.info, "--info") if args.info else None,
    )
    print(f"installed {model.kind} model {model.name!r}{' (default)' if model.default else ''}: {model.path} (sha256 {model.sha256[:12]}…)")
    return 0


def _note_if_dicom(target: Any, stack: Any) -> None:
    """A DICOM output is a new, anonymised study: say so, so that nobody looks for it under the patient;
    and a left-handed stack is stored last slice first (DICOM describes right-handed stacks only)."""
    if Path(target).is_dir():
        print(f"note: {target} is a new DICOM study, patient 'Anonymous', ID 'CaLID' (CaLID does not copy patient data); "
              "import it with the source series' patient details if it belongs in a PACS", file=sys.stderr)
        if not stack.is_right_handed:
            print(f"note: {target} stores the slices in reverse order (DICOM describes right-handed stacks only): "
                  "the same anatomy at the same positions, read back with slice 0 where the input had its last", file=sys.stderr)


def _warn_if_labels(stack: Any) -> str | None:
    """Print (and return) the warning for a label map given where an image is expected."""
    from calid.data.stack import label_map_warning

    warning = label_map_warning(stack)
    if warning:
        _print_warning(warning)
    return warning


def _print_reading_note(stack: Any) -> None:
    """What reading decided that the user should know (series combined, a transform chosen, a guess)."""
    if "geometry_note" in stack.metadata:
        print(f"note: {stack.source}: {stack.metadata['geometry_note']}", file=sys.stderr)


def _cmd_convert(args: argparse.Namespace) -> int:
    from calid.data.io import read_stack, write_stack

    source, target = Path(args.input), Path(args.output)
    _check_output(source, target, args.overwrite)
    stack = read_stack(source, series=args.series, min_slices=1)
    _print_reading_note(stack)
    write_stack(stack, target, dtype=args.dtype, overwrite=args.overwrite)
    _note_if_dicom(target, stack)
    t, z, y, x = stack.shape
    print(f"{source} -> {target}: {t} frame(s) x {z} slices of {x} x {y} pixels, {stack.spacing[0]:.4g} x {stack.spacing[1]:.4g} mm, "
          f"{stack.slice_spacing:.4g} mm between slices; geometry" + (" and frame times" if stack.frame_times_ms is not None else "") + " kept")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from calid.data.io import read_stack

    stack = read_stack(args.input, series=args.series, min_slices=1)
    t, z, y, x = stack.shape
    print(f"file            {args.input}")
    print(f"frames x slices {t} x {z}, in-plane {x} x {y} pixels")
    print(f"spacing (mm)    {stack.spacing[0]:.4g} x {stack.spacing[1]:.4g} in-plane, {stack.slice_spacing:.4g} between slices")
    print(f"origin (LPS mm) {', '.join(f'{v:.3f}' for v in stack.origin)}")
    print(f"slice normal    {', '.join(f'{v:.4f}' for v in stack.slice_normal)} (LPS)")
    if stack.frame_times_ms is not None and t > 1:
        steps = np.diff(stack.frame_times_ms)
        if np.allclose(steps, steps.mean(), rtol=0.01, atol=0.5):
            print(f"frame times     {stack.frame_times_ms[0]:.1f} .. {stack.frame_times_ms[-1]:.1f} ms ({stack.frame_interval_ms:.1f} ms apart)")
        else:  # a selection of frames (ED and ES), or an irregular acquisition: each time says more than a mean
            print(f"frame times     {', '.join(f'{v:.1f}' for v in stack.frame_times_ms)} ms (unevenly spaced)")
    elif stack.frame_times_ms is not None:
        print(f"frame time      {stack.frame_times_ms[0]:.1f} ms")
    from calid.geometry.reslice import source_frames

    frames = source_frames(stack)
    if frames is not None:
        cine, count = stack.metadata.get("source_cine"), stack.metadata.get("source_frame_count")
        parts = [part for part in (cine if isinstance(cine, str) else "", f"{count} frames" if isinstance(count, int) else "") if part]
        of = f" of {', '.join(parts)}" if parts else ""
        print(f"frames of cine  {', '.join(str(f) for f in frames)} (counted from 0){of}")
    labels = _label_values(stack)
    if labels:
        print(f"labels          {labels}")
    else:
        print(f"intensities     {stack.data.min():g} .. {stack.data.max():g} (stored as {stack.metadata.get('source_dtype', '?')})")
    plane = stack.metadata.get("plane")
    if isinstance(plane, dict):
        covered = stack.metadata.get("covered_fraction")
        inside = f", {covered:.0%} of it inside the stack" if isinstance(covered, float) else ""
        print(f"plane           {plane.get('name', '?')}: a reslice by calid lax{inside}")
    how = describe_upsampling(stack.metadata.get("upsampling"))
    if how:
        acquired = stack.recorded_acquired_spacing()
        if isinstance(plane, dict):  # one plane through the stack: its slices are no longer rows here
            how = f"resliced from a stack made by {how}" + ("" if acquired is None else f" from slices {acquired:.4g} mm apart")
        elif acquired is not None and (step := stack.acquired_slice_step()) is not None:
            how += f": 1 slice in {step} is acquired, from slices {acquired:.4g} mm apart"
        print(f"made by calid   {how}")
    if "geometry_note" in stack.metadata:
        print(f"note            {stack.metadata['geometry_note']}")
    if stack.has_placeholder_spacing and not isinstance(plane, dict):  # a reslice is written at 1 mm on purpose
        print("note            all spacings are exactly 1 mm, NIfTI's default: the file has probably lost its geometry (sizes and volumes are in voxels)")
    return 0


def _label_values(stack: CineStack) -> str | None:
    """A label file's values in words: named by calid's record (calid segment), else, for a file of
    values 0-3 only, what calid reads them as; None for an image."""
    recorded = stack.metadata.get("labels")
    if isinstance(recorded, dict) and recorded:
        return ", ".join(f"{k} {v}" for k, v in recorded.items() if str(k).isdecimal())
    values = np.unique(stack.data)  # (ACDC's own label files are float32)
    if values.size < 2 or not set(values.tolist()) <= {0, 1, 2, 3}:
        return None
    # Other data sets number the structures otherwise (Sunnybrook: 1 the LV cavity): only the values are certain.
    return f"{', '.join(str(int(v)) for v in values if v)} (values 0-3 only: probably labels; calid reads 1 RV cavity, 2 LV myocardium, 3 LV cavity, as ACDC)"


def _cmd_phantom(args: argparse.Namespace) -> int:
    from calid.data.io import write_stack
    from calid.data.phantom import PhantomConfig, make_phantom

    out = _output_folder(args.out)
    phantom = make_phantom(args.seed, PhantomConfig(n_frames=args.frames))
    stem = f"phantom{args.seed:04d}"
    written = [
        write_stack(phantom.sparse, out / f"{stem}_sparse.nii.gz"),
        write_stack(phantom.sparse_labels, out / f"{stem}_sparse_labels.nii.gz", dtype="uint8"),
        write_stack(phantom.dense, out / f"{stem}_dense.nii.gz"),
        write_stack(phantom.dense_labels, out / f"{stem}_dense_labels.nii.gz", dtype="uint8"),
    ]
    for path in written:
        print(path)
    return 0


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(option, f"expected comma-separated integers, got {text!r}") from None


def _segmenter_size(config: str) -> str:
    if config in ("tiny", "default", "small"):  # small: the option's default, meant for the vae and ldm stages
        return "tiny" if config == "tiny" else "default"
    raise InputError("--config", f"the segmenter comes in sizes tiny and default, not {config!r}")


def _gaps(text: str) -> tuple[int, ...]:
    gaps = _int_list(text, "--gaps")
    if not gaps or min(gaps) < 1:
        raise InputError("--gaps", f"neighbour distances are whole numbers of slices, at least 1 (e.g. 1,2), got {text!r}")
    return gaps


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from calid.evaluation.harness import EvaluationConfig, evaluate

    config = EvaluationConfig(
        data=tuple(args.data),
        out_dir=args.out,
        model=args.model,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        steps=args.steps,
        baseline_steps=args.baseline_steps,
        frames=args.frames,
        labels=args.labels,
        subjects=tuple(args.subjects.split(",")) if args.subjects else None,
        tasks=_int_list(args.tasks, "--tasks"),
        sweep_steps=_int_list(args.sweep_steps, "--sweep-steps"),
        sweep_slices=args.sweep_slices,
        phantoms=args.phantoms,
        factor=args.factor,
        seg_model=args.seg_model,
        lpips_weights=args.lpips_weights,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        temporal_model=args.temporal_model,
        placeholder_spacing=args.placeholder_spacing,
    )
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    results = evaluate(config, progress)
    out = Path(args.out)
    for name in ["report.md", "results.json"] + results["tables"] + results["figures"]:
        print(out / name)
    return 0


#: Options a resumed run takes from its checkpoint when the command line leaves them out (argparse
#: name: training-configuration field): its recipe and its data split, so that `--resume` alone
#: continues the same run. Where it runs (device, workers, caches, time limit) is the new command's.
RESUMED_OPTIONS = {
    "config": "model", "steps": "steps", "batch_size": "batch_size", "lr": "learning_rate", "weight_decay": "weight_decay",
    "optimizer": "optimizer", "warmup": "warmup_steps", "lr_schedule": "lr_schedule", "transposes": "transposes", "ema": "ema_decay",
    "precision": "precision", "checkpoint_every": "checkpoint_every", "validate_every": "validate_every", "seed": "seed",
    "val_fraction": "val_fraction", "val_subjects": "val_subjects", "gaps": "gaps", "val_steps": "val_steps",
    "placeholder_spacing": "placeholder_spacing", "perceptual_weight": "perceptual_weight", "adversarial_weight": "adversarial_weight",
    "adversarial_start": "adversarial_start", "lpips_weights": "lpips_weights", "vae": "vae_model", "init_from": "init_from",
    "temporal": "temporal", "downsample_time": "downsample_time",
}


def _options_given(argv: Sequence[str], command: str) -> set[str]:
    """The options of ``command`` written on the command line, as opposed to left at their defaults."""
    probe = build_parser()
    subcommand = next(a for a in probe._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in subcommand._actions:  # argparse has no public way to tell an option given from its default
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(list(argv))))


def _take_the_runs_own_options(args: argparse.Namespace, saved: dict[str, Any]) -> list[str]:
    """With --resume: every option in RESUMED_OPTIONS not given takes the checkpoint's value. Returns what was taken."""
    given: set[str] | None = getattr(args, "options_given", None)
    if given is None:  # a Namespace not parsed by main(): which options it gives is unknown, so all stand
        return []
    if "val_fraction" in given:
        given = given | {"val_subjects"}  # a fraction asked for replaces the run's list of subjects
    taken = []
    for name, field in RESUMED_OPTIONS.items():
        if name in given or field not in saved or not hasattr(args, name):
            continue
        value = saved[field]
        if name in ("val_subjects", "gaps") and isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if name in ("lpips_weights", "vae", "init_from") and (not value or not Path(value).is_file()):
            continue  # a file of another machine: the new command names its own
        if value != getattr(args, name):
            option = f"--{name.replace('_', '-')}"
            taken.append((option if value else f"--no-{option[2:]}") if isinstance(value, bool) else f"{option} {value}")
        setattr(args, name, value)
    return taken


def _cmd_train_seg(args: argparse.Namespace) -> int:
    from calid.segmentation.training import SegTrainConfig, SegmentationTrainer

    checkpoint = Path(args.out) / "checkpoints" / "last.safetensors"
    if args.resume and checkpoint.is_file():
        from calid.training.state import read_training_extra

        saved = read_training_extra(checkpoint)
        stage = (saved.get("train_config") or {}).get("stage")
        if "model_config" in saved:  # a VAE or denoiser run's checkpoint
            raise InputError(checkpoint, f"is the checkpoint of a {stage or 'vae or ldm'} run, not of a seg run: use another --out folder")
        if stage == "seg":  # older segmentation checkpoints record no options: the command's stand
            _say_taken(_take_the_runs_own_options(args, saved["train_config"]))
    args.steps = 4000 if args.steps is None else args.steps
    args.batch_size = 16 if args.batch_size is None else args.batch_size
    args.lr = 1e-3 if args.lr is None else args.lr

    config = SegTrainConfig(
        data=tuple(args.data),
        out_dir=args.out,
        model=_segmenter_size(args.config),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=1e-4 if args.weight_decay is None else args.weight_decay,
        validate_every=args.validate_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        val_fraction=args.val_fraction,
        val_subjects=_subject_names(args.val_subjects),
        device=args.device,
    )
    trainer = SegmentationTrainer(config, resume=args.resume, overwrite=args.overwrite)
    print(
        f"training the segmenter ({trainer.model_config.name}) on {trainer.device}: {len(trainer.slices)} training slices from "
        f"{_count(len(trainer.subjects['train']), 'subject')}, {_count(len(trainer.val_volumes), 'validation volume')} from "
        f"{_count(len(trainer.subjects['validation']), 'subject')}; "
        f"step {trainer.step} -> {config.steps}",
        flush=True,
    )
    print(f"held out for validation: {_subject_list(trainer.subjects['validation'])}", flush=True)
    if trainer.step >= config.steps:
        print(f"the run is already at step {trainer.step} (--steps {config.steps}): nothing to train; give a larger --steps to continue")
        return 0
    metrics = trainer.fit()
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    if trainer.stop_requested and trainer.step < config.steps:  # (a signal after the last step: the run is done)
        print(f"stopped at step {trainer.step} of {config.steps}; continue with the same command and --resume")
        return _stopped_status(trainer.stop_signal)
    print(f"done at step {trainer.step}: {summary or 'no validation subjects'}; model: {Path(config.out_dir) / 'best.safetensors'}")
    return 0


def _stopped_status(stop_signal: int | None) -> int:
    """The exit status of a run stopped by a signal (checkpoint kept): 128 + the signal's number, as a
    shell reports a process the signal ended, so that a script (`set -e`) or a scheduler does not take the
    stop for a finished run and go on to the next stage. (A process of a torchrun group stopped by
    another's signal reports SIGTERM.)"""
    return 128 + int(stop_signal if stop_signal is not None else signal.SIGTERM)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _subject_names(text: str | None) -> tuple[str, ...] | None:
    """``--val-subjects a, b,c``: the names, without the spaces around them."""
    names = tuple(name.strip() for name in (text or "").split(",") if name.strip())
    return names or None


def _subject_list(subjects: Sequence[str]) -> str:
    """``3 subjects (a, b, c)``; a long list shortened."""
    if not subjects:
        return "no subject"
    shown = ", ".join(subjects[:15]) + (f", … ({len(subjects) - 15} more)" if len(subjects) > 15 else "")
    return f"{len(subjects)} subject{'' if len(subjects) == 1 else 's'} ({shown})"


def _say_taken(taken: list[str]) -> None:
    if taken and int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming with the run's own {', '.join(taken)}", flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from calid.training.trainer import TrainConfig, Trainer

    if args.resume and args.overwrite:
        raise InputError("--overwrite", "starts a new run in --out, and --resume continues the run there: give one of them")

    if args.stage == "seg":
        if args.time_limit is not None:
            raise InputError("--time-limit", "applies to the vae and ldm stages; the segmenter trains in minutes (use --steps)")
        return _cmd_train_seg(args)
    if args.config == "default":
        raise InputError("--config", f"'default' names the segmenter's size; the {args.stage} stage takes tiny, small, paper or NAME-2d+t")
    autoencoder_file = args.vae or args.init_from
    if args.stage == "ldm" and "config" in (getattr(args, "options_given", None) or set()) and autoencoder_file:
        from calid.models.checkpoint import read_raw_header
        from calid.models.registry import resolve_model

        size = str((read_raw_header(resolve_model(autoencoder_file)).get("config") or {}).get("name", ""))
        if size and size != args.config:
            raise InputError(
                "--config",
                f"{args.config}: the ldm stage takes its size from the autoencoder it trains on ({autoencoder_file} is {size}); "
                f"leave out --config, or first train a {args.config} VAE (calid train vae --config {args.config})",
            )
    checkpoint = Path(args.out) / "checkpoints" / "last.safetensors"
    if args.resume and checkpoint.is_file():
        # Resuming continues with the run's own options, not the defaults (a default batch size, warm-up
        # or validation split would silently change the run): only what the command gives changes.
        from calid.training.trainer import checkpoint_extra_for_stage

        _say_taken(_take_the_runs_own_options(args, checkpoint_extra_for_stage(checkpoint, args.stage).get("train_config") or {}))
    args.steps = 20000 if args.steps is None else args.steps
    args.batch_size = 32 if args.batch_size is None else args.batch_size
    args.lr = 1e-4 if args.lr is None else args.lr
    args.weight_decay = 0.0 if args.weight_decay is None else args.weight_decay

    config = TrainConfig(
        stage=args.stage,
        data=tuple(args.data),
        out_dir=args.out,
        model=args.config,
        vae_model=args.vae,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        lr_schedule=args.lr_schedule,
        transposes=args.transposes,
        ema_decay=args.ema,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        time_limit_minutes=args.time_limit,
        seed=args.seed,
        num_workers=args.workers,
        val_fraction=args.val_fraction,
        val_subjects=_subject_names(args.val_subjects),
        gaps=_gaps(args.gaps),
        val_steps=args.val_steps,
        placeholder_spacing=args.placeholder_spacing,
        cache_dir=args.cache_dir,
        latent_cache_mb=args.latent_cache_mb,
        device=args.device,
        lpips_weights=args.lpips_weights,
        perceptual_weight=args.perceptual_weight,
        adversarial_weight=args.adversarial_weight,
        adversarial_start=args.adversarial_start,
        concat_neighbour_latents=True if args.concat_neighbour_latents else None,
        condition_dropout=args.condition_dropout,
        prediction=args.prediction,
        residual_to_neighbours=True if args.residual_to_neighbours else None,
        registered_neighbours=True if args.registered_neighbours else None,
        temporal=args.temporal,
        init_from=args.init_from,
        downsample_time=args.downsample_time,
    )
    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite)
    if trainer.is_main:
        print(
            f"training {config.stage} ({trainer.model_config.name}) on {trainer.device}, {trainer.world} process(es): "
            f"{len(trainer.train_set)} training / {len(trainer.val_set)} validation triplets, "
            f"step {trainer.step} -> {config.steps}",
            flush=True,
        )
        print(f"held out for validation: {_subject_list(trainer.data_description['validation_subjects'])}", flush=True)
        for note in trainer.resume_notes:
            print(f"note: {note}", flush=True)
        if trainer.latents_loaded:
            print(f"latent cache: {trainer.latents_loaded} training latents encoded by earlier runs", flush=True)
        placeholder = trainer.data_description.get("placeholder_spacing")
        if placeholder:
            print(
                f"note: {len(placeholder['subjects'])} subject(s) have no geometry in their files (1 x 1 x 1 mm); "
                f"their pixels are taken as {placeholder['assumed_mm']} mm (--placeholder-spacing)",
                flush=True,
            )
    try:
        if trainer.step >= config.steps:
            if trainer.is_main:
                print(f"the run is already at step {trainer.step} (--steps {config.steps}): nothing to train; give a larger --steps to continue")
            return 0
        metrics = trainer.fit()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # torchrun: leave no process group behind (NCCL warns otherwise)
            dist.destroy_process_group()
    if trainer.is_main:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if trainer.stop_requested and trainer.step < config.steps:  # (a signal after the last step: the run is done)
            why = f" (time limit of {config.time_limit_minutes:g} min)" if trainer.time_limit_reached else ""
            print(f"stopped at step {trainer.step} of {config.steps}{why}; continue with the same command and --resume. model so far: {Path(config.out_dir) / 'model.safetensors'}")
        else:
            print(f"done at step {trainer.step}: {summary or 'no validation subjects'}; model: {Path(config.out_dir) / 'model.safetensors'}")
    if trainer.stop_requested and not trainer.time_limit_reached and trainer.step < config.steps:
        return _stopped_status(trainer.stop_signal)  # a time limit is the run's own plan: status 0
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from calid.data.datasets import write_packed_volumes
    from calid.models.config import named_config
    from calid.training.trainer import gather_volumes

    if args.model:
        from calid.models.checkpoint import read_header
        from calid.models.registry import resolve_model

        model = read_header(resolve_model(args.model))["config"]
        what = f"model {args.model}"
    else:
        model = named_config(args.config)
        what = f"configuration {args.config}"
    preprocess = model.preprocess
    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise InputError(out, "a packed data file must end in .npz")
    if out.exists() and not args.overwrite:
        raise InputError(out, "exists; use --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="calid-pack-") as scratch:
        cache = Path(args.cache_dir) if args.cache_dir else Path(scratch)
        volumes = gather_volumes(tuple(args.data), model, cache, args.placeholder_spacing)
        write_packed_volumes(out, volumes, preprocess)  # inside: cached volumes are memory-mapped from the scratch folder
    frames = sum(v.data.shape[0] for v in volumes)
    slices = sum(v.data.shape[0] * v.data.shape[1] for v in volumes)
    assumed = sorted({v.assumed_spacing_mm for v in volumes if v.assumed_spacing_mm is not None})
    print(
        f"packed {len(volumes)} volume(s) ({frames} frames, {slices} slices) for the {what} "
        f"({preprocess.target_spacing_mm} mm pixels, {preprocess.crop_size} crops) into {out} ({out.stat().st_size / 2**20:.1f} MiB)"
    )
    if assumed:
        count = sum(v.assumed_spacing_mm is not None for v in volumes)
        print(f"note: {count} volume(s) had no geometry in their files; their pixels were taken as {', '.join(f'{a:.3g}' for a in assumed)} mm")
    same_model = f"--init-from {args.model}" if args.model else f"--config {args.config}"
    print(f"train on it with: calid train vae --data {out} --out RUN {same_model} ...")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calid", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"calid {calid.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="upsample the built-in phantom with the installed model and write volumes and figures (no data needed)")
    demo.add_argument("--out", default="calid-demo", help="output folder (default: ./calid-demo)")
    demo.add_argument("--factor", type=int, default=8, help="upsampling factor 2, 4, 8, 16 or 32 (default 8)")
    demo.add_argument(
        "--mode", choices=UPSAMPLE_MODES,
        help="method (default: calid with a trained model installed or given, else registration)",
    )
    demo.add_argument("--steps", type=_positive_int, help="DDIM steps (default: the model's, see calid info)")
    demo.add_argument("--model", help="model file or name for the CaLID modes (default: the installed model; untrained:tiny for random weights)")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    _add_threads_option(demo)
    demo.add_argument("--frames", type=lambda text: text, default=None, help="frames to upsample, e.g. 0,5-9 or all (default: end-diastole and end-systole)")
    demo.add_argument("--phantom-frames", type=int, default=20, help="frames of the phantom cine (default 20)")
    demo.add_argument("--seed", type=_seed, default=0, help="phantom and sampling seed (default 0)")
    demo.add_argument("--tta", action="store_true", help="calid / calid+: average each new slice over the 8 rotations and mirrors of the slice plane (about 8 times slower)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_cmd_demo)

    upsample = commands.add_parser("upsample", help="upsample a short-axis stack or cine through-plane")
    upsample.add_argument("input", help="NIfTI / NRRD file or DICOM folder")
    upsample.add_argument("output", help="output file (.nii.gz, .nrrd, .seq.nrrd) or new DICOM folder")
    upsample.add_argument("--factor", type=int, default=4, help="2, 4, 8, 16 or 32 (default 4)")
    upsample.add_argument(
        "--mode", default="calid", choices=UPSAMPLE_MODES,
        help="calid (fast), calid+ (inverted neighbours, better), registration (no model: the neighbours registered and morphed), "
        "or a baseline (default calid)",
    )
    upsample.add_argument("--steps", type=_positive_int, help="DDIM steps per new slice (default: the model's validated count, see calid info)")
    upsample.add_argument("--model", help="model file or installed name (default: the installed default model; see calid info)")
    upsample.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda:N")
    _add_threads_option(upsample)
    upsample.add_argument("--frames", help="frames to upsample, e.g. 0,5-9; -1 is the last; a list starting with a minus sign needs the = form: --frames=-2,-1 (default: all)")
    upsample.add_argument("--seed", type=_seed, default=0, help="seed of the starting noise (default 0)")
    upsample.add_argument(
        "--tta", action="store_true",
        help="test-time augmentation (calid, calid+): average each new slice over the 8 rotations and reflections of the slice plane; "
        "about 8x the denoiser's work, smoother, and closer to the truth on average with few steps",
    )
    upsample.add_argument("--batch-size", default="auto", type=_batch_size, help="slices per network call (default: from free memory)")
    upsample.add_argument(
        "--centre-on-heart", action="store_true",
        help="centre the model's crop on the heart found by the segmentation model (for full field-of-view scans; the model was trained on heart-centred windows)",
    )
    upsample.add_argument("--centre-ras", help="R,A,S point (mm) to centre the model's crop on, e.g. the LV centre (default: image centre)")
    upsample.add_argument(
        "--placeholder-spacing", default="model",
        help="a file saved without geometry (all spacings exactly 1 mm): the pixel size the network is shown: model (what its training assumed; default), keep (1 mm) or mm; the output keeps the stored geometry",
    )
    upsample.add_argument("--series", help="DICOM: the series to read when the folder holds several: a number, UID or part of its description, or several (7,8,9) holding one slice each")
    upsample.add_argument("--temporal", action="store_true", help="require a 2D+T model (temporally coherent cine; a 2D+T model is used this way anyway)")
    upsample.add_argument("--overwrite", action="store_true", help="replace an existing output")
    upsample.add_argument("--quiet", action="store_true", help="no progress bar")
    upsample.add_argument("--progress", choices=["bar", "json"], default="bar", help="json: one JSON line per update on stdout, for programs")
    upsample.add_argument(
        "--stop-file", metavar="PATH",
        help="for programs running calid in the background: stop (exit status 130, nothing written) as soon as this file exists or its folder is removed",
    )
    upsample.set_defaults(handler=_cmd_upsample)

    info = commands.add_parser("info", help="print a model's card (configuration, training data, metrics), or list the installed models")
    info.add_argument("model", nargs="?", help="model file or installed name (default: list installed models)")
    info.set_defaults(handler=_cmd_info)

    segment_cmd = commands.add_parser("segment", help="label LV cavity, LV myocardium and RV cavity in every slice and frame")
    segment_cmd.add_argument("input", help="image file or DICOM folder (sparse or dense)")
    segment_cmd.add_argument("output", help="label file (uint8: 1 RV cavity, 2 LV myocardium, 3 LV cavity)")
    segment_cmd.add_argument("--model", help="segmentation model file or name (default: the installed one)")
    segment_cmd.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N (default auto)")
    _add_threads_option(segment_cmd)
    segment_cmd.add_argument("--frames", help="frames to segment, e.g. 0,5-9 (default: all)")
    segment_cmd.add_argument("--series", help="DICOM: the series to read when the folder holds several: a number, UID or part of its description, or several (7,8,9) holding one slice each")
    segment_cmd.add_argument("--overwrite", action="store_true", help="replace an existing output file (refused by default: it may hold labels corrected by hand)")
    segment_cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    segment_cmd.add_argument("--progress", choices=["bar", "json"], default="bar", help="json: one JSON line per update on stdout, for programs")
    segment_cmd.add_argument(
        "--stop-file", metavar="PATH",
        help="for programs running calid in the background: stop (exit status 130, nothing written) as soon as this file exists or its folder is removed",
    )
    segment_cmd.set_defaults(handler=_cmd_segment)

    lax = commands.add_parser("lax", help="long-axis (2-, 3-, 4-chamber) reslices as PNG and NIfTI, from labels or user points")
    lax.add_argument("input", help="the stack to reslice (sparse or dense)")
    lax.add_argument("--out", required=True, help="output folder")
    lax.add_argument("--labels", help="label file on the input's grid (default: segment the input)")
    lax.add_argument("--seg-model", help="segmentation model when --labels is not given")
    lax.add_argument("--compare", nargs="+", help="other stacks (e.g. linear and CaLID outputs) shown beside the input on each plane")
    lax.add_argument("--frame", type=int, default=0, help="frame shown and used to place the planes: its position in the file, 0 the first, -1 the last (default 0)")
    lax.add_argument("--spacing", type=float, default=1.0, help="reslice pixel size in mm (default 1)")
    lax.add_argument("--three-chamber-ras", help="R,A,S of a point of the 3-chamber plane, e.g. the aortic valve")
    lax.add_argument("--points-ras", metavar="R,A,S;R,A,S;R,A,S", help="one plane through three points instead of the automatic planes: centre, a point towards the apex (the axis runs up the image, as in the automatic planes), a third point (on the right)")
    lax.add_argument("--plane-ras", metavar="C;N;U", help="one plane from its centre, normal and in-plane axis, each R,A,S (directions in RAS too)")
    lax.add_argument("--acquired-lax", help="an acquired long-axis cine: report PSNR / SSIM / NCC of each stack on its plane")
    lax.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N (default auto)")
    _add_threads_option(lax)
    lax.add_argument("--overwrite", action="store_true", help="replace an earlier run's views in --out")
    lax.set_defaults(handler=_cmd_lax)

    surfaces = commands.add_parser("surfaces", help="smooth closed surfaces of every structure and frame (VTP / STL / OBJ, LPS mm)")
    surfaces.add_argument("labels", help="label file")
    surfaces.add_argument("--out", required=True, help="output folder: one surface file per structure and frame")
    surfaces.add_argument("--format", default="vtp", choices=["vtp", "stl", "obj"], help="surface file format (default vtp; stl and obj for 3D printing and other programs)")
    surfaces.add_argument("--frames", help="e.g. 0,11 (default: all)")
    surfaces.add_argument("--render", action="store_true", help="also write an offscreen render (PNG) per frame")
    surfaces.add_argument("--overwrite", action="store_true", help="replace an earlier run's surfaces in --out")
    surfaces.set_defaults(handler=_cmd_surfaces)

    volumes = commands.add_parser("volumes", help="LV / RV volumes, EDV, ESV, SV, EF and LV mass from label files (CSV + plot)")
    volumes.add_argument("labels", nargs="+", help="label files, e.g. the sparse stack's and the dense reconstruction's")
    volumes.add_argument("--out", required=True)
    volumes.add_argument("--overwrite", action="store_true", help="replace an earlier run's table and plot in --out")
    volumes.add_argument("--ed", type=int, help="end-diastolic frame for both ventricles, by its position in the file (0 the first; default: each ventricle's largest volume)")
    volumes.add_argument("--es", type=int, help="end-systolic frame for both ventricles, by its position in the file (default: each ventricle's smallest volume)")
    volumes.add_argument(
        "--frames-of-one-cine", action="store_true",
        help="the label files are single frames of one heart (e.g. ACDC's ED and ES files): measured together, giving EDV, ESV and EF",
    )
    volumes.add_argument(
        "--acquired-slice-spacing", type=float, metavar="MM",
        help="for dense label files without CaLID's record (drawn or converted by other tools): the spacing of the acquired slices, "
        "so that the end slices stand for the half slab beyond them as in Simpson's method",
    )
    volumes.set_defaults(handler=_cmd_volumes)

    install = commands.add_parser("install", help="install a trained model file under a name (calid upsample --model NAME; --default to use it by default)")
    install.add_argument("model", help="model file (calid train writes model.safetensors / best.safetensors)")
    install.add_argument("--name", required=True, help="name to use it by, e.g. calid-mydata-small")
    install.add_argument("--folder", help="model folder (default: $XDG_DATA_HOME/calid/models, i.e. ~/.local/share/calid/models; or a folder in $CALID_MODEL_DIR)")
    install.add_argument("--description", help="one line shown by calid info")
    install.add_argument("--card", help="a Markdown model card to install beside it")
    install.add_argument("--default", action="store_true", help="use this model when none is named")
    install.add_argument("--default-steps", type=int, help="DDIM steps to use when none are given (choose from calid evaluate's Task 2; default: keep the file's)")
    install.add_argument("--info", help="a JSON file of fields to add to the model's description (hardware, training time, data licence, reproduce command)")
    install.add_argument("--keep-precision", action="store_true", help="keep float32 weights (default: store float16, half the size)")
    install.set_defaults(handler=_cmd_install)

    convert = commands.add_parser("convert", help="convert between NIfTI, NRRD / .seq.nrrd and DICOM, keeping the geometry")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--series", help="DICOM: the series to read when the folder holds several: a number, UID or part of its description, or several (7,8,9) holding one slice each")
    convert.add_argument("--dtype", help="voxel type to write (default: the input's)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    convert.set_defaults(handler=_cmd_convert)

    inspect = commands.add_parser("inspect", help="print the size, geometry and timing of an image")
    inspect.add_argument("input")
    inspect.add_argument("--series", help="DICOM: the series to read when the folder holds several: a number, UID or part of its description, or several (7,8,9) holding one slice each")
    inspect.set_defaults(handler=_cmd_inspect)

    train = commands.add_parser("train", help="train the VAE (stage 1), the interpolation denoiser (stage 2) or the segmenter; torchrun for several GPUs")
    train.add_argument("stage", choices=["vae", "ldm", "seg"], help="vae, ldm (the CaLID denoiser) or seg (LV / myocardium / RV segmentation)")
    train.add_argument("--data", nargs="+", required=True, help="image files, folders (one subfolder or file name per subject) or phantom:N")
    train.add_argument("--out", required=True, help="run folder: checkpoints, logs, model.safetensors")
    train.add_argument(
        "--config",
        default="small",
        choices=["tiny", "small", "paper", "tiny-2d+t", "small-2d+t", "paper-2d+t", "default"],
        help="network sizes (vae: tiny/small/paper, default small, or NAME-2d+t for the 2D+T model on clips; ldm: the VAE's own; seg: tiny/default)",
    )
    train.add_argument("--vae", help="ldm stage: the trained VAE file (with --init-from and no --vae: that model's own VAE)")
    train.add_argument("--steps", type=_positive_int, help="optimisation steps (default: 20000; seg 4000; with --resume: the run's own)")
    train.add_argument("--batch-size", type=_positive_int, help="per process (default: 32; seg 16; with --resume: the run's own)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4; seg 1e-3; with --resume: the run's own)")
    train.add_argument("--optimizer", default="adamw", choices=["adam", "adamw"])
    train.add_argument("--weight-decay", type=float, help="default 0; seg 1e-4; with --resume: the run's own")
    train.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    train.add_argument(
        "--transposes", action=argparse.BooleanOptionalAction, default=False,
        help="augmentation: also swap the in-plane axes (with the flips, all 8 rotations / reflections of a slice)",
    )
    train.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="after the warm-up: constant, or cosine decay to 0 at --steps")
    train.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights used for validation and export")
    train.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="CUDA autocast (CPU: always fp32)")
    train.add_argument("--checkpoint-every", type=_positive_int, default=1000, help="steps between checkpoints (a stop or time limit also writes one)")
    train.add_argument(
        "--time-limit", type=float, metavar="MINUTES",
        help="stop after this many minutes (counted from the start, data preparation included), with a checkpoint and the exported model, "
        "for queues with a wall-time limit; leave time for the final export; continue with --resume",
    )
    train.add_argument("--validate-every", type=_positive_int, default=500, help="steps between validations (which pick best.safetensors)")
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument("--workers", type=int, default=0, help="data loader processes")
    train.add_argument("--val-fraction", type=float, default=0.15)
    train.add_argument(
        "--val-steps", type=int, default=8,
        help="ldm: DDIM steps of the validation interpolation, which picks best.safetensors; exported models use it as their default step count",
    )
    train.add_argument(
        "--placeholder-spacing", default="median",
        help="pixel size assumed for images saved without geometry (all spacings exactly 1 mm): median (of the other images, default), keep, or mm; "
        "packed .npz data keep what calid pack assumed (another size given here is refused)",
    )
    train.add_argument("--val-subjects", help="comma-separated validation subjects (instead of a random fraction)")
    train.add_argument("--gaps", default="1", help="neighbour distances in slices, e.g. 1,2")
    train.add_argument("--cache-dir", help="preprocessed-data cache, shareable between runs on the same data (default: OUT/cache)")
    train.add_argument("--latent-cache-mb", type=int, default=2048, help="ldm: memory for the training slices' latents, each encoded once and also kept on disk in the cache folder for later runs (0: encode every step)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_threads_option(train)
    train.add_argument("--init-from", metavar="MODEL", help="fine-tune: start from this model file's weights (vae: a VAE or CaLID file; ldm: a CaLID file, e.g. an installed model's file, whose denoiser architecture the run keeps; not used with --resume)")
    train.add_argument("--lpips-weights", help="AlexNet weights for the perceptual loss (else $CALID_LPIPS_WEIGHTS or a download)")
    train.add_argument("--perceptual-weight", type=float, default=0.002)
    train.add_argument("--adversarial-weight", type=float, default=0.005)
    train.add_argument("--adversarial-start", type=int, default=2000, help="step at which the PatchGAN loss starts")
    train.add_argument("--concat-neighbour-latents", action="store_true", help="ldm: also feed the neighbours' latents to the U-Net")
    train.add_argument("--condition-dropout", type=float, help="ldm: probability of training without the condition")
    train.add_argument("--prediction", choices=["epsilon", "v_prediction", "sample"], help="ldm: network target (default epsilon)")
    train.add_argument("--residual-to-neighbours", action="store_true", help="ldm with --prediction sample --concat-neighbour-latents: predict the correction to latent-linear interpolation")
    train.add_argument(
        "--registered-neighbours", action="store_true",
        help="ldm, 2D: registration-guided CaLID: the network sees the neighbours moved to the middle by the model-free registration (registered once per training pair and cached)",
    )
    train.add_argument("--downsample-time", action="store_true", help="vae of a NAME-2d+t model: the paper's 3D autoencoder, time downsampled like space")
    train.add_argument("--temporal", action="store_true", help="ldm on a 2D VAE: train a 2D+T denoiser (clips) over the 2D autoencoder applied frame by frame")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.safetensors, with the run's own options except those given")
    train.add_argument("--overwrite", action="store_true", help="start a new run in an --out folder that holds another run, replacing its checkpoint, models and logs (without it: refused)")
    train.set_defaults(handler=_cmd_train)

    from calid.evaluation.methods import ALL_METHODS, METHODS, STEP_SWEEP  # light: no PyTorch for --help

    pack = commands.add_parser(
        "pack", help="preprocess training images once into one compressed .npz (to carry a data set to a GPU machine; calid train --data FILE.npz)"
    )
    pack.add_argument("--data", nargs="+", required=True, help="image files or folders (one subfolder or file name per subject)")
    pack.add_argument("--out", required=True, help="output .npz file")
    pack.add_argument("--config", default="small", choices=["tiny", "small", "paper", "tiny-2d+t", "small-2d+t", "paper-2d+t"], help="preprocessing of this configuration (default small)")
    pack.add_argument("--model", help="instead of --config: the preprocessing of this model file or installed name (for fine-tuning it)")
    pack.add_argument(
        "--placeholder-spacing", default="median",
        help="pixel size assumed for images saved without geometry (all spacings exactly 1 mm): median (of the other images, default), keep, or mm",
    )
    pack.add_argument("--cache-dir", help="preprocessed-data cache to read and fill (default: a temporary folder)")
    pack.add_argument("--overwrite", action="store_true", help="replace an existing output")
    pack.set_defaults(handler=_cmd_pack)

    evaluate_cmd = commands.add_parser(
        "evaluate", help="score CaLID against baselines: middle-slice interpolation, DDIM steps, segmentation, phantoms (report.md, results.json, CSV, PNG)"
    )
    evaluate_cmd.add_argument("--data", nargs="+", default=["phantom:2"], help="cine files, folders or phantom:N (default phantom:2)")
    evaluate_cmd.add_argument("--out", required=True, help="report folder")
    evaluate_cmd.add_argument("--model", help="CaLID model file or installed name (default: the installed default)")
    evaluate_cmd.add_argument(
        "--methods", default=",".join(METHODS),
        help=f"comma-separated, from {', '.join(ALL_METHODS)} (default: all but the -tta ones, calid and calid+ with test-time augmentation)",
    )
    evaluate_cmd.add_argument("--steps", type=_positive_int, help="DDIM steps of calid and calid+ in tasks 1, 3, 4 (default: the model's)")
    evaluate_cmd.add_argument("--baseline-steps", type=int, default=50, help="DDIM steps of the inversion-slerp baseline (inversion and decoding)")
    evaluate_cmd.add_argument("--frames", default="labelled", help="labelled (frames with labels), all, or a selection like 0,5-9")
    evaluate_cmd.add_argument("--labels", help="folder of SUBJECT_frameNN_gt label files (ACDC layout; default: beside each image)")
    evaluate_cmd.add_argument("--subjects", help="only these subjects, e.g. patient061..patient070 or patient061,patient065; "
                              "held-out: those the model's training held out for validation (recorded in the model file)")
    evaluate_cmd.add_argument("--tasks", default="1,2,3,4", help="1 interpolation, 2 DDIM steps, 3 segmentation, 4 phantoms")
    evaluate_cmd.add_argument("--sweep-steps", default=",".join(map(str, STEP_SWEEP)), help="task 2 step counts")
    evaluate_cmd.add_argument("--sweep-slices", type=int, default=16, help="task 2 slices")
    evaluate_cmd.add_argument("--phantoms", type=int, default=2, help="task 4 phantom subjects")
    evaluate_cmd.add_argument("--factor", type=int, default=8, choices=[2, 4, 8], help="task 4 upsampling factor")
    evaluate_cmd.add_argument("--seg-model", help="segmentation model (default: the installed default)")
    evaluate_cmd.add_argument("--lpips-weights", help="AlexNet weights for LPIPS and the Fréchet distance (else $CALID_LPIPS_WEIGHTS)")
    evaluate_cmd.add_argument(
        "--placeholder-spacing", default="model",
        help="pixel size for files saved without geometry (all spacings exactly 1 mm): model (what the model's training assumed; default), keep, or mm",
    )
    evaluate_cmd.add_argument("--temporal-model", help="a 2D+T model: also compare it with --model (frame by frame) on whole cines (temporal coherence, x-t cuts)")
    evaluate_cmd.add_argument("--seed", type=_seed, default=0)
    evaluate_cmd.add_argument("--batch-size", type=_positive_int, default=16)
    evaluate_cmd.add_argument("--device", default="auto")
    _add_threads_option(evaluate_cmd)
    evaluate_cmd.add_argument("--quiet", action="store_true", help="no progress messages")
    evaluate_cmd.set_defaults(handler=_cmd_evaluate)

    phantom = commands.add_parser("phantom", help="write a synthetic cine phantom (sparse, dense truth, labels)")
    phantom.add_argument("out", help="output folder")
    phantom.add_argument("--seed", type=_seed, default=0, help="which synthetic heart (shape, motion, noise); default 0")
    phantom.add_argument("--frames", type=_positive_int, default=20, help="frames over the cardiac cycle (default 20)")
    phantom.set_defaults(handler=_cmd_phantom)
    # Options are taken only as written: an abbreviation would make a slip such as `--mode` for `--model`
    # (in a command that has no --mode) a different option, with a misleading error or a silent wrong run.
    parser.allow_abbrev = False
    for subcommand in commands.choices.values():
        subcommand.allow_abbrev = False
    return parser


#: Options whose values are coordinates: a negative first number would look like an option to argparse.
COORDINATE_OPTIONS = ("--centre-ras", "--three-chamber-ras", "--points-ras", "--plane-ras")


def _join_coordinate_values(argv: Sequence[str]) -> list[str]:
    """``--centre-ras -12,3,4`` -> ``--centre-ras=-12,3,4`` so that argparse accepts negative coordinates."""
    out: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in COORDINATE_OPTIONS and index + 1 < len(tokens):
            out.append(f"{token}={tokens[index + 1]}")
            index += 2
            continue
        out.append(token)
        index += 1
    return out


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads for the networks (default: PyTorch's, one per core); on a machine shared with other jobs, fewer threads "
        "than cores avoid threads waiting on each other, which can make CPU work many times slower",
    )


def _use_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise InputError("--threads", f"must be 1 or more, got {threads}")
    import torch

    torch.set_num_threads(threads)


_command = "calid"  # the running subcommand, which every warning line names


def _print_warning(text: str) -> None:
    """One warning line in the one form every subcommand uses (the Slicer module reads these lines back)."""
    print(f"{_command}: warning: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = _join_coordinate_values(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    if args.command == "train":
        args.options_given = _options_given(words, args.command)
    import warnings

    global _command
    _command = f"calid {args.command}"

    def one_line_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        _print_warning(str(message))  # the message names the file; no source lines

    warnings.showwarning = one_line_warning
    try:
        _use_threads(getattr(args, "threads", None))
        return int(args.handler(args))
    except BrokenPipeError:  # the reader stopped early (calid info | head): no traceback, and the status of a process the pipe ended
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Cancelled:
        print(f"calid {args.command}: cancelled; no output was written", file=sys.stderr)
        return 130
    except CalidError as error:
        print(f"calid {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # a file system problem (a full disk, permissions, a file where a folder is expected)
        print(f"calid {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"calid {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
