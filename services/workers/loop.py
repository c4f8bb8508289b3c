"""A background loop for service objects: `step()` repeatedly in a thread until stopped.

Ray actors here are threaded (`max_concurrency` > 1): the loop thread does the work while other
threads answer calls (status, queries). Errors in a step are logged and retried, never fatal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Loop:
    """Run `step` (returns how much it did) until `stop()`; sleep `idle_s` when it did nothing."""

    def __init__(self, name: str, step: Callable[[], int], idle_s: float = 0.0, error_s: float = 0.5) -> None:
        self.name, self._step, self.idle_s, self.error_s = name, step, idle_s, error_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Loop:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._step() and self.idle_s:
                    self._stop.wait(self.idle_s)
            except Exception:  # the loop's top level: log, back off, go on
                log.exception("%s: step failed; retrying", self.name)
                time.sleep(self.error_s)

    def stop(self) -> None:
        self._stop.set()
