"""Whether a model file is what its name says, by its first bytes.

Keras and LiteRT report a file that exists but is not theirs (a text file, an empty or
half-copied download, an HTML error page saved under the model's name) as "file not found"
or "not a valid Flatbuffer buffer". :func:`check_file_format` reads the file's signature
before it is loaded and names the problem instead:

* ``.keras``: a zip archive (``PK\\x03\\x04``);
* ``.h5`` and ``.weights.h5``: the HDF5 signature ``\\x89HDF\\r\\n\\x1a\\n`` (at byte 0, or
  after a user block of 512, 1024, 2048, ... bytes);
* ``.tflite``: the flatbuffer file identifier ``TFL3`` at bytes 4..8.

Example:
    >>> check_file_format("runs/r20/model.keras")          # returns, or raises UserError
"""

from __future__ import annotations

import os

from keras_resnet.pipeline.errors import UserError

ZIP_SIGNATURE = b"PK\x03\x04"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
TFLITE_IDENTIFIER = b"TFL3"

# suffix -> (what the file must be, how to get a right one); the longest suffix wins.
_FORMATS = {
    ".keras": ("a Keras archive", "pass a .keras file saved with model.save()"),
    ".weights.h5": ("an HDF5 file", "pass a .weights.h5 file saved with "
                                    "model.save_weights()"),
    ".h5": ("an HDF5 file", "pass an .h5 model saved by Keras (tools/qat.py writes "
                            "model_qat.h5)"),
    ".tflite": ("a TFLite flatbuffer", "pass a .tflite file written by "
                                       "tools/export_tflite.py or a TFLite converter"),
}


def _has_signature(path: str, suffix: str, size: int) -> bool:
    with open(path, "rb") as f:
        if suffix == ".keras":
            return f.read(4) == ZIP_SIGNATURE
        if suffix == ".tflite":
            return f.read(8)[4:8] == TFLITE_IDENTIFIER
        offset = 0
        while offset + len(HDF5_SIGNATURE) <= size:
            f.seek(offset)
            if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
        return False


def _looks_like(path: str, suffix: str, size: int) -> str:
    if size == 0:
        return "it is empty"
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "it holds text"
    return {".keras": "it has no zip header", ".tflite": "it has no TFL3 identifier"}.get(
        suffix, "it has no HDF5 signature")


def check_file_format(path, *, error: type[UserError] = UserError) -> None:
    """Raises ``error`` when an existing ``.keras``, ``.h5``, ``.weights.h5`` or
    ``.tflite`` file does not start with that format's signature.

    A missing file, or a name with another ending, passes: the loader's own message (or
    the caller's existence check) covers those.

    Args:
        path: the model file.
        error: the UserError subclass to raise (the caller's, e.g. ExportError).

    Raises:
        UserError: (``error``) e.g. "model.keras is not a Keras archive (it holds text);
            pass a .keras file saved with model.save()".
    """
    path = os.path.expanduser(os.fspath(path))
    suffix = next((s for s in sorted(_FORMATS, key=len, reverse=True)
                   if path.lower().endswith(s)), None)
    if suffix is None or not os.path.isfile(path):
        return
    try:
        size = os.path.getsize(path)
        if _has_signature(path, suffix, size):
            return
        found = _looks_like(path, suffix, size)
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    kind, fix = _FORMATS[suffix]
    raise error(f"{path} is not {kind} ({found}); {fix}")
