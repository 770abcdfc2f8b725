"""What the autoencoder and the preprocessing cost: middle-slice quality of the baselines and a model, on held-out triplets.

For a trained model file and a folder of cines, on the same held-out slice
triplets (previous, middle, next; 10 mm gaps):

- pixel linear interpolation, the autoencoder's reconstruction of the middle
  slice (the ceiling of every latent method), latent-linear interpolation and,
  for a full CaLID model, CaLID with the model's default steps (and with
  ``--tta``, also averaged over the 8 rotations and reflections);
- each with the decoder floor snap as stored in the model and without it
  (``floor_snap`` = 0), and with files saved without geometry read as stored
  (1 mm pixels) and at the median pixel size of the others.

    python Testing/benchmarks/latent_quality.py --model MODEL --data ACDC/acdc_cine \\
        --subjects patient011,patient017,patient019,patient061..patient070 --out Testing/benchmarks/results

Writes latent_quality.json and latent_quality.md in --out (PSNR in dB and SSIM
on the model's [0, 1] crops).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calid.data.datasets import TripletDataset
from calid.evaluation.metrics import psnr, ssim
from calid.inference.pipeline import load_pipeline
from calid.training.trainer import gather_volumes


def expand_subjects(text: str) -> list[str]:
    """``patient011,patient061..patient070`` -> the listed names, ranges expanded."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if ".." in part:
            first, last = part.split("..")
            prefix, start = re.match(r"(\D*)(\d+)$", first).groups()  # type: ignore[union-attr]
            end = int(re.match(r"\D*(\d+)$", last).group(1))  # type: ignore[union-attr]
            names += [f"{prefix}{i:0{len(start)}d}" for i in range(int(start), end + 1)]
        else:
            names.append(part)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a CaLID model file (or an autoencoder file)")
    parser.add_argument("--data", required=True, help="folder of cines")
    parser.add_argument("--subjects", required=True, help="held-out subjects, e.g. patient061..patient070")
    parser.add_argument("--triplets", type=int, default=128, help="triplets drawn (seeded) from those subjects")
    parser.add_argument("--steps", type=int, help="DDIM steps of calid (default: the model's)")
    parser.add_argument("--tta", action="store_true", help="also calid with test-time augmentation (8 rotations and reflections averaged)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipeline = load_pipeline(args.model, device="cpu")
    assert pipeline.model is not None
    stored_snap = pipeline.config.vae.floor_snap
    subjects = set(expand_subjects(args.subjects))
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        for geometry in ("keep", "median"):
            volumes = gather_volumes((args.data,), pipeline.config, Path(cache) / geometry, geometry)
            triplets = TripletDataset([v for v in volumes if v.subject in subjects], gaps=(1,), flips=False)
            if len(triplets) == 0:
                raise SystemExit(f"no triplets of {sorted(subjects)} in {args.data}")
            chosen = torch.randperm(len(triplets), generator=torch.Generator().manual_seed(12345)).tolist()[: args.triplets]
            items = [triplets[i] for i in chosen]
            previous, middle, following = (np.stack([item[k][0].numpy() for item in items]) for k in ("previous", "middle", "next"))

            def score(predicted: np.ndarray) -> tuple[float, float]:
                unit_p, unit_t = (np.clip((a + 1.0) / 2.0, 0.0, 1.0) for a in (predicted, middle))
                return float(np.mean(psnr(unit_p, unit_t))), float(np.mean(ssim(unit_p, unit_t)))

            for snap in (stored_snap, 0.0):
                model = pipeline.model
                pipeline.model = dataclasses.replace(model, config=model.config.replace(vae=dataclasses.replace(model.config.vae, floor_snap=snap)))
                try:
                    with torch.no_grad():
                        reconstruction = pipeline._decode(pipeline._encode(torch.from_numpy(middle)[:, None])).numpy()
                    methods = {
                        "linear": 0.5 * (previous + following),
                        "autoencoder reconstruction": reconstruction,
                        "latent-linear": pipeline.interpolate_slices(previous, following, "latent-linear"),
                    }
                    if model.net is not None:
                        steps = args.steps or pipeline.default_steps
                        methods[f"calid ({steps} step(s))"] = pipeline.interpolate_slices(previous, following, "calid", steps, batch_size=32)
                        if args.tta:
                            methods[f"calid ({steps} step(s)), tta"] = pipeline.interpolate_slices(previous, following, "calid", steps, batch_size=32, tta=True)
                finally:
                    pipeline.model = model
                for method, predicted in methods.items():
                    value_psnr, value_ssim = score(predicted)
                    rows.append({"geometry": geometry, "floor_snap": snap, "method": method, "psnr": round(value_psnr, 3), "ssim": round(value_ssim, 4), "triplets": len(items)})
                    print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": Path(args.model).name,
        "model_sha256": pipeline.sha256,
        "subjects": sorted(subjects),
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    (out / "latent_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Latent quality: baselines and the model on held-out triplets",
        "",
        f"Model `{report['model']}` (sha256 `{pipeline.sha256[:16]}…`), {rows[0]['triplets']} triplets of {len(subjects)} held-out subjects; "
        "PSNR (dB) / SSIM on the model's crops in [0, 1]. `geometry`: files saved without geometry read as stored (keep, 1 mm pixels) "
        "or at the median pixel size of the others (median). `floor snap`: as stored in the model, or off.",
        "",
        "| geometry | floor snap | method | PSNR | SSIM |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['geometry']} | {r['floor_snap']:g} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} |" for r in rows]
    (out / "latent_quality.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'latent_quality.md'}")


if __name__ == "__main__":
    main()
