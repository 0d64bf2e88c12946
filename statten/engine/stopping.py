"""Graceful stop of training on SIGTERM (preemption) or SIGINT (Ctrl-C).

While training runs, these signals are only recorded; the trainer checks the record after each
optimizer step, writes a recovery checkpoint and raises :class:`TrainingStopped`, so that the
run can be resumed exactly where it stopped.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training stopped on a signal after writing a recovery checkpoint."""

    def __init__(
        self, signum: int, epoch: int, batch: int, checkpoint: Path, primary: bool
    ) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.primary = primary  # only the primary rank reports the stop
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at epoch {epoch}, batch {batch}; "
            f"recovery checkpoint: {checkpoint}; "
            f"resume with: statten train --resume {shlex.quote(str(checkpoint))}"
        )

    @property
    def exit_status(self) -> int:
        """The shell's status of a process ended by the signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


class StopSignals:
    """Context manager that records SIGTERM / SIGINT instead of dying, then restores the
    previous handlers. A second signal (e.g. during the checkpoint save) changes nothing."""

    def __init__(self) -> None:
        self.received = 0  # the first stop signal received, 0 while none
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
