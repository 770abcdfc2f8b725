"""Installing what the module needs, on first use and only after the user agrees (never at import)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

#: Python packages the module needs, by import name.
REQUIRED = ("torch", "monai", "calid")

#: Import names of calid's requirements where they differ from the distribution's name.
IMPORT_NAMES = {"pynrrd": "nrrd"}
#: Requirements installed without their own: calid uses only lpips' weight files, and lpips asks
#: for torchvision, whose wheel pins a torch build that would replace the PyTorch extension's.
WITHOUT_THEIR_REQUIREMENTS = ("lpips",)
#: Set once calid was replaced while its old modules were loaded: they stay loaded until Slicer restarts.
_restart_needed = False


def missing_packages() -> list[str]:
    """Import names of the required packages that are not installed."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def distribution_name(specifier: str) -> str:
    """``"SimpleITK>=2.3"`` -> ``"SimpleITK"``."""
    return re.split(r"[<>=!~ ;\[]", specifier.strip(), maxsplit=1)[0]


def core_requirements(core: Path) -> dict[str, str]:
    """calid's requirements (pip specifiers, by import name), from the bundled core's pyproject.toml."""
    import tomllib

    specifiers = tomllib.loads((core / "pyproject.toml").read_text())["project"]["dependencies"]
    return {IMPORT_NAMES.get(distribution_name(spec), distribution_name(spec)): spec for spec in specifiers}


def missing_requirements(core: Path) -> list[str]:
    """The pip specifiers of calid's requirements that cannot be imported here, torch aside.

    Only these are installed: Slicer's own builds of VTK, SimpleITK, pydicom, numpy and
    scipy must stay as they are (a PyPI VTK or pydicom 3 beside them breaks Slicer's own
    modules, e.g. its DICOM cine import), and calid works with them.
    """
    return [spec for name, spec in core_requirements(core).items() if name != "torch" and importlib.util.find_spec(name) is None]


def _package_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def installed_core_is_outdated(core: Path | None = None) -> bool:
    """Whether the calid installed in this Python differs from the one shipped with the extension
    (the extension was updated; the old calid would keep running under the new panel)."""
    core = core or bundled_core()
    spec = importlib.util.find_spec("calid")
    if core is None or spec is None or not spec.submodule_search_locations:
        return False
    installed = Path(next(iter(spec.submodule_search_locations)))
    return _package_digest(installed) != _package_digest(core / "calid")


def bundled_core() -> Path | None:
    """The CaLIDCore source folder shipped with the extension (or beside this file in a checkout)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "CaLIDCore", here.parents[1] / "CaLIDCore"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


#: calid's environment variable for the folders of shipped models, searched after the user's own
#: (calid.models.registry.SHIPPED_MODEL_DIR_ENV; spelled out here because this file must import without calid).
SHIPPED_MODEL_DIR_ENV = "CALID_SHIPPED_MODEL_DIR"


def bundled_models() -> Path | None:
    """The shipped models: ``Resources/Models`` of a checkout, or ``CaLIDModels`` installed beside this library."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "Resources" / "Models", here.parents[1] / "CaLIDModels"):
        if (candidate / "registry.json").is_file():
            return candidate
    return None


def _has_default_interpolation_model(folder: Path) -> bool:
    import json

    try:
        entries = json.loads((folder / "registry.json").read_text()).get("models", [])
    except (OSError, ValueError, AttributeError):
        return False
    return any(isinstance(entry, dict) and entry.get("kind", "calid") == "calid" and entry.get("default") for entry in entries)


def interpolation_model_installed() -> bool:
    """Whether a default CaLID (interpolation) model is there: shipped with the extension, or installed
    by the user (``calid install --default``, or a folder in $CALID_MODEL_DIR). Read from the model
    registries without calid, so that the panel's default method works before any installation."""
    user_folders = [Path(entry).expanduser() for entry in os.environ.get("CALID_MODEL_DIR", "").split(os.pathsep) if entry.strip()]
    user_folders.append(Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "calid" / "models")  # calid install's folder
    shipped = bundled_models()
    return any(_has_default_interpolation_model(folder) for folder in [*user_folders, *([shipped] if shipped else [])])


def register_bundled_models() -> Path | None:
    """Let calid find the shipped models, in Slicer's process and in the worker processes
    (which inherit the environment): a pip-installed calid does not know where the
    extension put them. calid searches them after the user's own folders (a model the
    user installed, or made the default, wins). Returns the folder added."""
    folder = bundled_models()
    if folder is None:
        return None
    entries = [entry for entry in os.environ.get(SHIPPED_MODEL_DIR_ENV, "").split(os.pathsep) if entry.strip()]
    if str(folder) not in entries:
        os.environ[SHIPPED_MODEL_DIR_ENV] = os.pathsep.join([*entries, str(folder)])
    return folder


def install(confirm: bool = True) -> bool:
    """Install PyTorch (through the PyTorch extension, which picks the right CUDA build) and calid.

    Returns False when the user declines; raises RuntimeError, naming what is still
    missing, when an installation fails. Runs inside Slicer only.
    """
    import slicer

    global _restart_needed
    if _restart_needed:
        raise RuntimeError("calid was updated to this extension's version; restart Slicer to use it")
    core = bundled_core()
    missing = missing_packages()
    outdated = "calid" not in missing and installed_core_is_outdated(core)
    requirements = missing_requirements(core) if core is not None else []
    if not missing and not outdated and not requirements:
        return True
    if "calid" in missing and core is None:
        # Never fall back to a package of the same name from an index: it could be anything.
        raise RuntimeError("the calid package that ships with this extension is missing (CaLIDCore); reinstall the CaLID extension")
    lines = []
    if missing or requirements:
        names = dict.fromkeys([*missing, *map(distribution_name, requirements)])
        lines.append("CaLID needs these Python packages, which are not installed yet: " + ", ".join(names) + ".")
    if outdated:
        lines.append("The installed calid package differs from this version of the extension and will be replaced.")
    message = "\n".join(lines)
    if confirm and not slicer.util.confirmOkCancelDisplay(
        message + "\nInstall now? The first installation downloads several hundred MB and can take a few minutes.",
        "CaLID: install dependencies",
    ):
        return False
    replacing_loaded_core = outdated and "calid" in sys.modules
    with slicer.util.WaitCursor():
        if "torch" in missing:
            try:
                import PyTorchUtils  # the PyTorch extension

                # The same lower bound as calid's (">=2.4"): an older build would not run it.
                torch_spec = core_requirements(core).get("torch", "torch") if core is not None else "torch"
                version = torch_spec[len(distribution_name(torch_spec)):].strip() or None
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=version) is None:
                    raise RuntimeError("PyTorch could not be installed by the PyTorch extension")
            except ImportError:
                slicer.util.pip_install("torch")
        if core is not None:
            # Only what is missing (never a second VTK, SimpleITK or pydicom beside Slicer's), then calid
            # itself without its requirements. Arguments as a list: a string would be split by shlex,
            # which drops the backslashes of a Windows path.
            alone = [spec for spec in requirements if distribution_name(spec) in WITHOUT_THEIR_REQUIREMENTS]
            if len(alone) < len(requirements):
                slicer.util.pip_install([spec for spec in requirements if spec not in alone])
            if alone:
                slicer.util.pip_install(["--no-deps", *alone])
            slicer.util.pip_install(["--no-deps", "--force-reinstall", str(core)])
        elif "monai" in missing:  # calid itself is installed (e.g. by hand), only MONAI is not
            slicer.util.pip_install(["monai"])
    importlib.invalidate_caches()  # find_spec must see what pip has just added
    if replacing_loaded_core:
        # This process has the old modules loaded; mixing them with the new files would fail in odd ways.
        _restart_needed = True
        raise RuntimeError("calid was updated to this extension's version; restart Slicer to use it")
    still_missing = missing_packages()
    if still_missing:
        raise RuntimeError("installation finished but these packages still cannot be imported: " + ", ".join(still_missing) + "; see the Python console for pip's messages")
    return True


def cuda_devices() -> list[tuple[int, str]]:
    """The GPUs for the Device choice, as ``(index, name)``, without loading PyTorch into Slicer's
    process when it is not loaded yet (that takes seconds and starts CUDA there, though only the
    worker processes run networks): ``nvidia-smi`` lists them then. [] without an NVIDIA GPU."""
    if "torch" in sys.modules:
        try:
            import torch

            return [(i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
        except Exception:  # a broken driver: the CPU still works
            return []
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "--query-gpu=index,name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    devices = []
    for line in listed.stdout.splitlines() if listed.returncode == 0 else []:
        index, _, name = line.partition(",")
        if index.strip().isdigit():
            devices.append((int(index), name.strip()))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # PyTorch numbers the visible GPUs from 0, in the order given
        order = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        names = dict(devices)
        devices = [(i, names[k]) for i, k in enumerate(order) if k in names]
    return devices
