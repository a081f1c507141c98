"""A refused PushShard changes nothing (issue 18: bad input gets a clear error and
changes nothing), against a real ``snapshotd serve`` and the real client.

A 2-rank job commits version 1 by push; then rank 1 pushes version 2 (delivered,
waiting for rank 0) and rank 0's trainer stages version 2 through shared memory (its
segment written, not yet handed over: the usual save path, caught mid-copy). Then bad
pushes arrive for rank 0: a bad block checksum (for version 2, the size of the staged
one, and for version 3), fewer and more bytes than the manifest declares, a payload
over the whole memory budget, an unknown job, a version already committed. Each is
refused with its own error; after each, the store holds exactly what it held (stats,
versions, segments, manifests on disk). Then rank 0 hands over its staged version 2,
which commits, restores bit-exact on both ranks, and the next save (version 3) commits.

Before the fix the first bad push took rank 0's staging slot over (its bytes written
over the staged ones, then the slot freed when the checksum failed), so the hand-off of
the staged version 2 was refused ("not the staging segment") and version 2 never
committed.
"""

from __future__ import annotations

import os
import random

import grpc
import pytest

from snapshotd.wire import errors, shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.manifest import block_checksums
from snapshotd_client.transport import _translate

BS = 4096
BUDGET = 64 << 20


def _rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _manifest(job, rank, version, data, nbytes=None) -> pb.ShardManifest:
    n = len(data) if nbytes is None else nbytes
    m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=n, block_size_bytes=BS,
                         checksum_algo="xxh3_64", meta_json='{"step": %d}' % version,
                         tensors=[pb.TensorEntry(name="blob", dtype="uint8", shape=[n], offset=0, nbytes=n)])
    m.block_checksums.extend(block_checksums(data, len(data), BS) if nbytes is None
                             else [0] * ((n + BS - 1) // BS))
    return m


def _raw_push(cl, msgs):
    """PushShard with arbitrary messages (the client's push_shard sends only whole ones)."""
    try:
        return cl.stub.PushShard(iter(msgs), timeout=30, metadata=cl._metadata)
    except grpc.RpcError as exc:
        raise _translate(exc, "PushShard") from None


def _state(d, cl, job) -> dict:
    """What the store holds and accounts for."""
    st = cl.stats()
    return {"versions": cl.list_versions(job), "jobs": list(st.jobs),
            "bytes_reserved": st.bytes_reserved, "bytes_committed": st.bytes_committed,
            "segments": sorted(d.segments()),
            "manifests": sorted(os.listdir(os.path.join(d.state_dir, "manifests")))}


def _restored(cl, job, rank) -> tuple[int, bytes]:
    r = cl.open_shard(job, rank)
    seg = shm.open_segment(r.segment_name)
    try:
        data = bytes(seg.buf[:r.manifest.payload_bytes])
    finally:
        seg.close()
    fm, fdata = cl.fetch_shard(job, rank)
    assert fm.version == r.manifest.version and bytes(fdata) == data
    return r.manifest.version, data


def test_a_refused_push_changes_nothing(daemon_factory):
    d = daemon_factory(budget=str(BUDGET)).start()
    cl = d.client(timeout_s=20)
    job, size = "push", 5 * BS + 77
    try:
        cl.register_job(job, 2)
        v1 = {r: _rnd(size, r) for r in range(2)}
        for r in range(2):
            assert cl.push_shard(_manifest(job, r, 1, v1[r]), v1[r]).committed == (r == 1)
        v2 = {r: _rnd(size, 10 + r) for r in range(2)}
        assert not cl.push_shard(_manifest(job, 1, 2, v2[1]), v2[1]).committed
        staged = cl.acquire_staging(job, 0, 2, size)  # rank 0's trainer, mid-copy
        seg = shm.open_segment(staged.segment_name, writable=True)
        try:
            seg.buf[:size] = v2[0]
        finally:
            seg.close()
        before = _state(d, cl, job)
        refused_before = cl.stats().requests_refused

        junk = _rnd(size, 99)
        bad_sum = _manifest(job, 0, 2, junk)
        bad_sum.block_checksums[1] ^= 1
        bad_sum3 = _manifest(job, 0, 3, junk)
        bad_sum3.block_checksums[0] ^= 1
        cases = [
            ("bad checksum, v2", errors.ChecksumMismatchError, lambda: cl.push_shard(bad_sum, junk)),
            ("bad checksum, v3", errors.ChecksumMismatchError, lambda: cl.push_shard(bad_sum3, junk)),
            ("fewer bytes", errors.InvalidRequestError, lambda: _raw_push(cl, [
                pb.PushShardChunk(manifest=_manifest(job, 0, 2, junk)), pb.PushShardChunk(data=junk[:BS])])),
            ("more bytes", errors.InvalidRequestError, lambda: _raw_push(cl, [
                pb.PushShardChunk(manifest=_manifest(job, 0, 2, junk)), pb.PushShardChunk(data=junk + b"x")])),
            ("over budget", errors.MemoryBudgetExceededError, lambda: _raw_push(cl, [
                pb.PushShardChunk(manifest=_manifest(job, 0, 3, b"", nbytes=BUDGET + BS))])),
            ("unknown job", errors.UnknownJobError, lambda: cl.push_shard(_manifest("nosuch", 0, 2, junk), junk)),
            ("committed version", errors.ConflictError, lambda: cl.push_shard(_manifest(job, 0, 1, junk), junk)),
        ]
        for what, exc, call in cases:
            with pytest.raises(exc):
                call()
            assert _state(d, cl, job) == before, f"the refused push ({what}) changed the store"
        assert cl.stats().requests_refused >= refused_before + len(cases)
        assert d.alive()

        # The staged version is rank 0's still: handed over, it commits, and restores.
        r = cl.adopt(staged.segment_name, _manifest(job, 0, 2, v2[0]))
        assert r.committed and r.latest_committed_version == 2
        assert {rk: _restored(cl, job, rk) for rk in range(2)} == {rk: (2, v2[rk]) for rk in range(2)}
        v3 = {rk: _rnd(size + 1, 20 + rk) for rk in range(2)}  # the next save
        for rk in range(2):
            assert cl.push_shard(_manifest(job, rk, 3, v3[rk]), v3[rk]).committed == (rk == 1)
        assert {rk: _restored(cl, job, rk) for rk in range(2)} == {rk: (3, v3[rk]) for rk in range(2)}
    finally:
        cl.close()
