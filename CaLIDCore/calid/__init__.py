"""CaLID: dense 3D / 3D+T cardiac volumes from sparse short-axis cine MRI by latent interpolation diffusion."""

from typing import Any

from calid.data import CineStack, read_stack, write_stack
from calid.errors import CalidError, InputError, OutputError

__version__ = "0.1.0"

__all__ = ["CalidError", "CineStack", "InputError", "OutputError", "__version__", "load_pipeline", "read_stack", "write_stack"]


def __getattr__(name: str) -> Any:
    # The engine imports torch and MONAI (seconds): load it only when asked for.
    if name == "load_pipeline":
        from calid.inference.pipeline import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'calid' has no attribute {name!r}")
