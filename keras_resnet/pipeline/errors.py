"""Errors a user can cause, and the helpers that word them.

Every problem with what was asked for (an argument, a path, the data, a run folder) is a
:class:`UserError` whose message is one sentence naming the function argument and the fix.
The command-line tools catch it and print ``error: <message>`` instead of a stack trace,
after mapping argument names to their flags (:func:`as_flags`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "UserError", "DataError", "RunDirError", "RunLocked", "ResumeMismatch", "TrainingStopped",
    "WriteError", "Interrupted",
    "QuantizeError", "ExportError", "MetadataError", "first_line", "choose",
    "at_least", "positive", "fraction", "as_flags",
]


class UserError(ValueError):
    """A problem with what was asked for, said in one sentence with the fix."""


class DataError(UserError):
    """Missing, empty or unreadable data, or a split the dataset does not have."""


class RunDirError(UserError):
    """A run folder that is missing, incomplete or holds another run."""


class RunLocked(RunDirError):
    """Another live process is writing the run folder."""


class ResumeMismatch(RunDirError):
    """A resumed run was asked for with options other than those it was started with."""


class TrainingStopped(UserError):
    """Training stopped because the loss stopped being finite."""


class WriteError(UserError):
    """A file could not be written: the disk is full or read-only, or permission is
    denied. Nothing half-written is left behind."""


class Interrupted(UserError):
    """Training was stopped by a signal (SIGTERM, SIGINT) after writing a checkpoint.

    Attributes:
        status: the exit status a tool ends with (128 + the signal number).
    """

    def __init__(self, message: str, *, status: int):
        super().__init__(message)
        self.status = status


class QuantizeError(UserError):
    """A run, architecture or data that cannot be quantized."""


class ExportError(UserError):
    """A conversion request or exported file that cannot be used."""


class MetadataError(ExportError):
    """TFLite metadata that cannot be written or read (labels, normalisation)."""


def first_line(error: BaseException, *, limit: int = 300) -> str:
    """The most useful line of an exception's message, shortened to ``limit`` characters.

    Converter errors start with a location line; a line that says ``error:`` or
    ``not supported`` is preferred over it.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    useful = [line for line in lines if "error:" in line or "not supported" in line]
    line = (useful or lines or [type(error).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def choose(name: str, value, valid: Iterable, *, error: type[UserError] = UserError):
    """Returns ``value`` when it is one of ``valid``; raises naming the valid values."""
    valid = tuple(valid)
    if value not in valid:
        raise error(f"{name}={value!r} is not valid; choose one of "
                    f"{', '.join(str(v) for v in valid)}")
    return value


def at_least(error: type[UserError] = UserError, *, minimum: float = 1, **values) -> None:
    """Raises ``error`` for the first of ``values`` (name=value; None passes) below
    ``minimum``, e.g. "batch_size=0 must be at least 1"."""
    for name, value in values.items():
        if value is not None and not value >= minimum:
            raise error(f"{name}={value} must be at least {minimum:g}")


def positive(error: type[UserError] = UserError, **values) -> None:
    """Raises ``error`` for the first of ``values`` (name=value; None passes) that is not
    above 0, e.g. "learning_rate=-1 must be positive"."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise error(f"{name}={value} must be positive")


def fraction(name: str, value: float, error: type[UserError] = UserError) -> None:
    """Raises ``error`` unless ``0 <= value < 1``."""
    if not 0 <= value < 1:
        raise error(f"{name}={value} must be at least 0 and below 1")


def as_flags(message: str, names: Iterable[str]) -> str:
    """Rewrites argument mentions in a library message as command-line flags.

    ``name=True`` becomes ``--name``, ``name=`` becomes ``--name=``, and a bare name with
    an underscore (``model_dir``; plain words are left alone) becomes ``--name``.
    """
    for name in sorted(set(names), key=len, reverse=True):
        word = rf"(?<![-\w.]){re.escape(name)}"
        message = re.sub(word + r"=True\b", f"--{name}", message)
        message = re.sub(word + "=", f"--{name}=", message)
        if "_" in name:
            message = re.sub(word + r"(?![\w=])", f"--{name}", message)
    return message
