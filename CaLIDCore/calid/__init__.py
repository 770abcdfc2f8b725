"""CaLID: dense 3D / 3D+T cardiac volumes from sparse short-axis cine MRI by latent interpolation diffusion."""

from calid.data import CineStack, read_stack, write_stack
from calid.errors import CalidError, InputError, OutputError

__version__ = "0.1.0"

__all__ = ["CalidError", "CineStack", "InputError", "OutputError", "__version__", "read_stack", "write_stack"]
