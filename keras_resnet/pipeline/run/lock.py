"""One process at a time writes a run folder: :class:`RunLock`."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from keras_resnet.pipeline.errors import RunLocked
from keras_resnet.pipeline.run.layout import LOCK, check_folder
from keras_resnet.pipeline.run.safe_writes import write_errno, write_failure


class RunLock:
    """An exclusive lock on a run folder for the lifetime of one process's job.

    An advisory ``flock`` on ``<run>/.lock``, which holds the owner's pid: the kernel drops
    it when the process ends however it ends, so a killed run never blocks its resume. A
    folder the lock created and nothing else was written to is removed on release, so bad
    options leave no run behind.

    Raises:
        RunLocked: another live process holds the lock (its pid is named).
    """

    def __init__(self, run_dir):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self._fd = None
        self._created = False

    def __enter__(self) -> RunLock:
        check_folder(self.run_dir)
        self._created = not os.path.isdir(self.run_dir)
        path = os.path.join(self.run_dir, LOCK)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            code = write_errno(e)
            if code is None:
                raise
            raise write_failure(path, code) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            try:
                owner = Path(path).read_text().strip() or "unknown"
            except OSError:
                owner = "unknown"
            raise RunLocked(f"{self.run_dir} is in use by process {owner}; wait for it to "
                            "finish (or stop it) before starting another job there") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        path = os.path.join(self.run_dir, LOCK)
        if self._created and os.listdir(self.run_dir) == [LOCK]:
            os.remove(path)
            os.rmdir(self.run_dir)
        os.close(self._fd)  # releases the flock
        self._fd = None
