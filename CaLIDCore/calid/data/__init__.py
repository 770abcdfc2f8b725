"""Data layer: the `CineStack`, file formats, preprocessing, the phantom and training datasets."""

from calid.data.io import read_stack, write_stack
from calid.data.stack import CineStack

__all__ = ["CineStack", "read_stack", "write_stack"]
