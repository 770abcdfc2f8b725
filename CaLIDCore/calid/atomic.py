"""Atomic outputs: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from calid.errors import OutputError


def missing_folder(target: str | os.PathLike[str], parent: Path) -> OutputError:
    """The error for an output whose folder is missing, or is a file (``dense.nii.gz/out.nrrd``)."""
    if parent.exists():
        return OutputError(target, f"{parent} is a file, not a folder: the output cannot be written inside it")
    return OutputError(target, f"the folder {parent} does not exist")


def _compound_suffix(path: Path) -> str:
    """``.nii.gz`` / ``.seq.nrrd`` rather than ``.gz`` / ``.nrrd`` (writers pick the format by it)."""
    suffixes = [s.lower() for s in path.suffixes]  # libraries compare suffixes in lower case
    if len(suffixes) >= 2 and suffixes[-2] in {".nii", ".seq", ".tar"}:
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def _current_umask() -> int:
    umask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(umask)
    return umask


def _flush_to_disk(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    except OSError:  # file systems without fsync (some network shares): the rename is still atomic
        pass


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place when the block succeeds.

    The temporary name keeps the target's suffix so that libraries that choose
    the format (or the compression) from the file name write the right thing.
    On any error the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise missing_folder(target, parent)
    if target.is_dir():
        raise OutputError(target, "is a folder; give a file name")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{_compound_suffix(target)}", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    umask = _current_umask()
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        # Again: some writers (safetensors) replace the file and create it 0600.
        os.chmod(tmp, 0o666 & ~umask)
        _flush_to_disk(tmp)  # a power cut after the rename must not leave an empty file under the final name
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` when the block succeeds.

    ``target`` must not exist yet or be an empty folder: files of two different
    outputs are never mixed in one folder.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise missing_folder(target, parent)
    if target.exists():
        if not target.is_dir():
            raise OutputError(target, "exists and is not a folder")
        if any(target.iterdir()):
            raise OutputError(target, "the output folder exists and is not empty; choose a new folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it 0700; give the folder a plain mkdir's permissions
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
