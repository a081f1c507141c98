"""Rate-limited warnings, for the daemon and the client alike.

A condition that repeats on every request or every training step (a daemon that is
away, a snapshot skipped, a refused poll) must not print one line each time:
:class:`WarningLimiter` lets the first occurrence of a key through, then at most one
per ``interval_s``, and says how many it held back in between. Use::

    ok, held = limiter.allow(key)
    if ok:
        log.warning("...%s", limiter.held_note(held))

Thread-safe (one lock); the clock is ``time.monotonic`` unless one is given (tests).
"""

from __future__ import annotations

import threading
import time

__all__ = ["WarningLimiter"]


class WarningLimiter:
    def __init__(self, interval_s: float = 10.0, clock=time.monotonic, max_keys: int = 1024):
        if not interval_s >= 0:
            raise ValueError("interval_s must be >= 0")
        self.interval_s = float(interval_s)
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._state: dict[object, list] = {}  # key -> [time of the last one let through, held]

    def allow(self, key) -> tuple[bool, int]:
        """(let this one through?, how many of ``key`` were held back since the last one
        let through). Held-back counts are reported once, with the next one let through."""
        now = self._clock()
        with self._lock:
            st = self._state.get(key)
            if st is None:
                if len(self._state) >= self._max_keys:  # bounded: forget the oldest keys
                    for k in sorted(self._state, key=lambda k: self._state[k][0])[:len(self._state) // 2]:
                        del self._state[k]
                self._state[key] = [now, 0]
                return True, 0
            if now - st[0] >= self.interval_s:
                held, st[0], st[1] = st[1], now, 0
                return True, held
            st[1] += 1
            return False, st[1]

    def held_note(self, held: int) -> str:
        """Text to append to a let-through warning: `` (N more like it held back)``."""
        if not held:
            return ""
        return f" ({held} more like it in the last {self.interval_s:g} s not shown)"
