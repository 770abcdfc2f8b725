"""Installing what the module needs, on first use and only after the user agrees (never at import)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: Python packages the module needs, by import name.
REQUIRED = ("torch", "monai", "calid")


def missing_packages() -> list[str]:
    """Import names of the required packages that are not installed."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def bundled_core() -> Path | None:
    """The CaLIDCore source folder shipped with the extension (or beside this file in a checkout)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "CaLIDCore", here.parents[1] / "CaLIDCore"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def install(confirm: bool = True) -> bool:
    """Install PyTorch (through the PyTorch extension, which picks the right CUDA build) and calid.

    Returns False when the user declines. Runs inside Slicer only.
    """
    import slicer

    missing = missing_packages()
    if not missing:
        return True
    if confirm and not slicer.util.confirmOkCancelDisplay(
        "CaLID needs these Python packages, which are not installed yet: " + ", ".join(missing)
        + ".\nInstall them now? This downloads several hundred MB once.",
        "CaLID: install dependencies",
    ):
        return False
    if "torch" in missing:
        try:
            import PyTorchUtils  # the PyTorch extension

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                raise RuntimeError("PyTorch could not be installed")
        except ImportError:
            slicer.util.pip_install("torch")
    core = bundled_core()
    slicer.util.pip_install(str(core) if core is not None else "calid")
    return not missing_packages()
