"""Headless CaLID batch run in 3D Slicer.

    Slicer --no-main-window --python-script Resources/CaLIDBatch.py -- cine.nii.gz out/ --factor 4 --mode calid+

Reads a short-axis stack or cine (NIfTI, NRRD, .seq.nrrd or a DICOM folder),
loads it into the MRML scene, runs the CaLID module's blocking Logic call
(upsampling, segmentation, long-axis planes, volumes) and writes into the
output folder: the dense stack, its labels, the volumes table and the planes,
each named after the input, the mode and the factor. Exits with status 0; 2
with a message on bad input or an output that exists (without --overwrite);
3 when the dense stack was written but the segmentation (labels, volumes,
planes) failed; 1 with a traceback on any other failure (Slicer never keeps
running after the script). ``--install`` first installs what the CaLID
module needs (PyTorch, calid), as the panel does on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The module's library: in a checkout (Resources/ beside CaLIDSlicer/), or one level up where the
# extension installs this file (CaLIDScripts/ beside the module's own files).
for candidate in (HERE.parent / "CaLIDSlicer", HERE / "CaLIDSlicer", HERE.parent):
    if (candidate / "CaLIDSlicerLib").is_dir() and str(candidate) not in sys.path:
        sys.path.insert(0, str(candidate))


def main(argv: list[str], scene: Any) -> int:
    if "--install" in argv:
        from CaLIDSlicerLib import dependencies

        dependencies.install(confirm=False)
        argv = [a for a in argv if a != "--install"]
    try:
        import calid  # noqa: F401
    except ImportError:
        print("CaLIDBatch: error: the calid package is not installed in this Slicer: open the CaLID module once "
              "(it offers to install it), or run this script with --install", file=sys.stderr)
        return 2
    from CaLIDSlicerLib.dependencies import register_bundled_models

    register_bundled_models()  # the shipped models, also when Slicer did not load the module
    from calid.atomic import atomic_path
    from calid.data.io import image_stem, read_stack, write_stack
    from calid.data.stack import fixed_placeholder_mm
    from calid.errors import CalidError, OutputError
    from calid.evaluation.methods import UPSAMPLE_MODES
    from calid.geometry.planes import PLANES_COORDINATES
    from calid.geometry.volumes import write_function_csv
    from CaLIDSlicerLib import mrml
    from CaLIDSlicerLib.logic import UpsamplingOptions, upsample_node

    parser = argparse.ArgumentParser(prog="CaLIDBatch.py", description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("out")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument(
        "--mode", choices=UPSAMPLE_MODES,
        help="default: calid when a CaLID model is installed, else registration (no model)",
    )
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", help="frames to upsample, e.g. 0,5-9 (default all); write --frames=-2,-1 for a list starting with a minus sign")
    parser.add_argument("--centre-on-heart", action="store_true", help="centre the model's window on the segmented heart")
    parser.add_argument(
        "--placeholder-spacing", default="model",
        help="a file saved without geometry (all spacings 1 mm): the pixel size the network is shown: model (default), keep or mm",
    )
    parser.add_argument("--tta", action="store_true", help="calid, calid+: average over the 8 rotations and reflections of the slice plane (slower)")
    parser.add_argument("--series", help="a DICOM folder with several series: the one to read, by number, UID or part of it, or part of its description; or several holding one slice each (7,8,9)")
    parser.add_argument("--no-segmentation", action="store_true")
    parser.add_argument("--segmentation-model", help="segmentation model file or installed name (default: the installed one)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run with the same names (input, mode, factor), its labels too, hand-corrected or not (by default an existing output is an error)")
    parser.add_argument("--install", action="store_true", help="first install PyTorch and calid, as the panel does on first use")
    args = parser.parse_args(argv)
    try:
        if args.mode is None:
            from calid.models.registry import default_model

            args.mode = "calid" if args.model is not None or default_model("calid") is not None else "registration"
            if args.mode == "registration":
                print("CaLIDBatch: no CaLID model is installed: registration-based interpolation (give --model to use one)", file=sys.stderr, flush=True)
        fixed_placeholder_mm(args.placeholder_spacing)  # a bad value fails before anything is read, made or loaded
        stack = read_stack(args.input, series=args.series)
        out = Path(args.out)
        name = image_stem(args.input)  # a DICOM folder named by UID (1.2.840...) keeps its whole name
        tag = f"{args.mode.replace('+', 'plus')}_x{args.factor}" + ("_tta" if args.tta and args.mode in ("calid", "calid+") else "")
        outputs = {
            "dense": out / f"{name}_{tag}.nii.gz", "labels": out / f"{name}_{tag}_labels.nii.gz",
            "volumes": out / f"{name}_{tag}_volumes.csv", "planes": out / f"{name}_{tag}_planes.json",
        }
        existing = [str(path) for path in outputs.values() if path.exists()]
        if existing and not args.overwrite:
            raise OutputError(existing[0], "exists from an earlier run; choose another output folder, or give --overwrite to replace it")
        out.mkdir(parents=True, exist_ok=True)
        node = mrml.sequence_from_stack(scene, stack, name)[0] if stack.n_frames > 1 else mrml.volume_from_stack(scene, stack, name)
        options = UpsamplingOptions(
            args.factor, args.mode, args.steps, args.seed, args.device, args.model, args.frames, not args.no_segmentation, centre_on_heart=args.centre_on_heart,
            placeholder_spacing=args.placeholder_spacing, tta=args.tta, segmentation_model=args.segmentation_model,
        )
        result = upsample_node(scene, node, options, progress=lambda done, total, message: print(f"{100 * done / max(total, 1):5.1f} % {message}", flush=True))
        for warning in result.warnings:
            print(f"CaLIDBatch: warning: {warning}", file=sys.stderr, flush=True)
        written = [write_stack(result.dense, outputs["dense"])]
        if result.labels is not None:
            written.append(write_stack(result.labels, outputs["labels"], dtype="uint8"))
            written.append(write_function_csv(result.function, outputs["volumes"]))
            if result.planes:
                # The same record as `calid lax` writes: LPS, with RAS under *_ras (a script reads both alike).
                planes = {"coordinates": PLANES_COORDINATES, "planes": {k: p.to_record() for k, p in result.planes.items()}}
                with atomic_path(outputs["planes"]) as tmp:
                    tmp.write_text(json.dumps(planes, indent=2) + "\n")
                written.append(outputs["planes"])
    except CalidError as error:
        print(f"CaLIDBatch: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    kept = {Path(path).resolve() for path in written}
    for path in outputs.values():
        if path.resolve() not in kept:
            path.unlink(missing_ok=True)  # an earlier run's (--overwrite): it would sit beside this run's files as if it were theirs
    if not args.no_segmentation and result.labels is None:
        print("CaLIDBatch: the dense stack was written, but the segmentation failed (see the warning above)", file=sys.stderr)
        return SEGMENTATION_FAILED
    return 0


#: Exit status when the dense stack was written but its segmentation (labels, volumes, planes) failed.
SEGMENTATION_FAILED = 3


if __name__ == "__main__":
    import traceback

    import slicer

    try:
        code = main(sys.argv[1:], getattr(slicer, "mrmlScene", None))  # None outside Slicer: fails below, with the reason
    except SystemExit as stop:  # argparse: --help, or a usage error
        code = stop.code if isinstance(stop.code, int) else 2
    except BaseException:  # noqa: BLE001 - anything else must still end Slicer, with the reason
        traceback.print_exc()
        code = 1
    if hasattr(slicer, "app"):
        slicer.app.exit(code)
    sys.exit(code)
