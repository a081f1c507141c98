"""Local copies of other nodes' shards (a restore gathering data-parallel slices, a
degraded read): one aux segment per (job, rank, version), kept until a newer version of
the job commits or the job is dropped.

Thread-safe: every method takes the job table's lock (the lock the copies were always
guarded by), so the commit's release runs atomically with the rest of the commit.
"""

from __future__ import annotations


class RemoteCopies:
    def __init__(self, store, lock):
        self.store, self.lock = store, lock
        self._copies: dict = {}  # (job, rank, v) -> (aux segment name, manifest)

    def get(self, job_id: str, rank: int, v: int):
        with self.lock:
            return self._copies.get((job_id, rank, v))

    def put(self, job_id: str, rank: int, v: int, name: str, manifest) -> None:
        with self.lock:
            self._copies[(job_id, rank, v)] = (name, manifest)

    def release_older(self, job_id: str, v: int) -> None:
        """Version v of the job committed: free the copies of older versions."""
        with self.lock:
            for key in [k for k in self._copies if k[0] == job_id and k[2] < v]:
                self.store.release_aux(self._copies.pop(key)[0])

    def drop_job(self, job_id: str) -> None:
        with self.lock:
            for key in [k for k in self._copies if k[0] == job_id]:
                self.store.release_aux(self._copies.pop(key)[0])
