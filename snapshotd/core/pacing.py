"""A token bucket for the daemon's bulk peer traffic (pure: the clock is an argument).

The peer plane's bulk bytes (parity contributions, rebuild and degraded-read blocks)
share the network with the training job's own collectives. ``TokenBucket`` decides
how long a sender must wait before handing ``nbytes`` to its socket so that, over any
interval ``t``, at most ``burst_bytes + rate_bytes_s * t`` bytes leave. A message larger
than the bucket is never refused: it is let through when the bucket is full and leaves
the bucket in debt, which the following messages wait out (so the long-run rate holds
for any message size).

Call order: ``delay_s(nbytes, now)`` once per message, then wait that long (the caller
sleeps; the bytes are already debited, so concurrent senders queue up behind each
other instead of all waking at once). No clocks, no threads: the caller serialises
calls (:class:`snapshotd.node.peer.pacing.Pacer` holds a lock) and passes a monotonic
``now`` in seconds.
"""

from __future__ import annotations


class TokenBucket:
    """``rate_bytes_s`` (> 0) refill rate; ``burst_bytes`` (> 0) capacity, full at start."""

    def __init__(self, rate_bytes_s: float, burst_bytes: int, now: float):
        if not rate_bytes_s > 0:
            raise ValueError(f"rate_bytes_s must be > 0, not {rate_bytes_s!r}")
        if not burst_bytes > 0:
            raise ValueError(f"burst_bytes must be > 0, not {burst_bytes!r}")
        self.rate_bytes_s = float(rate_bytes_s)
        self.burst_bytes = int(burst_bytes)
        self._tokens = float(burst_bytes)
        self._at = float(now)

    def tokens(self, now: float) -> float:
        """Tokens at ``now`` (negative while in debt); does not change the bucket."""
        return min(float(self.burst_bytes),
                   self._tokens + max(0.0, now - self._at) * self.rate_bytes_s)

    def delay_s(self, nbytes: int, now: float) -> float:
        """Debit ``nbytes`` and return the seconds to wait before sending them (>= 0).

        A message that fits waits until its bytes are covered; one larger than the
        bucket waits only until the bucket is full, and leaves it in debt."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        have = self.tokens(now)
        self._at = max(self._at, now)
        need = min(float(nbytes), float(self.burst_bytes))
        wait = max(0.0, need - have) / self.rate_bytes_s
        self._tokens = have - nbytes
        return wait
