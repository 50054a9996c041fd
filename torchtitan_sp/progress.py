"""Progress on the console: ETA arithmetic, and a heartbeat line while no step finishes.

A 1M-token step, or the first step of a compiled model, can take minutes; without a word the run looks
hung. While no step has finished for HEARTBEAT_S seconds, rank 0 prints one line saying which step it is
in and for how long, once per HEARTBEAT_S.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

HEARTBEAT_S = 60.0  # a module constant (tests shorten it), not a config key


def duration(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Heartbeat:
    """A daemon thread that logs while no step finishes; `step_done` after each step, `stop` at the end."""

    def __init__(self, total_steps: int, done_steps: int, log: Callable[[str], None]):
        self.total, self.step, self.log = total_steps, done_steps, log
        self.start = self.last = time.monotonic()
        self.last_line = self.last
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def step_done(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S / 10):
            now = time.monotonic()
            if now - max(self.last, self.last_line) < HEARTBEAT_S:
                continue
            self.last_line = now
            since = "the previous step finished" if self.last > self.start else "training started"
            self.log(f"step {self.step + 1}/{self.total} still running: {duration(now - self.last)} since {since}")
