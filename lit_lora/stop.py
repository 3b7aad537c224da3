"""Ctrl-C and SIGTERM during training: a flag the loop checks after each step, so every process saves first."""
from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so it can save before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
