"""Speed of one autoencoder training step: eager, channels-last memory format, and torch.compile.

The same VAE (untrained, of the chosen configuration), the same random batch and
the same L1 + KL loss with AdamW, in one run; each variant starts from the same
weights. The compiled variant's first step (compilation) is timed on its own.

    python Testing/benchmarks/vae_step_variants.py --out Testing/benchmarks/results [--config small] [--device cuda]

Writes vae_step_variants.json and vae_step_variants.md in --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from calid.models import build_vae, named_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=96, help="crop size in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = build_vae(named_config(args.config)).to(device)
    images = torch.rand(args.batch_size, 1, args.size, args.size, device=device) * 2 - 1

    def run(name: str, channels_last: bool = False, compile_model: bool = False) -> dict[str, float]:
        vae = copy.deepcopy(reference)
        batch = images
        if channels_last:
            vae, batch = vae.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)
        model = torch.compile(vae) if compile_model else vae

        def step() -> None:
            reconstruction, mu, sigma = model(batch)
            loss = (reconstruction - batch).abs().mean() + 1e-6 * (mu.pow(2) + sigma.pow(2)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        started = time.perf_counter()
        step()  # warm-up; for the compiled model, the compilation
        _sync(device)
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        per_step = (time.perf_counter() - started) / args.steps
        print(f"{name}: first step {first:.1f} s, then {per_step:.2f} s per step", flush=True)
        return {"first_step_s": first, "step_s": per_step}

    results = {"eager": run("eager"), "channels-last": run("channels-last", channels_last=True)}
    if not args.skip_compile:
        results["torch.compile"] = run("torch.compile", compile_model=True)
    eager = results["eager"]["step_s"]
    report = {
        "config": args.config,
        "batch_size": args.batch_size,
        "size": args.size,
        "device": args.device,
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "results": results,
        "speed_vs_eager": {name: eager / r["step_s"] for name, r in results.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_step_variants.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Autoencoder training step: eager, channels-last, torch.compile",
        "",
        f"`{args.config}` VAE, batch {args.batch_size}, {args.size} px, L1 + KL, AdamW; {args.device}; torch {torch.__version__}; {report['machine']}.",
        "",
        "| variant | first step (s) | then, per step (s) | speed vs eager |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['first_step_s']:.1f} | {r['step_s']:.2f} | {report['speed_vs_eager'][name]:.2f}x |" for name, r in results.items()]
    (out / "vae_step_variants.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
