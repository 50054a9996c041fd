"""Ctrl-C (SIGINT) in a training process.

With checkpointing (checkpoint.enable and checkpoint.save_on_sigterm) the first Ctrl-C only asks the run
to stop: it finishes the step, saves, and exits 130, as SIGTERM does with 143. A second Ctrl-C aborts at
once. Without checkpointing the first one aborts; the trainer then prints one line instead of a
traceback per rank, and exits 130.

A terminal's Ctrl-C signals every process of the foreground group, and torchrun passes the signal on to
its workers once more: a worker gets two SIGINTs for one key press. A SIGINT within REPEAT_S of the
previous one is therefore the same Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

REPEAT_S = 1.0
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for Ctrl-C


class CtrlC:
    def __init__(self) -> None:
        self.defer = False  # set by the checkpointer: the first Ctrl-C stops after the step and saves
        self.requested = False
        self.last: float | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last < REPEAT_S:
            return  # the same key press, passed on by torchrun
        self.last = now
        if self.defer and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt


CTRL_C = CtrlC()


def install() -> None:
    """Handle SIGINT with CTRL_C (signal handlers exist only in the main thread: elsewhere, as in tests, no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, CTRL_C)
