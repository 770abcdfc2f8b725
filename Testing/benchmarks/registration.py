"""Registration-based interpolation: how its settings were chosen, and what it costs.

Part 1, settings. Each interior slice of the ED and ES frames of ACDC *training*
subjects (patient020-029 by default: never used to report the method's quality) is
rebuilt from its two neighbours, on the CaLID models' 96-pixel crop of 1.8 mm, and
scored inside the image against linear interpolation, as ``calid evaluate`` Task 1
scores. Variants: pyramid levels, iterations, smoothing, one or both directions.
The held-out scores of the shipped settings are in ``docs/evaluation``.

Part 2, time. Whole cines upsampled x2 and x8 by linear interpolation and by
registration (one worker thread and one per core), in the same run; ratios to linear.

    python Testing/benchmarks/registration.py --data ACDC/acdc_cine --out Testing/benchmarks/results

Writes registration.json and registration.md in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from calid.data.io import read_stack
from calid.evaluation.harness import EvaluationConfig, Evaluation, _unit, load_evaluation_subjects
from calid.evaluation.metrics import psnr, ssim
from calid.inference.baselines import upsample_linear
from calid.inference.registration import RegistrationSettings, _cores, morph, upsample_registration

SHIPPED = RegistrationSettings()
VARIANTS = {
    "shipped: 3 levels, 50 iterations, 3.6 mm, both directions": SHIPPED,
    "one direction": dataclasses.replace(SHIPPED, symmetric=False),
    "2 levels": dataclasses.replace(SHIPPED, levels=2),
    "1 level (no pyramid)": dataclasses.replace(SHIPPED, levels=1),
    "4 levels": dataclasses.replace(SHIPPED, levels=4),
    "20 iterations": dataclasses.replace(SHIPPED, iterations=20),
    "100 iterations": dataclasses.replace(SHIPPED, iterations=100),
    "smoothing 2.7 mm": dataclasses.replace(SHIPPED, smoothing_mm=2.7),
    "smoothing 5.4 mm": dataclasses.replace(SHIPPED, smoothing_mm=5.4),
}


def settings_sweep(data: str, subjects: list[str]) -> dict[str, dict[str, float]]:
    config = EvaluationConfig(data=(data,), out_dir="unused", methods=("linear",), tasks=(1,), subjects=tuple(subjects), placeholder_spacing="1.43")
    evaluation = Evaluation(config)
    triplets = [evaluation._triplets(s) for s in load_evaluation_subjects(config, 1.43)]
    pixel_mm = evaluation.preprocess_config.target_spacing_mm or 1.0
    rows: dict[str, list[tuple[float, float, float]]] = {"linear": []}
    for data_of_subject in triplets:
        truth = _unit(data_of_subject.within_image(data_of_subject.truth))
        linear = _unit(data_of_subject.within_image(0.5 * (data_of_subject.previous + data_of_subject.following)))
        rows["linear"].append((float(psnr(linear, truth).mean()), float(ssim(linear, truth).mean()), 0.0))
        pairs = list(zip(data_of_subject.previous, data_of_subject.following))
        for name, settings in VARIANTS.items():
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=_cores()) as pool:
                predicted = np.stack(list(pool.map(lambda pair: morph(pair[0], pair[1], [0.5], (pixel_mm, pixel_mm), settings)[0], pairs)))
            seconds = time.perf_counter() - started
            predicted = _unit(data_of_subject.within_image(predicted))
            rows.setdefault(name, []).append((float(psnr(predicted, truth).mean()), float(ssim(predicted, truth).mean()), 1000.0 * seconds / len(pairs)))
        print(f"{data_of_subject.cropped.source}: done", flush=True)
    return {name: dict(zip(("psnr", "ssim", "ms_per_slice"), np.mean(np.asarray(values), axis=0).round(4).tolist())) for name, values in rows.items()}


def timing(files: list[Path], frames: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for path in files:
        stack = read_stack(path)
        stack = stack.select_frames(list(range(min(frames, stack.n_frames))))
        for factor in (2, 8):
            started = time.perf_counter()
            upsample_linear(stack, factor)
            linear_s = time.perf_counter() - started
            row: dict[str, object] = {"file": path.name, "shape (T, Z, Y, X)": list(stack.shape), "pixel_mm": round(stack.spacing[0], 3), "factor": factor, "linear_s": round(linear_s, 4)}
            for workers in sorted({1, _cores()}):
                started = time.perf_counter()
                upsample_registration(stack, factor, workers=workers)
                row[f"registration_s_{workers}_workers"] = round(time.perf_counter() - started, 2)
            gaps = stack.n_frames * (stack.n_slices - 1)
            row["registration_s_per_gap"] = round(float(row[f"registration_s_{_cores()}_workers"]) / gaps, 3)  # type: ignore[arg-type]
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the ACDC cine folder (acdc_cine)")
    parser.add_argument("--subjects", default=",".join(f"patient{n:03d}" for n in range(20, 30)), help="training subjects for the settings sweep")
    parser.add_argument("--cines", default="patient061_4d.nii.gz", help="cines of --data to time (comma-separated)")
    parser.add_argument("--extra-cine", action="append", default=[], help="another cine file to time (e.g. the Sunnybrook sample)")
    parser.add_argument("--frames", type=int, default=30, help="frames of each cine to time (default 30)")
    parser.add_argument("--out", default="Testing/benchmarks/results")
    args = parser.parse_args()
    files = [Path(args.data) / name for name in args.cines.split(",") if name] + [Path(p) for p in args.extra_cine]
    sweep = settings_sweep(args.data, args.subjects.split(","))
    times = timing(files, args.frames)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {_cores()} cores"
    (out / "registration.json").write_text(json.dumps({"machine": machine, "subjects": args.subjects, "settings": sweep, "timing": times}, indent=2) + "\n")
    linear = sweep["linear"]
    lines = [
        "# Registration-based interpolation: settings and time",
        "",
        f"Produced by `Testing/benchmarks/registration.py` on {machine}.",
        "",
        f"## Settings (ACDC training subjects {args.subjects.split(',')[0]}–{args.subjects.split(',')[-1]}, ED and ES, 96-px crops of 1.8 mm, inside the image)",
        "",
        "| variant | PSNR (dB) | SSIM | over linear | ms / slice |",
        "|---|---|---|---|---|",
    ]
    for name, row in sweep.items():
        gain = "" if name == "linear" else f"+{row['psnr'] - linear['psnr']:.2f} dB / +{row['ssim'] - linear['ssim']:.3f}"
        lines.append(f"| {name} | {row['psnr']:.2f} | {row['ssim']:.3f} | {gain} | {row['ms_per_slice']:.0f} |")
    lines += ["", "## Time on whole cines (seconds; one registration per gap serves every factor)", ""]
    worker_keys = [k for k in times[0] if k.startswith("registration_s_") and k.endswith("workers")] if times else []
    lines.append("| cine | T x Z x Y x X | factor | linear | " + " | ".join(k.replace("registration_s_", "registration, ").replace("_", " ") for k in worker_keys) + " | s / gap | ratio to linear |")
    lines.append("|---" * (5 + len(worker_keys) + 1) + "|")
    for row in times:
        shape = " x ".join(str(v) for v in row["shape (T, Z, Y, X)"])  # type: ignore[attr-defined]
        fastest = min(float(row[k]) for k in worker_keys)  # type: ignore[arg-type]
        lines.append(
            f"| {row['file']} | {shape} | x{row['factor']} | {row['linear_s']} | " + " | ".join(str(row[k]) for k in worker_keys)
            + f" | {row['registration_s_per_gap']} | {fastest / max(float(row['linear_s']), 1e-6):.0f}x |"  # type: ignore[arg-type]
        )
    (out / "registration.md").write_text("\n".join(lines) + "\n")
    print((out / "registration.md").read_text())


if __name__ == "__main__":
    main()
