"""Filtering the lines C++ libraries write straight to the process's stderr.

TensorFlow prints start-up notices while it loads ("Could not find cuda drivers", the
oneDNN notice) before its logging reads TF_CPP_MIN_LOG_LEVEL, and LiteRT prints "INFO:
Created TensorFlow Lite XNNPACK delegate for CPU." when it makes its first interpreter. Both
write to file descriptor 2, past Python's ``sys.stderr`` and ``logging``, so the only way
to keep them out of a tool's output is to point descriptor 2 elsewhere while the library
call runs and pass on the lines that are not noise.

:func:`plain_log_lines` does the same for Python's own log records: one plain line each
("warning: ..."), whatever format a library would set.

This module imports nothing from keras_resnet: tools/_cli.py loads it from its file before
the package (whose import loads TensorFlow) so both use this one helper.

Example:
    >>> with filtered_stderr(XNNPACK_NOTICE):
    ...     interpreter.allocate_tensors()
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# Printed by TFLite (inside LiteRT and MediaPipe) when the process's first interpreter gets
# its default CPU delegate: the runtime working as intended, which users read as a problem.
XNNPACK_NOTICE = re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$")


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern) -> Iterator[None]:
    """Drops the stderr lines matching ``noise`` that are written inside the block.

    Descriptor 2 goes to a temporary file for the block; afterwards every other non-blank
    line is printed to ``sys.stderr`` in order (so a real error message still shows, just
    after the call that printed it). Where descriptor 2 cannot be duplicated (an embedded
    interpreter), the block runs unfiltered.

    Args:
        noise: the lines to drop.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if line.strip() and not noise.search(line)]
            for line in kept:
                print(line, file=sys.stderr)


class _LineFormatter(logging.Formatter):
    """Information as it is; warnings and errors start like the tools' own errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else (
            f"{record.levelname.lower()}: {text}")


def plain_log_lines() -> None:
    """Python log records go to stderr as plain lines ("warning: class folder(s) ...").

    tools/_cli.py installs it before TensorFlow and its libraries load, so that none of them
    sets its own format first; a process that already has handlers (a test runner) keeps
    them.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LineFormatter())
        root.addHandler(handler)
