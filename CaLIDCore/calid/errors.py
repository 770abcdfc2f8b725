"""Exceptions with messages a clinician can act on: they name the file and the problem."""

from __future__ import annotations

import os


class CalidError(Exception):
    """Base class of every error CaLID raises on purpose."""


class InputError(CalidError, ValueError):
    """An input (file, folder, array) that cannot be used, and why.

    ``str(error)`` reads ``"<source>: <problem>"`` so that a command-line tool can
    print it as it is.
    """

    def __init__(self, source: str | os.PathLike[str], problem: str) -> None:
        self.source = os.fspath(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class OutputError(CalidError, ValueError):
    """An output that cannot be written as asked (nothing has been written)."""

    def __init__(self, target: str | os.PathLike[str], problem: str) -> None:
        self.target = os.fspath(target)
        self.problem = problem
        super().__init__(f"{self.target}: {problem}")


class Cancelled(CalidError):
    """The user (a cancel callback, Ctrl-C, the Cancel button) stopped the work; nothing was written."""


class TrainingDiverged(CalidError):
    """Training produced non-finite gradients step after step; the last checkpoint is intact."""
