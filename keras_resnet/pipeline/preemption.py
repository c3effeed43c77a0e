"""SIGTERM and SIGINT as a request to stop training at the next step, with a checkpoint.

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

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records SIGTERM/SIGINT while active (in the main thread; elsewhere it never fires).

    Attributes:
        signum: the first signal received, or None.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
