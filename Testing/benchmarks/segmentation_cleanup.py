"""Which clean-up of the segmenter's output scores best on held-out labelled volumes.

`calid segment` keeps the largest connected heart and, per slice, the largest
piece of each structure (``keep_largest_components``). Keeping every piece
of at least a fraction of the largest (to keep, e.g., a separate RV outflow
tract) is the alternative measured here, with and without the same rule for
the 3D heart step. The network runs once per volume; every clean-up is
applied to the same raw labels and scored with the whole-volume Dice.

    python Testing/benchmarks/segmentation_cleanup.py --data ACDC/acdc_edes_labels \\
        --subjects patient011,patient017,patient019 --out Testing/benchmarks/results

Writes segmentation_cleanup.json and segmentation_cleanup.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
from scipy import ndimage

from calid.data.io import read_stack
from calid.models.registry import resolve_model
from calid.segmentation import keep_largest_components, load_segmenter, segment

STRUCTURES = {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"}


def keep_large_components(labels: np.ndarray, fraction_2d: float, fraction_3d: float) -> np.ndarray:
    """The alternative: keep every component of at least ``fraction`` of the largest (heart in 3D, structures per slice)."""

    def drop_small(mask_labels: np.ndarray, count: int, fraction: float) -> np.ndarray:
        sizes = ndimage.sum_labels(np.ones_like(mask_labels), mask_labels, index=np.arange(1, count + 1))
        kept = np.arange(1, count + 1)[sizes >= fraction * sizes.max()]
        return (mask_labels > 0) & ~np.isin(mask_labels, kept)

    out = labels.copy()
    heart, count = ndimage.label(out > 0)
    if count > 1:
        out[drop_small(heart, count, fraction_3d)] = 0
    for z in range(out.shape[0]):
        for value in STRUCTURES:
            pieces, count = ndimage.label(out[z] == value)
            if count > 1:
                out[z][drop_small(pieces, count, fraction_2d)] = 0
    return out


def dice(prediction: np.ndarray, truth: np.ndarray, value: int) -> float:
    p, t = prediction == value, truth == value
    total = p.sum() + t.sum()
    return float(2 * (p & t).sum() / total) if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of NAME.nii.gz + NAME_gt.nii.gz")
    parser.add_argument("--subjects", default="patient011,patient017,patient019", help="held-out subjects (the shipped segmenter's validation)")
    parser.add_argument("--model", help="segmentation model (default: the installed one)")
    parser.add_argument("--out", default="Testing/benchmarks/results")
    args = parser.parse_args()

    model = load_segmenter(resolve_model(args.model, kind="segmentation"))
    cleanups = {
        "none": lambda raw: raw,
        "largest piece (shipped)": lambda raw: keep_largest_components(raw, tuple(STRUCTURES)),
        "pieces >= 20 % per slice": lambda raw: keep_large_components(raw, 0.2, 1.0),
        "pieces >= 10 % per slice": lambda raw: keep_large_components(raw, 0.1, 1.0),
        "pieces >= 20 % per slice and in 3D": lambda raw: keep_large_components(raw, 0.2, 0.2),
        "pieces >= 10 % per slice and in 3D": lambda raw: keep_large_components(raw, 0.1, 0.1),
    }
    scores: dict[str, dict[str, list[float]]] = {name: {s: [] for s in STRUCTURES.values()} for name in cleanups}
    volumes = []
    for subject in args.subjects.split(","):
        for image in sorted(Path(args.data).glob(f"{subject}_frame??.nii.gz")):
            truth = np.rint(read_stack(image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz"))).data[0]).astype(np.uint8)
            raw = segment(read_stack(image), model, largest_component=False).data[0].astype(np.uint8)
            volumes.append(image.name)
            for name, cleanup in cleanups.items():
                cleaned = cleanup(raw)
                for value, structure in STRUCTURES.items():
                    scores[name][structure].append(dice(cleaned, truth, value))
    summary = {name: {s: float(np.nanmean(v)) for s, v in by_structure.items()} for name, by_structure in scores.items()}
    for values in summary.values():
        values["mean"] = float(np.mean(list(values.values())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "segmentation_cleanup.json").write_text(json.dumps({"volumes": volumes, "model": str(Path(model.path).stem), "machine": platform.processor() or platform.machine(), "dice": summary}, indent=2))
    lines = [
        "# Segmentation clean-up: whole-volume Dice on held-out labelled volumes",
        "",
        f"{len(volumes)} volumes ({', '.join(volumes)}); model `{Path(model.path).stem}`; "
        "the network runs once per volume, every clean-up is applied to the same raw labels.",
        "",
        "| clean-up | " + " | ".join(STRUCTURES.values()) + " | mean |",
        "|---|" + "---|" * (len(STRUCTURES) + 1),
    ]
    for name, values in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[s]:.4f}" for s in STRUCTURES.values()) + f" | {values['mean']:.4f} |")
    (out / "segmentation_cleanup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
