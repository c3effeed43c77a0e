"""File writes that a reader never sees half done and whose fixable failures are one error.

Every file is replaced through a temporary file and a rename, so a reader (or a process
that is killed) sees the old or the new content, never half. A write that fails because the
disk is full or read-only, or for want of permission, removes its temporary file and raises
one :class:`~keras_resnet.pipeline.errors.WriteError` that says what to do; a write whose
size is known is refused before it starts when it would nearly fill the disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from typing import Any

from keras_resnet.pipeline.errors import WriteError

# Write failures a user can fix (free space, a writable folder, permissions), by errno, and
# the words libraries that hide the errno (h5py, TensorFlow's file system) use for them.
WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}
_WRITE_WORDS = re.compile(r"no space left on device|disk quota exceeded|read-only file "
                          r"system|permission denied|operation not permitted", re.I)
# Free space a write leaves untouched: a write that would cut into it is refused before it
# starts (HDF5 has crashed the process when the disk filled up under it).
FREE_SPACE_MARGIN = 1 << 20


def write_errno(error: BaseException) -> int | None:
    """The errno of a failed write that :data:`WRITE_ERRNOS` covers, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "errno", None)
        if code in WRITE_ERRNOS:
            return code
        match = _WRITE_WORDS.search(str(error))
        if match:
            words = match[0].lower()
            return next(c for c, w in WRITE_ERRNOS.items() if w == words)
        error = error.__cause__ or error.__context__
    return None


def free_bytes(path) -> int | None:
    """Free bytes for an unprivileged writer on the file system holding ``path``."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def write_failure(path, code: int, needed: int | None = None) -> WriteError:
    """The one-sentence WriteError for a write of ``path`` that failed with ``code``."""
    path = os.fspath(path)
    what = WRITE_ERRNOS[code]
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        space = [f"{_mb(free)} free" if free is not None else None,
                 f"about {_mb(needed)} needed" if needed else None]
        space = ", ".join(p for p in space if p)
        return WriteError(f"could not write {path}: {what}"
                          f"{f' ({space})' if space else ''}; free some space")
    if code == errno.EROFS:
        return WriteError(f"could not write {path}: {what}; use a writable folder")
    return WriteError(f"could not write {path}: {what}; make its folder writable or use "
                      "another folder")


def as_write_error(error: BaseException, folder) -> WriteError | None:
    """``error`` (from a library writing into ``folder``, e.g. TensorBoard's event writer)
    as a WriteError naming the file it names, or None when it is no write failure."""
    if isinstance(error, WriteError):
        return error
    code = write_errno(error)
    if code is None:
        return None
    folder = os.path.abspath(os.fspath(folder))
    named = [p for p in re.findall(r"/[^\s;:'\"]+", str(error)) if p.startswith(folder)]
    return write_failure(named[0] if named else folder, code)


@contextlib.contextmanager
def guarded_write(path, tmp, *, needed: int | None = None):
    """Writes ``tmp`` (renamed to ``path`` by the caller) with failures made one WriteError.

    With ``needed`` (bytes), a write that would leave less than :data:`FREE_SPACE_MARGIN`
    free is refused before it starts (the message then counts the margin as needed). On
    any failure ``tmp`` is removed.
    """
    if needed:
        free = free_bytes(path)
        if free is not None and free < needed + FREE_SPACE_MARGIN:
            raise write_failure(path, errno.ENOSPC, needed + FREE_SPACE_MARGIN)
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        code = write_errno(e)
        if code is None:
            raise
        raise write_failure(path, code, needed) from None


def write_atomic(path, content: str | bytes) -> None:
    """Writes a file (text or bytes) so that readers see the old or the new content, never
    half: a temporary file, flushed to the disk, then renamed over ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    data = content.encode() if isinstance(content, str) else content
    with guarded_write(path, tmp, needed=len(data)):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_json(path, data: Any, *, sort_keys: bool = False) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=sort_keys, default=str) + "\n")


def save_atomic(path, save, *, needed: int | None = None) -> None:
    """Calls ``save(temporary path)`` then renames; the temporary name keeps the extension
    (Keras checks it). ``needed``: the bytes the file will take, when known."""
    path = os.fspath(path)
    base, ext = (path[:-len(".weights.h5")], ".weights.h5") if path.endswith(
        ".weights.h5") else os.path.splitext(path)
    tmp = f"{base}.tmp{ext}"
    with guarded_write(path, tmp, needed=needed):
        save(tmp)
        os.replace(tmp, path)
