"""Do registration-based interpolation and a CaLID model make different errors?

Task 1 of ``calid evaluate`` (each interior slice of the ED and ES frames rebuilt from its two
neighbours, scored inside the image on the model's crop) for linear interpolation,
registration, the model's CaLID and the plain average of the registration and CaLID slices.
If the average beats both, the two carry complementary information: a hint for conditioning
the denoiser on the registered neighbours (not the method itself; nothing ships from this).

    python Testing/benchmarks/registration_and_calid.py --data ACDC/acdc_cine --model MODEL \\
        --subjects patient011,patient017,patient019,patient061..patient070 \\
        --lpips-weights weights/lpips_alexnet_features.pth --out Testing/benchmarks/results

Writes registration_and_calid.json and registration_and_calid.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from calid.evaluation.harness import EvaluationConfig, Evaluation, PerceptualMetrics, _unit, load_evaluation_subjects
from calid.evaluation.metrics import psnr, ssim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True, help="a CaLID model file or installed name")
    parser.add_argument("--subjects", default="patient011,patient017,patient019,patient061..patient070")
    parser.add_argument("--lpips-weights")
    parser.add_argument("--out", default="Testing/benchmarks/results")
    args = parser.parse_args()
    config = EvaluationConfig(
        data=(args.data,), out_dir="unused", model=args.model, methods=("linear", "registration", "calid"), tasks=(1,),
        subjects=tuple(args.subjects.split(",")), lpips_weights=args.lpips_weights,
    )
    evaluation = Evaluation(config)
    perceptual = PerceptualMetrics(config.lpips_weights)
    names = ("linear", "registration", "calid", "mean of registration and calid")
    per_subject: dict[str, list[list[float]]] = {name: [] for name in names}
    for subject in load_evaluation_subjects(config, evaluation._placeholder_spacing_mm()):
        triplets = evaluation._triplets(subject)
        truth = triplets.within_image(triplets.truth)
        predicted = {m: evaluation._predict(m, triplets.previous, triplets.following, triplets.keys) for m in names[:3]}
        predicted[names[3]] = 0.5 * (predicted["registration"] + predicted["calid"])
        for name, images in predicted.items():
            inside = triplets.within_image(images)
            scores = [float(psnr(_unit(inside), _unit(truth)).mean()), float(ssim(_unit(inside), _unit(truth)).mean())]
            scores.append(float(perceptual.lpips(inside, truth).mean()) if perceptual.available else float("nan"))
            per_subject[name].append(scores)
        print(f"{subject.name}: done", flush=True)
    summary = {name: dict(zip(("psnr", "ssim", "lpips"), np.mean(np.asarray(rows), axis=0).round(4).tolist())) for name, rows in per_subject.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = platform.processor() or platform.machine()
    record = {"model": Path(evaluation.pipeline.name).name, "model_sha256": evaluation.pipeline.sha256, "subjects": args.subjects, "steps": evaluation.steps, "machine": machine, "summary": summary}
    (out / "registration_and_calid.json").write_text(json.dumps(record, indent=2) + "\n")
    linear = summary["linear"]
    lines = [
        "# Registration and CaLID: complementary errors?",
        "",
        f"Produced by `Testing/benchmarks/registration_and_calid.py` with model `{record['model']}` (sha256 `{evaluation.pipeline.sha256[:16]}…`, "
        f"{evaluation.steps} DDIM step(s)) on {args.subjects}: Task 1 slices, scored inside the image, means over subjects.",
        "",
        "| method | PSNR (dB) | SSIM | LPIPS-alex | over linear |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        gain = "" if name == "linear" else f"+{row['psnr'] - linear['psnr']:.2f} dB / +{row['ssim'] - linear['ssim']:.3f}"
        lines.append(f"| {name} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['lpips']:.3f} | {gain} |")
    (out / "registration_and_calid.md").write_text("\n".join(lines) + "\n")
    print((out / "registration_and_calid.md").read_text())


if __name__ == "__main__":
    main()
