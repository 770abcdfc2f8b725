"""Installing what the module needs, on first use and only after the user agrees (never at import)."""

from __future__ import annotations

import importlib
import importlib.util
import os
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


#: calid's environment variable for extra model folders (calid.models.registry.MODEL_DIR_ENV; spelled
#: out here because this file must import without calid).
MODEL_DIR_ENV = "CALID_MODEL_DIR"


def bundled_models() -> Path | None:
    """The shipped models: ``Resources/Models`` of a checkout, or ``CaLIDModels`` installed beside this library."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "Resources" / "Models", here.parents[1] / "CaLIDModels"):
        if (candidate / "registry.json").is_file():
            return candidate
    return None


def register_bundled_models() -> Path | None:
    """Let calid find the shipped models, in Slicer's process and in the worker processes
    (which inherit the environment): a pip-installed calid does not know where the
    extension put them. Folders the user set come first. Returns the folder added."""
    folder = bundled_models()
    if folder is None:
        return None
    entries = [entry for entry in os.environ.get(MODEL_DIR_ENV, "").split(os.pathsep) if entry.strip()]
    if str(folder) not in entries:
        os.environ[MODEL_DIR_ENV] = os.pathsep.join([*entries, str(folder)])
    return folder


def install(confirm: bool = True) -> bool:
    """Install PyTorch (through the PyTorch extension, which picks the right CUDA build) and calid.

    Returns False when the user declines; raises RuntimeError, naming what is still
    missing, when an installation fails. Runs inside Slicer only.
    """
    import slicer

    missing = missing_packages()
    if not missing:
        return True
    core = bundled_core()
    if "calid" in missing and core is None:
        # Never fall back to a package of the same name from an index: it could be anything.
        raise RuntimeError("the calid package that ships with this extension is missing (CaLIDCore); reinstall the CaLID extension")
    if confirm and not slicer.util.confirmOkCancelDisplay(
        "CaLID needs these Python packages, which are not installed yet: " + ", ".join(missing)
        + ".\nInstall them now? This downloads several hundred MB once and can take a few minutes.",
        "CaLID: install dependencies",
    ):
        return False
    with slicer.util.WaitCursor():
        if "torch" in missing:
            try:
                import PyTorchUtils  # the PyTorch extension

                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    raise RuntimeError("PyTorch could not be installed by the PyTorch extension")
            except ImportError:
                slicer.util.pip_install("torch")
        if core is not None:
            slicer.util.pip_install(str(core))  # calid with its own requirements (MONAI, ...)
        elif "monai" in missing:  # calid itself is installed (e.g. by hand), only MONAI is not
            slicer.util.pip_install("monai")
    importlib.invalidate_caches()  # find_spec must see what pip has just added
    still_missing = missing_packages()
    if still_missing:
        raise RuntimeError("installation finished but these packages still cannot be imported: " + ", ".join(still_missing) + "; see the Python console for pip's messages")
    return True
