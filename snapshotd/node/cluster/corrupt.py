"""Corrupt blocks found on this node or at a peer: the notes, and the suspects queue.

:class:`CorruptBlocks` logs, counts (once per block) and lists every corrupt block found
(``snapshotd_corrupt_blocks_total{kind}``, the status JSON's ``corrupt``), and queues
blocks of ours that a peer or a degraded read found bad, for the scrubber to check at
once (its thread waits on :attr:`CorruptBlocks.wake`).

Thread-safe: the notes under their own lock; the queue is a bounded ``queue.Queue``
(a full queue drops the report: the next scrub pass finds the block anyway).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on

CORRUPT_LOG_MAX = 100  # entries of the status JSON's "corrupt" list (newest kept)
_SUSPECTS_MAX = 1024


class CorruptBlocks:
    def __init__(self):
        self.counts = {"data": 0, "parity": 0}
        self._log: deque = deque(maxlen=CORRUPT_LOG_MAX)
        self._seen: set = set()  # (job, v, holder, kind, index): counted once
        self._lock = threading.Lock()
        self._suspects: queue.Queue = queue.Queue(_SUSPECTS_MAX)
        self.wake = threading.Event()  # set when a suspect is queued (or at stop)

    # -- notes -------------------------------------------------------------------------------
    def note(self, job_id: str, v: int, kind: str, holder: str, found_by: str,
             where: dict) -> dict | None:
        """Log, count (once per block) and list a corrupt block. Returns its entry, or
        None if it was already known."""
        idx = tuple(sorted(where.items()))
        key = (job_id, v, holder, kind, idx)
        with self._lock:
            if key in self._seen:
                return None
            if len(self._seen) > 16 * CORRUPT_LOG_MAX:
                self._seen.clear()
            self._seen.add(key)
            self.counts[kind] = self.counts.get(kind, 0) + 1
            entry = {"job": job_id, "version": v, "kind": kind, **where, "holder": holder,
                     "found_by": found_by, "time": round(time.time(), 3), "repaired": False}
            self._log.append(entry)
        log.warning("CORRUPT %s block %s of job %s version %d held by %s (found by %s): it failed "
                    "its checksum and is not used", kind, where, job_id, v, holder, found_by)
        return entry

    def mark_repaired(self, entry: dict | None, job_id: str, v: int, kind: str, holder: str,
                      where: dict) -> None:
        """The block was repaired: flag its entry (``entry`` if we just made it, else the
        listed entries of that block)."""
        if entry is not None:
            entry["repaired"] = True
            return
        with self._lock:
            for e in self._log:
                if (e["job"], e["version"], e["kind"], e["holder"]) == (job_id, v, kind, holder) \
                        and all(e.get(k) == x for k, x in where.items()):
                    e["repaired"] = True

    def forget(self, job_id: str, v: int, kind: str, holder: str, where: dict) -> None:
        """The block is good again: should it go bad once more, it is reported anew."""
        with self._lock:
            self._seen.discard((job_id, v, holder, kind, tuple(sorted(where.items()))))

    def status(self) -> dict:
        with self._lock:
            return {"corrupt": [dict(e) for e in self._log], "corrupt_blocks": dict(self.counts)}

    # -- suspects ----------------------------------------------------------------------------
    def queue_suspect(self, s: dict) -> None:
        """A block of ours to check: {job, v, kind, j} or {job, v, kind, stripe, row}."""
        try:
            self._suspects.put_nowait(s)
        except queue.Full:  # the next pass finds it anyway
            return
        self.wake.set()

    def next_suspect(self) -> dict | None:
        try:
            return self._suspects.get_nowait()
        except queue.Empty:
            return None

    def has_suspects(self) -> bool:
        return not self._suspects.empty()
