"""SIGTERM / Ctrl-C: finish the current step, save, and exit cleanly."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Optional


class StopRequest:
    """Set by SIGTERM or the first SIGINT; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # a trainer in a worker thread (a Ray actor): its controller stops it instead
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None
