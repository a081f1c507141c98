"""Re-sending what a peer has not acknowledged, with a backoff, until it is or the version closes.

A delivery that fails (a receiver busy past the reply timeout, a peer that looked dead
for a while) is never dropped (issue 18). :class:`Resender` keeps one *episode* per
(job, version) from the first failure until nothing is left to send: it waits a
backoff (doubling from the heartbeat interval up to :data:`RESEND_MAX_S`), asks the
pure protocol what is still unacknowledged (``JobProtocol.resend``: the announce,
contributions or vote, addressed only to the peers that lack them) and hands those
actions to the commit worker. The episode ends when the protocol has nothing left to
re-send: every peer acknowledged, or the version was committed, fenced or dropped.

Logging: one warning per (kind, peer) and episode when it first fails, one line when
the episode ends; never one per try.

Call order: construct; :meth:`start` (the resend thread); :meth:`finished` from the
commit worker after each action it carried out; set ``stop`` then :meth:`stop`. Thread-safe (one lock of its own;
the protocol is asked under ``JobTable.lock``, never while holding this lock).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on

RESEND_MAX_S = 5.0  # the longest wait between two re-sends


@dataclass
class Episode:
    since: float
    backoff: float
    due: float | None = None  # when to ask the protocol again (None: an attempt is in flight)
    in_flight: int = 0  # re-sent actions the worker has not finished yet
    failed: bool = False  # an action of the current attempt failed
    tries: int = 0  # attempts that failed
    logged: set = field(default_factory=set)  # (kind, node) already warned about
    last_error: str = ""


class Resender:
    def __init__(self, *, jobs, enqueue: Callable[[str, list], None], alive_peers: Callable[[], set],
                 min_backoff_s: float, stop: threading.Event):
        """``enqueue(job, actions)`` hands actions to the commit worker;
        ``alive_peers()`` (the heartbeats' view) lets a resend to a peer that is
        not answering pings wait instead of spending a reply timeout on it."""
        self.jobs, self._enqueue, self._alive = jobs, enqueue, alive_peers
        self.min_backoff_s = max(0.01, float(min_backoff_s))
        self._stop = stop
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._episodes: dict[tuple[str, int], Episode] = {}
        self.resent = 0  # actions handed back to the worker

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="snapshotd-resend", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # -- from the commit worker ----------------------------------------------------------------
    def finished(self, job_id: str, v: int, kind: str, resent: bool, failures: list) -> None:
        """The worker carried out an action of ``kind`` for v (``resent``: one this
        resender handed it); ``failures``: [(node, exc)] it could not deliver to."""
        now = time.monotonic()
        key = (job_id, v)
        with self._wake:
            ep = self._episodes.get(key)
            if ep is None:
                if not failures:
                    return
                ep = self._episodes[key] = Episode(since=now, backoff=self.min_backoff_s / 2)
            if resent:
                ep.in_flight = max(0, ep.in_flight - 1)
            if failures:
                ep.failed = True
                ep.last_error = "; ".join(f"{node}: {exc}" for node, exc in failures)[:300]
                new = [(node, exc) for node, exc in failures if (kind, node) not in ep.logged]
                ep.logged.update((kind, node) for node, _ in failures)
            else:
                new = []
            if ep.in_flight == 0 and ep.due is None:
                if ep.failed:  # wait before the next try, longer each time
                    ep.tries += 1
                    ep.backoff = min(RESEND_MAX_S, ep.backoff * 2)
                    ep.due = now + ep.backoff
                else:  # all of it went through: anything left? (ends the episode if not)
                    ep.due = now
                ep.failed = False
                self._wake.notify_all()
        for node, exc in new:
            log.warning("job %s v%d: %s to %s not acknowledged (%s); re-sending with backoff until it "
                        "is, or the version commits or is dropped", job_id, v, kind, node, exc)

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict:
        """{job: {v: {"tries", "since_s", "last_error"}}} of the open episodes."""
        now = time.monotonic()
        out: dict = {}
        with self._lock:
            for (job, v), ep in self._episodes.items():
                out.setdefault(job, {})[str(v)] = {"tries": ep.tries, "since_s": round(now - ep.since, 2),
                                                   "last_error": ep.last_error}
        return out

    # -- the resend thread ---------------------------------------------------------------------
    def run(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                now = time.monotonic()
                due = [k for k, ep in self._episodes.items() if ep.due is not None and ep.due <= now]
                if not due:
                    nxt = [ep.due for ep in self._episodes.values() if ep.due is not None]
                    self._wake.wait(min(min(nxt) - now, 1.0) if nxt else 1.0)
                    continue
                for k in due:
                    self._episodes[k].due = None  # until the worker reports back (or _fire sets it)
            for job_id, v in due:
                self._fire(job_id, v)

    def _fire(self, job_id: str, v: int) -> None:
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            acts = jp.resend(v) if jp is not None else []
            closed = jp is None or v <= jp.committed_version or v not in jp.rounds
        if not acts:
            with self._wake:
                ep = self._episodes.pop((job_id, v), None)
            if ep is not None:
                log.info("job %s v%d: %s after %d failed deliveries in %.1f s", job_id, v,
                         "version closed (committed, fenced or dropped)" if closed
                         else "every peer acknowledged", ep.tries, time.monotonic() - ep.since)
            return
        alive = self._alive()
        ready = [a for a in acts if set(a.to) & alive]
        with self._wake:
            ep = self._episodes.get((job_id, v))
            if ep is None:
                return
            if len(ready) < len(acts):  # its peers do not answer heartbeats: wait, spend no timeouts
                ep.failed = True
            if not ready:  # look again a heartbeat interval later: it costs nothing
                ep.due = time.monotonic() + self.min_backoff_s
                ep.failed = False
                self._wake.notify_all()
                return
            ep.in_flight = len(ready)
        self.resent += len(ready)
        self._enqueue(job_id, ready)
