"""Running the upsampling in a separate process: the command line, and reading its progress lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from CaLIDSlicerLib.logic import UpsamplingOptions


def python_executable() -> str:
    """Slicer's Python launcher when running in Slicer (PythonSlicer), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def upsample_command(
    input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], options: UpsamplingOptions, stop_file: str | os.PathLike[str] | None = None
) -> list[str]:
    """``calid upsample`` with machine-readable progress, for ``qt.QProcess`` or ``subprocess``;
    creating ``stop_file`` cancels it."""
    command = [
        python_executable(), "-m", "calid", "upsample", os.fspath(input_path), os.fspath(output_path),
        "--factor", str(options.factor), "--mode", options.mode,
        "--seed", str(options.seed), "--device", options.device, "--progress", "json",
    ]
    if options.steps is not None:
        command += ["--steps", str(options.steps)]
    if options.centre_on_heart:
        command += ["--centre-on-heart"]
    if options.model:
        command += ["--model", options.model]
    if options.placeholder_spacing is not None and str(options.placeholder_spacing).strip().lower() != "model":
        command += ["--placeholder-spacing", str(options.placeholder_spacing)]
    if options.tta and options.mode in ("calid", "calid+"):
        command += ["--tta"]
    if options.frames and options.frames != "all":
        command += [f"--frames={options.frames}"]  # joined: a value like -2,-1 would read as an option
    if stop_file is not None:
        command += ["--stop-file", os.fspath(stop_file)]
    return command


def segment_command(
    input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], options: UpsamplingOptions, frames: str | None = None,
    stop_file: str | os.PathLike[str] | None = None,
) -> list[str]:
    """``calid segment`` with machine-readable progress: labels of ``input_path`` (the given frames,
    default all); creating ``stop_file`` cancels it."""
    command = [python_executable(), "-m", "calid", "segment", os.fspath(input_path), os.fspath(output_path), "--device", options.device, "--progress", "json"]
    if options.segmentation_model:
        command += ["--model", options.segmentation_model]
    if frames and frames != "all":
        command += [f"--frames={frames}"]
    if stop_file is not None:
        command += ["--stop-file", os.fspath(stop_file)]
    return command


def parse_progress(line: str) -> dict[str, Any] | None:
    """A progress update ``{"done", "total", "message"}`` from one output line, or None for other lines."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        update = json.loads(line)
    except json.JSONDecodeError:
        return None
    return update if {"done", "total", "message"} <= set(update) else None


def work_folder() -> Path:
    """A private temporary folder for the files exchanged with the worker process."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="calid-slicer-"))


def warnings_in(stderr: str) -> list[str]:
    """The warnings ``calid upsample`` wrote to its error output (untrained model, missing geometry, a label map), without
    their ``calid upsample: warning:`` prefix."""
    lines = (re.match(r"calid [\w-]+: warning: (.*)", line) for line in stderr.splitlines())
    return [line.group(1).strip() for line in lines if line]
