"""An in-memory stand-in for what ParityBuffers and JobTable use of the daemon's store.

Aux segments (bytearrays, with an optional memory budget that refuses like the real
store's) and the committed version. For in-process tests of the parity route; tests with
real daemons use clusterkit.
"""

from __future__ import annotations

from snapshotd.wire import errors


class Seg:
    def __init__(self, size: int):
        self.size, self.buf = size, bytearray(size)


class AuxStore:
    """``budget``: the most bytes of aux segments held at once (None: no limit)."""

    def __init__(self, budget: int | None = None):
        self.budget, self.aux = budget, {}

    def create_aux(self, suffix: str, size: int, prefault: bool = True):
        if self.budget is not None and sum(s.size for s in self.aux.values()) + size > self.budget:
            raise errors.MemoryBudgetExceededError(f"{size} more bytes would exceed the budget")
        self.aux[suffix] = Seg(size)
        return suffix, self.aux[suffix]

    def release_aux(self, name: str) -> None:
        self.aux.pop(name, None)

    def committed_version(self, job_id: str) -> int:
        return 0
