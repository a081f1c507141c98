"""The Snapshotter's hand-off thread: runs submitted calls one at a time, in order.

What ``ThreadPoolExecutor(1)`` gave, for less per submit (a save submits one call):
``submit`` is a ``Future`` and a put on a C ``SimpleQueue``, whose ``get`` wakes the
thread; no pool bookkeeping, no Python-level condition. At interpreter exit, calls
already submitted still run (as a pool's would): the thread is a daemon thread, and an
exit hook stops it after them (``weakref.finalize``; bounded by ``exit_timeout_s``).

Call order: ``submit`` (any thread, usually the training thread) ; ``shutdown`` (once,
from the owner; ``submit`` after it raises RuntimeError). Thread-safe.
"""

from __future__ import annotations

import queue
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable

__all__ = ["HandoffWorker"]


def _run(q: queue.SimpleQueue) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        fut, fn, args = item
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            result = fn(*args)
        except BaseException as exc:  # the Future's owner sees it, as with a pool
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        del item, fut, fn, args


def _stop(q: queue.SimpleQueue, thread: threading.Thread, timeout: float | None) -> None:
    q.put(None)
    if thread is not threading.current_thread():
        thread.join(timeout)


class HandoffWorker:
    """One thread named ``name`` running ``submit``-ted calls in order."""

    def __init__(self, name: str, exit_timeout_s: float | None = 60.0) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=_run, args=(self._q,), name=name, daemon=True)
        self._thread.start()
        # at exit (or when this object is collected): stop after what was submitted
        self._stopper = weakref.finalize(self, _stop, self._q, self._thread, exit_timeout_s)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a HandoffWorker after shutdown")
            self._q.put((fut, fn, args))
        return fut

    def shutdown(self, wait: bool = True) -> None:
        """Stop after the calls already submitted; with ``wait``, until they ran."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stopper.detach()
        self._q.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()
