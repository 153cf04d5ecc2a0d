"""A tracker's calls to a tracking server, made by one background thread: training hands each call
over and goes on, so a slow or unreachable server never stalls an epoch; the end of a run waits
for what is queued, up to a deadline.

Input: calls (closures, each one request or a few, that handle their own errors), run in the
order they were submitted. Output: none; `Sender.drain` says whether everything submitted ran
before the deadline. The queue is bounded: a call that does not fit is refused (the caller keeps
what it would have sent: a run directory has every epoch in history.csv).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CAPACITY = 1000  # calls waiting at most (an epoch is one)


class Sender:
    """One daemon thread (started on the first call) running submitted calls in order."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue(capacity)
        self._pending = 0  # submitted and not yet finished
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, call: Callable[[], None]) -> bool:
        """Queue ``call``; False (and nothing queued) when the queue is full."""
        with self._changed:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="mer-tracker", daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait(call)
            except queue.Full:
                return False
            self._pending += 1
        return True

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted call has run, at most ``timeout`` seconds: True if they all did."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    @property
    def pending(self) -> int:
        with self._changed:
            return self._pending

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            try:
                call()
            except Exception as e:  # calls report their own failures; this one escaped
                log.debug("background call failed: %s", e)
            finally:
                with self._changed:
                    self._pending -= 1
                    self._changed.notify_all()
