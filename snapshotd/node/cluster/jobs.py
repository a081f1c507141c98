"""The commit protocol state of every job on this node, and the one lock that guards it.

:class:`JobTable` holds a :class:`~snapshotd.core.protocol.JobProtocol` per job. Every
part of the cluster (commit driver, parity buffers, round records, rebuilder, scrubber)
reads and changes protocol state only while holding ``JobTable.lock`` (an RLock). Lock
order: ``JobTable.lock``, then a :class:`~snapshotd.node.cluster.parity.ParityBuffer`'s
own lock; the store's lock may be taken under it (the store never calls back in under
its own lock).
"""

from __future__ import annotations

import threading

from snapshotd.core import protocol as proto


class JobTable:
    def __init__(self, me: str, group: tuple[str, ...], all_nodes: tuple[str, ...], m: int, store,
                 groups: tuple[tuple[str, ...], ...] = ()):
        """``groups``: every group of the job by index (the commit tree); default: one."""
        self.me, self.group, self.all_nodes, self.m = me, group, all_nodes, m
        self.groups = tuple(tuple(g) for g in groups) or (tuple(group),)
        self.store = store
        self.lock = threading.RLock()
        self._jobs: dict[str, proto.JobProtocol] = {}
        self._rebuilding: dict[str, int] = {}  # job -> the version being rebuilt

    def job(self, job_id: str) -> proto.JobProtocol:
        """The job's protocol, created on first use. Call with ``lock`` held."""
        jp = self._jobs.get(job_id)
        if jp is None:
            jp = self._jobs[job_id] = proto.JobProtocol(
                job_id, self.me, self.group, self.all_nodes, self.m,
                committed_version=self.store.committed_version(job_id), groups=self.groups)
        return jp

    def get(self, job_id: str) -> proto.JobProtocol | None:
        """The job's protocol if it exists. Call with ``lock`` held."""
        return self._jobs.get(job_id)

    def items(self) -> list:
        """[(job, protocol)]. Call with ``lock`` held."""
        return list(self._jobs.items())

    def drop(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def committed_versions(self) -> dict[str, int]:
        with self.lock:
            return {j: jp.committed_version for j, jp in self._jobs.items()}

    def retained_layout(self, job_id: str, v: int):
        """The layout of version v if its round is retained here, else None."""
        with self.lock:
            jp = self._jobs.get(job_id)
            r = jp.rounds.get(v) if jp else None
            return r.layout if r is not None else None

    def committed_layouts(self) -> list:
        """[(job, committed version, its layout or None)] of every job with a commit."""
        with self.lock:
            out = []
            for j, jp in self._jobs.items():
                if jp.committed_version:
                    r = jp.rounds.get(jp.committed_version)
                    out.append((j, jp.committed_version, r.layout if r is not None else None))
            return out

    def summary(self) -> dict:
        """{job: {"committed": v, "pending": [versions above it], "waiting": {v: what
        round v waits for (JobProtocol.pending)}}} for the status JSON."""
        with self.lock:
            out = {}
            for j, jp in self._jobs.items():
                pending = sorted(x for x in jp.rounds if x > jp.committed_version)
                out[j] = {"committed": jp.committed_version, "pending": pending,
                          "waiting": {str(v): jp.pending(v) for v in pending}}
            return out

    # -- the version a rebuild is filling in ---------------------------------------------------
    # Until it commits, a job restart's fence must not free the slots being rebuilt (the
    # version is committed elsewhere), and peers must not copy from them.
    def mark_rebuilding(self, job_id: str, v: int) -> None:
        self._rebuilding[job_id] = v

    def unmark_rebuilding(self, job_id: str) -> None:
        self._rebuilding.pop(job_id, None)

    def rebuilding_version(self, job_id: str) -> int:
        """The version of the job being rebuilt here, 0 if none."""
        return self._rebuilding.get(job_id, 0)
