"""Speed of one autoencoder training step with PyTorch's default threads and with fewer (``--threads``),
on an idle CPU and on a CPU that another job keeps busy.

The other job is a second process multiplying matrices with PyTorch's default threads (as a second
training run or a test suite would). Each condition times the same step (an untrained VAE of the
chosen configuration, L1 + KL, AdamW) after one warm-up step; the ratios are to the idle CPU with
default threads, measured in the same run.

    python Testing/benchmarks/threads_on_a_shared_cpu.py --out Testing/benchmarks/results [--config small]

Writes threads_on_a_shared_cpu.json and threads_on_a_shared_cpu.md in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from calid.models import build_vae, named_config

#: The other job: matrix products with PyTorch's default threads, until it is killed.
BUSY_JOB = "import torch\na = torch.randn(1500, 1500)\nwhile True:\n    a @ a\n"


def time_steps(config: str, batch_size: int, size: int, steps: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = build_vae(named_config(config))
    images = torch.rand(batch_size, 1, size, size) * 2 - 1
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    times = []
    for index in range(steps + 1):
        started = time.perf_counter()
        reconstruction, mu, sigma = vae(images)
        loss = (reconstruction - images).abs().mean() + 1e-6 * (mu.pow(2) + sigma.pow(2)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index:  # the first step (allocations, kernel selection) is not timed
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="crop size in pixels")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine already (the "none" rows are only as idle as this)
    counts = sorted({default_threads, max(1, default_threads // 2), 1}, reverse=True)
    rows = []
    for busy in (False, True):
        job = subprocess.Popen([sys.executable, "-c", BUSY_JOB]) if busy else None
        try:
            if job is not None:
                time.sleep(3.0)  # let it start multiplying
            for threads in counts:
                times = time_steps(args.config, args.batch_size, args.size, args.steps, threads)
                rows.append({"other_job": busy, "threads": threads, "median_s": statistics.median(times), "steps_s": times})
                print(f"other job {'running' if busy else 'none':7s}  threads {threads}: {statistics.median(times):.3f} s per step", flush=True)
        finally:
            if job is not None:
                job.kill()
                job.wait()
    reference = next(r["median_s"] for r in rows if not r["other_job"] and r["threads"] == default_threads)
    for row in rows:
        row["ratio_to_idle_default"] = row["median_s"] / reference
    machine = {"load_average_1min_at_end": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(), "default_threads": default_threads, "platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"config": args.config, "batch_size": args.batch_size, "size": args.size, "steps": args.steps}
    (out / "threads_on_a_shared_cpu.json").write_text(json.dumps({"machine": machine, "setup": setup, "load_average_1min_before": load_before, "rows": rows}, indent=2) + "\n")
    lines = [
        "# One VAE training step: PyTorch's default threads against fewer, on an idle and on a shared CPU",
        "",
        f"`{args.config}` VAE, batch {args.batch_size}, {args.size} px, median of {args.steps} steps; the other job multiplies "
        f"matrices with default threads. {machine['cpu_count']} cores, default {default_threads} threads, torch {machine['torch']}; "
        f"1-minute load average before the run {load_before} (work of other programs: the 'none' rows are only as idle as that).",
        "",
        "| other job | threads | s per step | × idle, default threads |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {'running' if r['other_job'] else 'none'} | {r['threads']} | {r['median_s']:.3f} | {r['ratio_to_idle_default']:.2f} |" for r in rows]
    (out / "threads_on_a_shared_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
