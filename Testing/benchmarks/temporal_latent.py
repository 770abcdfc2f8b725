"""Should the 2D+T autoencoder downsample time like space? A measurement on real cines.

Two autoencoders of the same size (the ``tiny`` channels) are trained for the
same number of steps on the same clips of ACDC cines (8 frames, 32 x 32 crops):

* ``3D, time downsampled``: the paper's 2D+T VAE (``tiny-2d+t`` with
  ``time_downsampling``): MONAI's 3D AutoencoderKL downsamples t, y and x by
  f = 4, so a clip of 8 frames has a latent of 2 frames;
* ``2D per frame, time kept``: the 2D VAE applied to every frame (``tiny-2d+t``,
  the default), the latent keeps all 8 frames (4 x more latent values per clip).

Reported on held-out subjects: reconstruction PSNR / SSIM, the frame-to-frame
change error of the reconstruction (temporal smoothness against the truth),
latent values per clip, and training time per step. The decision recorded in
``calid.models.config`` comes from this table.

    python Testing/benchmarks/temporal_latent.py --data ACDC/acdc_cine --out results [--steps 300]

Writes temporal_latent.json and temporal_latent.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calid.data.datasets import ClipDataset, find_image_files, load_subjects, split_subjects
from calid.evaluation.metrics import psnr, ssim
from calid.evaluation.temporal import frame_to_frame_change
from calid.models import build_vae, named_config


def clips(dataset: ClipDataset, limit: int | None = None) -> torch.Tensor:
    indices = range(len(dataset)) if limit is None else np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(int)
    return torch.stack([dataset[int(i)]["middle"] for i in indices])  # (N, 1, T, H, W)


def run(variant: str, train: torch.Tensor, validation: torch.Tensor, steps: int, batch: int, seed: int) -> dict[str, Any]:
    config = named_config("tiny-2d+t").replace(time_downsampling=variant.startswith("3D"))
    torch.manual_seed(seed)
    vae = build_vae(config)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)

    started = time.perf_counter()
    for _ in range(steps):
        batch_clips = train[torch.randint(0, len(train), (batch,), generator=generator)]
        reconstruction, mu, sigma = vae(batch_clips)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1).mean()
        loss = (reconstruction - batch_clips).abs().mean() + 1e-6 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        latent = vae.encode(validation[:1])[0]
        output = torch.cat([vae.decode(vae.encode(validation[i : i + 8])[0]) for i in range(0, len(validation), 8)])
    truth = ((validation[:, 0] + 1) / 2).clamp(0, 1).numpy()  # (N, T, H, W)
    predicted = ((output[:, 0] + 1) / 2).clamp(0, 1).numpy()
    frames_p, frames_t = predicted.reshape(-1, *predicted.shape[2:]), truth.reshape(-1, *truth.shape[2:])
    return {
        "variant": variant,
        "psnr": float(np.mean(psnr(frames_p, frames_t))),
        "ssim": float(np.mean(ssim(frames_p, frames_t))),
        "change_error": float(np.mean([abs(frame_to_frame_change(p) - frame_to_frame_change(t)) for p, t in zip(predicted, truth)])),
        "latent_values_per_clip": int(latent.numel()),
        "ms_per_step": 1000.0 * seconds / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of cines (e.g. ACDC acdc_cine)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=24, help="cines used (the last 4 are held out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = named_config("tiny-2d+t")
    volumes = load_subjects(find_image_files(args.data)[: args.subjects], config.preprocess)
    train_ids, val_ids = split_subjects([v.subject for v in volumes], val_subjects=[v.subject for v in volumes[-4:]])
    train = clips(ClipDataset([v for v in volumes if v.subject in train_ids], clip_length=config.clip_length, flips=False, start_stride=4))
    validation = clips(ClipDataset([v for v in volumes if v.subject in val_ids], clip_length=config.clip_length, flips=False, start_stride=8), limit=64)
    rows = [run(variant, train, validation, args.steps, args.batch, args.seed) for variant in ("3D, time downsampled x4", "2D per frame, time kept")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(), "steps": args.steps, "batch_clips": args.batch,
            "train_clips": len(train), "validation_clips": len(validation), "train_subjects": len(train_ids), "validation_subjects": val_ids}
    (out / "temporal_latent.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# 2D+T autoencoder: time downsampled or kept ({args.steps} steps, batch {args.batch} clips of 8 frames, 32 x 32, {meta['threads']} threads)",
        "",
        f"{len(train)} training clips from {len(train_ids)} ACDC subjects; {len(validation)} validation clips from {', '.join(val_ids)}.",
        "",
        "| autoencoder | PSNR (dB) | SSIM | change error | latent values / clip | ms / step |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['change_error']:.4f} | {r['latent_values_per_clip']} | {r['ms_per_step']:.0f} |" for r in rows]
    (out / "temporal_latent.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
