"""Reference scores on the trainer's own validation triplets (the rows beside a run's validation.csv).

``calid train`` validates on a fixed random sample of held-out triplets (``max_val_batches x
batch_size`` of them, 1 DDIM step, scored inside the image). This script draws the same triplets
and scores, the same way (MONAI's PSNR and SSIM on [0, 1]): linear interpolation, registration,
latent-linear interpolation of the acquired and of the moved neighbours (the latter is where a
registration-guided model predicting the correction to the neighbours' mean starts),
a CaLID model on the acquired neighbours, the same model on the neighbours moved to the middle
by the registration (what a registration-guided fine-tune starts from), and the mean of the
registration and model slices.

    python Testing/benchmarks/validation_references.py --data ACDC/acdc_cine --model MODEL \\
        --val-subjects patient011,patient017,patient019,patient061,...,patient070 --out Testing/benchmarks/results

Writes validation_references.json and validation_references.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from calid.data.datasets import TripletDataset, image_extent, split_subjects
from calid.inference.pipeline import load_pipeline
from calid.inference.registration import moved_to_middle
from calid.training.trainer import gather_volumes, to_unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True, help="a CaLID model file (plain, not registration-guided)")
    parser.add_argument("--val-subjects", required=True, help="comma-separated, as given to calid train")
    parser.add_argument("--triplets", type=int, default=256, help="the trainer's max_val_batches x batch_size (default 8 x 32)")
    parser.add_argument("--cache-dir", default="benchmark-cache", help="preprocessed-data cache (a run's, to reuse it)")
    parser.add_argument("--out", default="Testing/benchmarks/results")
    args = parser.parse_args()
    pipeline = load_pipeline(args.model, device="cpu")
    config = pipeline.config
    pixel_mm = float(config.preprocess.target_spacing_mm or 1.0)
    volumes = gather_volumes((args.data,), config, Path(args.cache_dir), "median")
    _, val_ids = split_subjects([v.subject for v in volumes], 0.15, 0, tuple(args.val_subjects.split(",")))
    dataset = TripletDataset([v for v in volumes if v.subject in set(val_ids)], gaps=(1,), flips=False)
    # The trainer's draw (Trainer.validate): the same generator seed, the same first items.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(12345)).tolist()[: args.triplets]
    items = [dataset[i] for i in order]
    previous, middle, following = (np.stack([item[k][0].numpy() for item in items]) for k in ("previous", "middle", "next"))
    extents = [image_extent(volume.data) for volume in dataset.volumes]
    moved = moved_to_middle(previous, following, pixel_mm)
    predictions = {
        "linear": 0.5 * (previous + following),
        "registration": 0.5 * moved[:, 0] + 0.5 * moved[:, 1],
        # The latent mean of the moved neighbours is where a registration-guided model that
        # predicts the correction to that mean (--residual-to-neighbours) starts its fine-tune.
        "latent-linear, acquired neighbours": pipeline.interpolate_slices(previous, following, "latent-linear"),
        "latent-linear, neighbours moved by the registration": pipeline.interpolate_slices(moved[:, 0], moved[:, 1], "latent-linear"),
        "model, acquired neighbours": pipeline.interpolate_slices(previous, following, "calid", steps=1),
        "model, neighbours moved by the registration": pipeline.interpolate_slices(moved[:, 0], moved[:, 1], "calid", steps=1),
    }
    predictions["mean of registration and model"] = 0.5 * (predictions["registration"] + predictions["model, acquired neighbours"])
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0)
    summary = {}
    for name, images in predictions.items():
        psnr_values, ssim_values = [], []
        for index, item in enumerate(items):
            rows, columns = extents[int(item["keys"][0, 0])]
            predicted = to_unit(torch.from_numpy(images[index : index + 1, None])[..., rows, columns])
            truth = to_unit(torch.from_numpy(middle[index : index + 1, None])[..., rows, columns])
            psnr_values.append(float(psnr(predicted, truth).mean()))
            ssim_values.append(float(ssim(predicted, truth).mean()))
        summary[name] = {"psnr": round(float(np.mean(psnr_values)), 3), "ssim": round(float(np.mean(ssim_values)), 4)}
        print(f"{name}: {summary[name]['psnr']:.2f} dB / {summary[name]['ssim']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": Path(args.model).name, "model_sha256": pipeline.sha256, "triplets": len(items), "machine": platform.processor() or platform.machine(), "summary": summary}
    (out / "validation_references.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Reference scores on the trainer's validation triplets",
        "",
        f"Produced by `Testing/benchmarks/validation_references.py` with model `{record['model']}` (sha256 `{pipeline.sha256[:16]}…`, 1 DDIM step) "
        f"on {len(items)} held-out triplets drawn as `calid train` draws them; scored inside the image.",
        "",
        "| method | PSNR (dB) | SSIM |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {row['psnr']:.2f} | {row['ssim']:.3f} |" for name, row in summary.items()]
    (out / "validation_references.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
