"""Training state for exact resumption, without pickle.

One safetensors file holds every tensor (module weights, optimiser moments,
random generator states) and one JSON header entry the rest (step, optimiser
hyper-parameters, LR schedule, grad scaler, Python and NumPy generator states,
configurations). Written atomically, so an interrupted save never destroys the
previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from calid.atomic import atomic_path
from calid.errors import InputError

FORMAT_NAME = "calid-training-state"


def _optimizer_split(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + ".state."):
            param_id, key = name[len(prefix) + 7 :].split(".", 1)
            state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(path: str | os.PathLike[str], modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], extra: dict[str, Any]) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    optimizer_meta = {}
    for name, optimizer in optimizers.items():
        optimizer_tensors, optimizer_meta[name] = _optimizer_split(optimizer, name)
        tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    numpy_state: Any = np.random.get_state()
    header = {
        "format": FORMAT_NAME,
        "optimizers": optimizer_meta,
        "rng_python": _jsonable(random.getstate()),
        "rng_numpy": [numpy_state[0], numpy_state[1].tolist(), int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "extra": extra,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"calid": json.dumps(header)})
    return path


def load_training_state(
    path: str | os.PathLike[str],
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Restore modules, optimisers and random generators in place; returns the ``extra`` dict.

    Tensors are read on the CPU; ``load_state_dict`` moves them to each module's
    and optimiser's device."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})["calid"])
        tensors = load_file(str(path), device="cpu")
    except Exception as error:
        raise InputError(path, f"is not a readable training checkpoint ({error})") from error
    if header.get("format") != FORMAT_NAME:
        raise InputError(path, "is not a CaLID training checkpoint")
    for name, module in modules.items():
        prefix = name + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state)
        except RuntimeError as error:
            raise InputError(path, f"the saved '{name}' weights do not fit this run's network ({str(error).splitlines()[0]})") from error
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(_optimizer_join(tensors, header["optimizers"][name], name))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    version, internal, gauss = header["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = header["rng_numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return dict(header["extra"])


def read_training_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``extra`` dict of a checkpoint (step, configurations, ...) without loading its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})["calid"])
    except Exception as error:
        raise InputError(path, f"is not a readable training checkpoint ({error})") from error
    if header.get("format") != FORMAT_NAME:
        raise InputError(path, "is not a CaLID training checkpoint")
    return dict(header["extra"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
