"""How the segmenter pads a field of view smaller than its window, on held-out labelled volumes.

A short-axis cine cropped around the heart (ACDC's cines cover about 150 mm) is
smaller than the network's 128-pixel (192 mm) window. Training padded such
patches with their edge values (``SpatialPadd(mode="edge")``); `calid segment`
now does the same (``pad_like_training``). The alternative measured here is the
constant -1 (the intensity floor) that inference used before. Each held-out
volume is cropped around its labelled heart to SIZE x SIZE pixels and
segmented both ways; whole-crop Dice against the cropped ground truth.

    python Testing/benchmarks/segmentation_small_fov.py --data ACDC/acdc_edes_labels \\
        --subjects patient011,patient017,patient019 --out Testing/benchmarks/results

Writes segmentation_small_fov.json and segmentation_small_fov.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

import calid.segmentation.inference as inference
from calid.data.io import read_stack
from calid.models.registry import resolve_model
from calid.segmentation import load_segmenter, segment
from calid.segmentation.training import dice_per_structure

STRUCTURES = {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"}
SHIPPED_PADDING = inference.pad_like_training


def constant_padding(batch: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """The former padding: the intensity floor -1 around the image, centred like the shipped one."""
    height, width = batch.shape[-2:]
    pad_y, pad_x = max(0, patch_size - height), max(0, patch_size - width)
    top, left = pad_y // 2, pad_x // 2
    padded = torch.nn.functional.pad(batch, (left, pad_x - left, top, pad_y - top), mode="constant", value=-1.0)
    return padded, (slice(top, top + height), slice(left, left + width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of NAME.nii.gz images with NAME_gt.nii.gz labels")
    parser.add_argument("--subjects", default="patient011,patient017,patient019", help="held-out subjects of the segmenter")
    parser.add_argument("--sizes", default="80,96,112", help="crop sizes in pixels")
    parser.add_argument("--model", help="segmentation model (default: the installed one)")
    parser.add_argument("--out", default="Testing/benchmarks/results")
    args = parser.parse_args()
    model = load_segmenter(resolve_model(args.model, kind="segmentation"))
    labels = sorted(p for subject in args.subjects.split(",") for p in Path(args.data).glob(f"{subject}_frame*_gt.nii.gz"))
    if not labels:
        raise SystemExit(f"no labelled volumes of {args.subjects} in {args.data}")
    paddings = {"constant -1 (before)": constant_padding, "edge values (shipped)": SHIPPED_PADDING}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            for name, padding in paddings.items():
                inference.pad_like_training = padding  # what segment() calls before its sliding windows
                scores: dict[int, list[float]] = {value: [] for value in STRUCTURES}
                for label_path in labels:
                    image, truth = read_stack(label_path.with_name(label_path.name.replace("_gt", ""))), read_stack(label_path)
                    heart = np.argwhere(truth.data[0] > 0)
                    cy, cx = (int(v) for v in heart[:, 1:3].mean(axis=0))
                    rows, columns = slice(max(0, cy - size // 2), cy + size // 2), slice(max(0, cx - size // 2), cx + size // 2)
                    crop = image.with_data(np.ascontiguousarray(image.data[:, :, rows, columns]))
                    for value, dice in dice_per_structure(segment(crop, model).data, np.rint(truth.data[:, :, rows, columns]), tuple(STRUCTURES)).items():
                        scores[value].append(dice)
                summary.setdefault(str(size), {})[name] = {STRUCTURES[v]: float(np.nanmean(d)) for v, d in scores.items()}
                print(size, name, {k: round(v, 3) for k, v in summary[str(size)][name].items()}, flush=True)
    finally:
        inference.pad_like_training = SHIPPED_PADDING
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    volumes = [p.name.replace("_gt.nii.gz", "") for p in labels]
    (out / "segmentation_small_fov.json").write_text(json.dumps({"volumes": volumes, "model": Path(model.path).stem, "machine": platform.processor() or platform.machine(), "dice": summary}, indent=2) + "\n")
    lines = [
        "# Segmenter on small fields of view: padding like training against a constant",
        "",
        f"Held-out volumes ({', '.join(volumes)}), each cropped around its labelled heart; model `{Path(model.path).stem}`. "
        "Dice (RV cavity / LV myocardium / LV cavity) on the crop. Made by `Testing/benchmarks/segmentation_small_fov.py`.",
        "",
        "| crop (px) | " + " | ".join(paddings) + " |",
        "|---|" + "---|" * len(paddings),
    ]
    for size, rows in summary.items():
        lines.append(f"| {size} | " + " | ".join(" / ".join(f"{rows[name][s]:.3f}" for s in STRUCTURES.values()) for name in paddings) + " |")
    (out / "segmentation_small_fov.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
