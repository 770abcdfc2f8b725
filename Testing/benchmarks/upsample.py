"""Whole-stack upsampling speed and peak memory of the engine: factors, modes, DDIM steps, batching.

For every factor (2, 4, 8), mode (calid, calid+) and number of DDIM steps
(4, 8, 16) the engine upsamples a synthetic cine phantom (10 slices, 10 mm
apart, 128 x 128 pixels of 1.5 mm) through :meth:`UpsamplingPipeline.upsample`
with automatic batching, and, at 8 steps, once more with ``batch_size=1``:
the per-slice loop that an unbatched implementation would run. Speed does not
depend on the weights, so the network is the named configuration with random
weights (``untrained:small`` by default, the size of the shipped model).

Reported: seconds, generated slices per second, peak additional memory (CPU:
resident set size sampled every 5 ms; GPU: peak allocated CUDA memory), the
ratio calid+ / calid at the same factor and steps, and the speed-up of
batching over the per-slice loop.

    python Testing/benchmarks/upsample.py --out bench-results [--device cuda] [--config small] [--frames 1]

Writes upsample.json, upsample.md and upsample.png in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import torch

import calid
from calid.data.phantom import PhantomConfig, make_phantom
from calid.device import describe_device


def _release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc), so that RSS starts from the live data."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator statistics, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def measure(pipeline: Any, stack: Any, factor: int, mode: str, steps: int, batch_size: int | str) -> dict[str, Any]:
    with PeakMemory(pipeline.device) as memory:
        started = time.perf_counter()
        dense = pipeline.upsample(stack, factor, mode=mode, steps=steps, seed=0, batch_size=batch_size)
        seconds = time.perf_counter() - started
    generated = stack.n_frames * (stack.n_slices - 1) * (factor - 1)
    return {
        "factor": factor,
        "mode": mode,
        "steps": steps,
        "batch_size": dense.metadata["upsampling"]["batch_size"],
        "unbatched": batch_size == 1,
        "generated_slices": generated,
        "seconds": round(seconds, 3),
        "slices_per_second": round(generated / seconds, 3),
        "peak_extra_memory_mib": round(memory.extra_mib, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--config", default="small", help="tiny, small or paper (random weights: speed only)")
    parser.add_argument("--frames", type=int, default=1, help="frames of the phantom cine (default 1; 20-30 for a whole cine on a GPU)")
    parser.add_argument("--factors", default="2,4,8")
    parser.add_argument("--steps", default="4,8,16")
    parser.add_argument("--modes", default="calid,calid+")
    parser.add_argument("--unbatched-steps", type=int, default=8, help="steps at which the per-slice loop is also timed (0: never)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = calid.load_pipeline(f"untrained:{args.config}", device=args.device)
    stack = make_phantom(0, PhantomConfig(n_frames=args.frames, matrix=128, pixel_spacing_mm=1.5, n_slices=10)).sparse
    pipeline.upsample(stack.select_frames([0]), 2, mode="calid", steps=1)  # warm-up (kernels, allocator)
    rows: list[dict[str, Any]] = []
    for factor in (int(f) for f in args.factors.split(",")):
        for mode in args.modes.split(","):
            for steps in (int(s) for s in args.steps.split(",")):
                rows.append(measure(pipeline, stack, factor, mode, steps, "auto"))
                print(json.dumps(rows[-1]), flush=True)
                if steps == args.unbatched_steps:
                    rows.append(measure(pipeline, stack, factor, mode, steps, 1))
                    print(json.dumps(rows[-1]), flush=True)

    def find(factor: int, mode: str, steps: int, unbatched: bool = False) -> dict[str, Any] | None:
        return next((r for r in rows if (r["factor"], r["mode"], r["steps"], r["unbatched"]) == (factor, mode, steps, unbatched)), None)

    for row in rows:
        plain = find(row["factor"], "calid", row["steps"], row["unbatched"])
        if row["mode"] == "calid+" and plain:
            row["time_ratio_to_calid"] = round(row["seconds"] / plain["seconds"], 2)
        if not row["unbatched"]:
            loop = find(row["factor"], row["mode"], row["steps"], True)
            if loop:
                row["speedup_over_per_slice_loop"] = round(loop["seconds"] / row["seconds"], 2)
    result = {
        "benchmark": "whole-stack upsampling",
        "calid_version": calid.__version__,
        "torch": torch.__version__,
        "device": describe_device(pipeline.device),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "model": f"untrained:{args.config} (speed does not depend on the weights)",
        "input": f"phantom: {stack.n_frames} frame(s) x {stack.n_slices} slices of {stack.shape[3]} x {stack.shape[2]} px",
        "inversion_fixed_point_iterations": pipeline.inversion_iterations,
        "rows": rows,
    }
    (out / "upsample.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        "# Upsampling speed and memory",
        "",
        f"{result['device']}, {result['machine']}, torch {result['torch']}; model {result['model']}; input {result['input']}.",
        f"CaLID+ inverts both neighbours with {pipeline.inversion_iterations} fixed-point iterations per step.",
        "",
        "| factor | mode | steps | batch | new slices | seconds | slices/s | peak extra MiB | calid+ / calid time | batched speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| x{r['factor']} | {r['mode']} | {r['steps']} | {r['batch_size']}{' (per-slice loop)' if r['unbatched'] else ''} | {r['generated_slices']} | "
            f"{r['seconds']:.2f} | {r['slices_per_second']:.2f} | {r['peak_extra_memory_mib']:.0f} | {r.get('time_ratio_to_calid', '')} | {r.get('speedup_over_per_slice_loop', '')} |"
        )
    lines += ["", "Command: `python Testing/benchmarks/upsample.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out") + "`", ""]
    (out / "upsample.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for mode in args.modes.split(","):
        for factor in (int(f) for f in args.factors.split(",")):
            points = [(r["steps"], r["slices_per_second"]) for r in rows if r["mode"] == mode and r["factor"] == factor and not r["unbatched"]]
            axis.plot(*zip(*points), marker="o", linestyle="-" if mode == "calid" else "--", label=f"{mode} x{factor}")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("DDIM steps")
    axis.set_ylabel("generated slices per second")
    axis.set_title(f"Upsampling speed, {result['device']}", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "upsample.png", dpi=120)
    print(f"wrote {out / 'upsample.json'}, {out / 'upsample.md'}, {out / 'upsample.png'}")


if __name__ == "__main__":
    main()
