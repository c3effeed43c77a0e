"""SIGTERM and SIGINT: a request to stop training at the next step, with a checkpoint
(:class:`StopRequest`), or to stop a step that has no checkpoints (QAT, export) at once
(:class:`StopNow`).

Cloud schedulers and Kubernetes send SIGTERM before they take a machine away (and SIGKILL
a grace period later); Ctrl+C sends SIGINT. Inside :class:`StopRequest` either signal only
records the request: the training step that is running finishes, the run's monitor writes
a checkpoint after it and stops with :class:`~keras_resnet.pipeline.errors.Interrupted`,
and the same command resumes from that step. A second Ctrl+C stops at once
(KeyboardInterrupt), as users expect.

Example:
    >>> with StopRequest() as stop:
    ...     model.fit(..., callbacks=[RunMonitor(..., stop=stop)])
"""

from __future__ import annotations

import signal
import threading

from keras_resnet.pipeline.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _SignalScope:
    """Handles SIGTERM/SIGINT with ``_handle`` while active (in the main thread; elsewhere
    it never fires), and gives the previous handlers back on exit.

    Attributes:
        signum: the first signal received, or None.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        raise NotImplementedError


class StopRequest(_SignalScope):
    """Records SIGTERM/SIGINT while active (in the main thread; elsewhere it never fires).

    Attributes:
        signum: the first signal received, or None.
    """

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        if self.signum is None:
            self.signum = signum


class StopNow(_SignalScope):
    """SIGTERM/SIGINT stop a job at once with :class:`Interrupted` (exit status 128 + the
    signal), instead of a KeyboardInterrupt traceback.

    The exception is raised where the signal arrives; a library that swallows exceptions
    at that point (a garbage-collection callback) cannot hide it, because :meth:`check`
    raises it again: call it before the job commits its results.

    Args:
        what: the job, as the message names it ("QAT").
        then: what the user does next, as the message says it.

    Example:
        >>> with StopNow("export", then="run the same command again") as stop:
        ...     write_files()
        ...     stop.check()
        ...     commit()
    """

    def __init__(self, what: str, *, then: str):
        super().__init__()
        self.what, self.then = what, then

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        raise self.interrupted()

    def interrupted(self) -> Interrupted:
        name = signal.Signals(self.signum).name
        return Interrupted(f"{self.what} stopped by {name}; {self.then}",
                           status=128 + self.signum)

    def check(self) -> None:
        """Raises :class:`Interrupted` when a signal arrived (even one whose exception was
        swallowed)."""
        if self.signum is not None:
            raise self.interrupted()
