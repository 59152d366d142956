"""Stop requests (SIGTERM: a TPU/cluster preemption; SIGINT: Ctrl-C) turned into a clean
stop at a step boundary that every host of the job agrees on.

`StopSignals` records a signal instead of letting it kill the process; the training loop
asks `should_stop()` once per step. With one process that is the local flag; with several,
the hosts exchange their flags (one tiny all-gather per step, while they are at the same
step boundary), so they all stop after the same step, save that checkpoint together and
exit. A second Ctrl-C exits at once (KeyboardInterrupt), without saving.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import numpy as np

log = logging.getLogger("dynllava_jax.preemption")

SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as shells report


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set `requested` (the signal's name)."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        name = SIGNALS.get(signum, str(signum))
        if self.requested == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, no checkpoint
        if self.requested is None:
            log.warning("%s received: saving a checkpoint after this step, then stopping%s",
                        name, " (Ctrl-C again to quit without saving)" if name == "SIGINT" else "")
        self.requested = self.requested or name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal's rule
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def should_stop(self) -> Optional[str]:
        """The agreed stop request (a signal name) or None; call it on every host at the
        same step boundary."""
        import jax
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        codes = {None: 0, "SIGTERM": 1, "SIGINT": 2}
        flags = np.asarray(multihost_utils.process_allgather(
            np.int32(codes.get(self.requested, 1))))
        got = int(flags.max())
        return {0: None, 1: "SIGTERM", 2: "SIGINT"}[got] if got else None
