"""Speed of a denoiser training step with and without the latent cache (same run, same batches).

Real trainer steps (``Trainer.train_step``) of the ldm stage on synthetic phantom
cines with an untrained VAE of the chosen configuration: first without the cache
(the frozen VAE encodes the three slices of every triplet each step), then with
every key already cached (the steady state after the first epochs).

    python Testing/benchmarks/latent_cache.py --out Testing/benchmarks/results [--config small] [--device cuda]

Writes latent_cache.json and latent_cache.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from calid.models import build_vae, named_config, save_model
from calid.training.trainer import TrainConfig, Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = named_config(args.config)
        torch.manual_seed(0)
        vae_file = save_model(Path(tmp) / "vae.safetensors", config, build_vae(config))
        common = dict(stage="ldm", data=("phantom:4",), vae_model=str(vae_file), batch_size=args.batch_size, val_fraction=0.0, device=args.device, concat_neighbour_latents=True, prediction="sample")
        results: dict[str, float] = {}
        for name, cache_mb in (("encode every step", 0), ("latent cache", 2048)):
            trainer = Trainer(TrainConfig(out_dir=str(Path(tmp) / name.replace(" ", "-")), latent_cache_mb=cache_mb, **common))  # type: ignore[arg-type]
            batch = next(trainer._batches())  # the same batch every step: with the cache, all of its keys are cached
            trainer.train_step(batch)  # warm-up (and, with the cache, the one step that encodes)
            _sync(trainer.device)
            started = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(batch)
            _sync(trainer.device)
            results[name] = (time.perf_counter() - started) / args.steps
    report = {
        "config": args.config,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "seconds_per_step": results,
        "speed_up": results["encode every step"] / results["latent cache"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latent_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# ldm training step with and without the latent cache ({args.config}, batch {args.batch_size}, {args.device}, {report['threads']} threads)",
        "",
        "| | s / step |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in results.items()),
        "",
        f"Speed-up: {report['speed_up']:.2f}x (every key cached: the steady state after the first epochs).",
        "",
    ]
    (out / "latent_cache.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
