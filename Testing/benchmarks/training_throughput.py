"""Training throughput (samples/s) of the VAE and the CaLID denoiser for each configuration.

Measures full optimisation steps (forward, backward, AdamW update) on random
inputs of the configuration's size, after warm-up steps, on the chosen device.
The VAE step includes the KL term but not the LPIPS / PatchGAN terms (those
depend on the stage's schedule); the denoiser step includes encoding the
middle slice with a frozen VAE, as in training.

    python Testing/benchmarks/training_throughput.py --out bench-results [--device cuda] [--configs tiny,small,paper]

Writes training_throughput.json and training_throughput.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from calid.diffusion.ddim import NoiseSchedule
from calid.models import CaLIDNet, build_vae, named_config

DEFAULT_BATCH = {"tiny": 16, "small": 8, "paper": 4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, device: torch.device, batch: int, steps: int, warmup: int) -> dict[str, float | int | str]:
    config = named_config(name)
    size = config.image_size
    torch.manual_seed(0)
    vae = build_vae(config).to(device)
    images = torch.rand(batch, 1, size, size, device=device) * 2 - 1
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)

    def vae_step() -> None:
        reconstruction, mu, sigma = vae(images)
        loss = (reconstruction - images).abs().mean() + 1e-6 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1).sum() / batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    net = CaLIDNet(config).to(device)
    frozen = build_vae(config).to(device).eval().requires_grad_(False)
    schedule = NoiseSchedule(config.schedule)
    neighbours = torch.rand(batch, 2, size, size, device=device) * 2 - 1
    net_optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def ldm_step() -> None:
        with torch.no_grad():
            z0 = frozen.encode(images)[0]
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (batch,), device=device)
        loss = (net(schedule.add_noise(z0, noise, t), t, neighbours) - noise).pow(2).mean()
        net_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        net_optimizer.step()

    result: dict[str, float | int | str] = {
        "config": name,
        "image_size": size,
        "batch": batch,
        "vae_parameters_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 3),
        "denoiser_parameters_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
    }
    for label, step in (("vae", vae_step), ("ldm", ldm_step)):
        for _ in range(warmup):
            step()
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = time.perf_counter() - started
        result[f"{label}_samples_per_s"] = round(batch * steps / seconds, 2)
        result[f"{label}_seconds_per_step"] = round(seconds / steps, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", default="tiny,small,paper")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    rows = [measure(name, device, DEFAULT_BATCH.get(name, 4), args.steps, args.warmup) for name in args.configs.split(",")]
    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_throughput.json").write_text(json.dumps({"environment": environment, "results": rows}, indent=2))
    lines = [
        f"# Training throughput on {environment['device']} (torch {environment['torch']})",
        "",
        "| config | px | batch | VAE M params | denoiser M params | VAE samples/s | denoiser samples/s | denoiser / VAE time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = float(r["vae_samples_per_s"]) / float(r["ldm_samples_per_s"])
        lines.append(
            f"| {r['config']} | {r['image_size']} | {r['batch']} | {r['vae_parameters_M']} | {r['denoiser_parameters_M']} | "
            f"{r['vae_samples_per_s']} | {r['ldm_samples_per_s']} | {ratio:.1f}x |"
        )
    (out / "training_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
