"""Stop at a step boundary on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption).

While installed, the handlers only note the signal; the training loop asks ``requested`` before
each step and stops there, so the checkpoint it writes holds the last completed step and never a
half-done one. A second SIGINT raises KeyboardInterrupt at once (a user pressing Ctrl-C twice
wants out now; the last periodic checkpoint then stands). SIGTERM never does: a scheduler may send
it to every process of a job, and more than once. The exit code of a run stopped this way is
``128 + signal number``: 130 for SIGINT, 143 for SIGTERM.

Example::

    >>> stop = StopOnSignal().install()
    >>> while not stop.requested and step < max_steps:   # doctest: +SKIP
    ...     step = train_one_step()
    >>> stop.uninstall()
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Notes the first SIGINT/SIGTERM; installed only from the main thread (elsewhere a no-op)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._note) for signum in SIGNALS}
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


def exit_code(signal_name: str | None) -> int:
    """``128 + signal number`` for a run stopped by ``signal_name`` (``"SIGINT"`` -> 130)."""
    return 128 + signal.Signals[signal_name].value if signal_name else 1
