"""Named models: where the shipped (and user-installed) model files are, and checking them.

A model folder holds model files (safetensors, see :mod:`calid.models.checkpoint`),
their model cards and a ``registry.json``::

    {"models": [{"name": "calid-acdc-small", "file": "calid-acdc-small.safetensors",
                 "sha256": "…", "card": "calid-acdc-small.md", "default": true,
                 "description": "…"}]}

Folders are searched in this order: ``$CALID_MODEL_DIR`` (several separated by
the path separator), the user's ``~/.local/share/calid/models`` (where ``calid
install`` puts models), then the shipped models: the ``Resources/Models``
folder of the source tree that this package sits in and ``$CALID_SHIPPED_MODEL_DIR``
(set by the Slicer extension). The first entry of a name, and the first
default of a kind, win: a model the user installed (or made the default)
takes precedence over a shipped one. Every file is checked against its sha256
before it is loaded, so a damaged download never runs silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calid.errors import InputError

MODEL_DIR_ENV = "CALID_MODEL_DIR"
#: Folders of shipped models (the Slicer extension's), searched after the user's own.
SHIPPED_MODEL_DIR_ENV = "CALID_SHIPPED_MODEL_DIR"
REGISTRY_FILE = "registry.json"
#: A randomly initialised model of a named configuration, for tests and for trying the pipeline.
UNTRAINED_PREFIX = "untrained:"


@dataclass(frozen=True)
class RegisteredModel:
    """One entry of a model folder's registry."""

    name: str
    path: Path
    sha256: str
    description: str = ""
    card: Path | None = None
    default: bool = False
    kind: str = "calid"  # or "segmentation"


def user_model_folder() -> Path:
    """Where ``calid install`` puts models by default: ``$XDG_DATA_HOME/calid/models``."""
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "calid" / "models"


def model_folders() -> list[Path]:
    """The folders searched for named models, in order (existing ones only)."""
    def from_environment(variable: str) -> list[Path]:
        return [Path(entry).expanduser() for entry in os.environ.get(variable, "").split(os.pathsep) if entry.strip()]

    package_root = Path(__file__).resolve().parents[3]  # <root>/CaLIDCore/calid/models/registry.py
    folders = [*from_environment(MODEL_DIR_ENV), user_model_folder(), package_root / "Resources" / "Models", *from_environment(SHIPPED_MODEL_DIR_ENV)]
    unique: list[Path] = []
    for folder in folders:
        if folder.is_dir() and folder.resolve() not in [f.resolve() for f in unique]:
            unique.append(folder)
    return unique


def _read_registry(folder: Path) -> list[RegisteredModel]:
    path = folder / REGISTRY_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["models"]
        return [
            RegisteredModel(
                name=str(e["name"]),
                path=folder / str(e["file"]),
                sha256=str(e["sha256"]).lower(),
                description=str(e.get("description", "")),
                card=folder / str(e["card"]) if e.get("card") else None,
                default=bool(e.get("default", False)),
                kind=str(e.get("kind", "calid")),
            )
            for e in entries
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(path, f"is not a valid model registry ({error})") from error


def registered_models() -> list[RegisteredModel]:
    """Every named model found, first occurrence of each name only."""
    seen: dict[str, RegisteredModel] = {}
    for folder in model_folders():
        for model in _read_registry(folder):
            seen.setdefault(model.name, model)
    return list(seen.values())


def default_model(kind: str = "calid") -> RegisteredModel | None:
    """The model of a kind used when none is named, if any is installed: the first entry marked
    default in folder order, found by its name (so a model installed under a shipped default's
    name, in an earlier folder, is the one that runs)."""
    for folder in model_folders():
        for model in _read_registry(folder):
            if model.default and model.kind == kind:
                return next(m for m in registered_models() if m.name == model.name)
    return None


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(model: RegisteredModel) -> Path:
    """The model's file, after checking that it exists and matches its sha256."""
    if not model.path.is_file():
        raise InputError(model.path, f"model {model.name!r} is registered but its file is missing; reinstall it")
    actual = sha256_of(model.path)
    if actual != model.sha256:
        raise InputError(model.path, f"model {model.name!r} is damaged: sha256 {actual[:12]}… instead of {model.sha256[:12]}…; reinstall it")
    return model.path


def resolve_model(name_or_path: str | os.PathLike[str] | None, kind: str = "calid") -> Path:
    """A model file from a path, a registered name, or (None) the default model of ``kind``."""
    if name_or_path is None:
        model = default_model(kind)
        if model is None and kind == "segmentation":
            raise InputError(
                "--model",
                "no segmentation model is installed; pass one (calid train seg writes best.safetensors), or, for the one that ships with "
                f"CaLID, set {SHIPPED_MODEL_DIR_ENV} to the repository's Resources/Models folder (an install not made with pip install -e)",
            )
        if model is None:
            raise InputError(
                "--model",
                "no trained CaLID model is installed; pass a model file (calid train … writes model.safetensors), use a method "
                "that needs none (registration or linear: --mode of calid upsample and of the batch script, the Slicer panel's method, "
                f"--methods of calid evaluate, load_pipeline('registration') in Python), or '{UNTRAINED_PREFIX}tiny' to try the pipeline with an untrained network",
            )
        return verify(model)
    text = os.fspath(name_or_path)
    for model in registered_models():
        if model.name == text:
            return verify(model)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    others = ", ".join(f"{m.name} ({m.kind})" for m in registered_models() if m.kind != kind)
    names = ", ".join(m.name for m in registered_models() if m.kind == kind) or ("none installed" + (f"; other models: {others}" if others else ""))
    kind_text = "segmentation" if kind == "segmentation" else "CaLID"
    if path.is_dir():
        inside = ", ".join(p.name for p in sorted(path.glob("*.safetensors"))[:4])
        raise InputError(text, f"is a folder; give the model file in it ({inside or 'calid train writes best.safetensors and model.safetensors'})")
    if path.suffix.lower() in (".safetensors", ".pt", ".pth", ".ckpt") or os.sep in text or "/" in text:
        # Written as a path: say that the file is missing, not that the name is unknown.
        where = f" (no such file in {path.parent.resolve()})" if path.parent.is_dir() else f" (the folder {path.parent} does not exist)"
        raise InputError(text, f"model file not found{where}; installed {kind_text} models: {names}")
    raise InputError(text, f"is neither a model file nor a known {kind_text} model name (known: {names})")


#: Fields of a training run's description that hold paths of the training machine.
_PATH_FIELDS = ("inputs", "files", "data", "out_dir", "vae_model", "cache_dir", "lpips_weights", "init_from")


def _without_folders(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with every path of :data:`_PATH_FIELDS` (in it and in its nested dicts) cut to its file or folder name."""

    def name_of(value: Any) -> Any:
        if isinstance(value, str) and value:
            return Path(value).name or value
        if isinstance(value, list):
            return [name_of(v) for v in value]
        return value

    cleaned: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, dict):
            cleaned[key] = _without_folders(value)
        elif key in _PATH_FIELDS:
            cleaned[key] = name_of(value)
        else:
            cleaned[key] = value
    return cleaned


def install_model(
    source: str | os.PathLike[str],
    name: str,
    folder: str | os.PathLike[str] | None = None,
    description: str = "",
    default: bool = False,
    half_precision: bool = True,
    card: str | os.PathLike[str] | None = None,
    default_steps: int | None = None,
    info: dict[str, Any] | None = None,
) -> RegisteredModel:
    """Copy a model file into a model folder under ``name`` and register it (sha256, card, default).

    Floating-point weights are stored as float16 by default (half the size; they
    are converted back to float32 when loaded). A JSON copy of the file's
    description is written beside it. ``folder`` defaults to the user's model
    folder (``~/.local/share/calid/models``). ``default_steps`` sets the DDIM
    steps the engine uses when a caller gives none (a CaLID model's validated count).
    ``info`` adds fields to the file's description (hardware, training time, data
    licence, the command that reproduces it). Paths of the training machine recorded
    by ``calid train`` (data folders, output and VAE files) are cut to their last
    component, so a shared model does not disclose the trainer's folder layout.
    """
    import shutil

    from safetensors.torch import save_file

    from calid.atomic import atomic_path
    from calid.models.checkpoint import read_raw_header, read_weights

    source = Path(source)
    if not name or any(c in name for c in "/\\:;") or name.startswith(UNTRAINED_PREFIX.rstrip(":")):
        raise InputError("--name", f"{name!r} cannot name a model (no slashes, colons or 'untrained')")
    if card is not None and not Path(card).is_file():  # checked before anything is replaced: a failed install keeps the installed model
        raise InputError(card, "the model card (--card) was not found")
    header = read_raw_header(source)
    tensors = read_weights(source)
    kind = "segmentation" if header.get("kind") == "segmentation" else "calid"
    if default_steps is not None:
        from calid.models.config import ModelConfig

        if kind != "calid":
            raise InputError("--default-steps", f"{source} is a {kind} model; DDIM steps apply to CaLID models only")
        try:
            header["config"] = ModelConfig.from_dict({**header["config"], "default_steps": default_steps}).to_dict()
        except ValueError as error:
            raise InputError("--default-steps", str(error)) from None
    header["info"] = _without_folders({**header.get("info", {}), **(info or {})})
    if half_precision:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        header["info"]["stored_as"] = "float16"
    target_folder = Path(folder) if folder is not None else user_model_folder()
    target_folder.mkdir(parents=True, exist_ok=True)
    target = target_folder / f"{name}.safetensors"
    with atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"calid": json.dumps(header)})
    with atomic_path(target_folder / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    card_name = None
    if card is not None:
        card_name = f"{name}.md"
        if Path(card).resolve() != (target_folder / card_name).resolve():
            shutil.copyfile(card, target_folder / card_name)
    registry_path = target_folder / REGISTRY_FILE
    entries = json.loads(registry_path.read_text(encoding="utf-8"))["models"] if registry_path.is_file() else []
    entries = [e for e in entries if e.get("name") != name]
    if default:
        for entry in entries:
            if entry.get("kind", "calid") == kind:
                entry["default"] = False
    entry = {"name": name, "file": target.name, "sha256": sha256_of(target), "kind": kind, "default": default, "description": description}
    if card_name:
        entry["card"] = card_name
    entries.append(entry)
    with atomic_path(registry_path) as tmp:
        tmp.write_text(json.dumps({"models": entries}, indent=2) + "\n", encoding="utf-8")
    return next(m for m in _read_registry(target_folder) if m.name == name)
