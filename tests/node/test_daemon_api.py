"""The daemon's gRPC API against a real ``snapshotd serve`` process.

Every refused request is checked three ways: the exception class and gRPC code the
client gets, that the daemon is still alive and serves a good request afterwards, and
that nothing changed (versions, stats, segments, and the last committed version is
still restorable bit-exact).
"""

from __future__ import annotations

import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import REPO, DaemonProcess
from snapshotd.wire import errors
from snapshotd.wire import shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.manifest import block_checksums
from snapshotd_client.transport import DaemonClient, _translate

BS = 4096  # block size used by these tests
C = grpc.StatusCode
MiB = 1 << 20


# -- helpers --------------------------------------------------------------------------
def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def manifest(job, rank, version, data, *, checksums=False, tensors=None, bs=BS, **kw):
    n = len(data)
    if tensors is None:
        tensors = [pb.TensorEntry(name="blob", dtype="uint8", shape=[n], offset=0, nbytes=n)] if n else []
    m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=n,
                         block_size_bytes=bs, checksum_algo="xxh3_64", tensors=tensors,
                         meta_json='{"step": %d}' % version)
    if checksums:
        m.block_checksums.extend(block_checksums(data, n, bs))
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def stage(cl, job, rank, version, data):
    """AcquireStaging and write ``data`` into the segment; returns the segment name."""
    st = cl.acquire_staging(job, rank, version, len(data))
    assert st.segment_bytes >= len(data)
    seg = shm.open_segment(st.segment_name, writable=True)
    try:
        if data:
            seg.buf[: len(data)] = data
    finally:
        seg.close()
    return st.segment_name


def write_shard(cl, job, rank, version, data, **kw) -> pb.AdoptShardResponse:
    name = stage(cl, job, rank, version, data)
    return cl.adopt(name, manifest(job, rank, version, data, **kw))


def read_open(cl, job, rank, version=0):
    r = cl.open_shard(job, rank, version)
    seg = shm.open_segment(r.segment_name)
    try:
        data = bytes(seg.buf[: r.manifest.payload_bytes]) if r.manifest.payload_bytes else b""
    finally:
        seg.close()
    return r.manifest, data


def raw_push(cl, msgs, timeout=30):
    """PushShard with arbitrary messages (the client's push_shard only sends valid ones)."""
    try:
        return cl.stub.PushShard(iter(msgs), timeout=timeout, metadata=cl._metadata)
    except grpc.RpcError as exc:
        raise _translate(exc, "PushShard") from None


def refused(exc_cls, code, fn, *args, match=None):
    with pytest.raises(exc_cls) as ei:
        fn(*args)
    assert ei.value.grpc_code == code, (ei.value.grpc_code, str(ei.value))
    if match:
        assert re.search(match, str(ei.value)), str(ei.value)
    return ei.value


def job_segments(d, job):
    return sorted(n for n in d.segments() if n.startswith(f"snapshotd.{d.node_id}.{job}.r"))


def state_of(d, cl, job):
    """Everything a refused request must leave unchanged."""
    st = cl.stats()
    js = [j for j in st.jobs if j.job_id == job]
    return {
        "versions": cl.list_versions(job),
        "job": js[0] if js else None,
        "bytes_reserved": st.bytes_reserved,
        "bytes_committed": st.bytes_committed,
        "segments": job_segments(d, job),
        "manifests": sorted(n for n in os.listdir(os.path.join(d.state_dir, "manifests"))
                            if n.startswith(f"snapshotd.{d.node_id}.{job}.r")),
    }


def committed_job(cl, job, ws=1, version=1, size=3 * BS + 123, seed=0):
    assert cl.register_job(job, ws).latest_committed_version == 0
    datas = {}
    for r in range(ws):
        datas[r] = rnd(size, seed * 1000 + r)
        resp = write_shard(cl, job, r, version, datas[r])
        assert resp.committed == (r == ws - 1)
    return datas


def assert_intact(cl, job, datas, version):
    """The committed version is restorable bit-exact via OpenShard and FetchShard."""
    for r, data in datas.items():
        m, got = read_open(cl, job, r)
        assert m.version == version and m.rank == r and got == data
        fm, fdata = cl.fetch_shard(job, r)
        assert fm.version == version and bytes(fdata) == data


def assert_serving(d, cl, job, datas, version):
    """Alive, and a good request (a new version for every rank) still commits."""
    assert d.alive()
    cl.stats()
    new = {r: rnd(len(x) or 1, 7777 + r) for r, x in datas.items()}
    for r, data in new.items():
        resp = write_shard(cl, job, r, version, data)
        assert resp.committed == (r == max(new))
    assert cl.list_versions(job).latest_committed_version == version
    assert_intact(cl, job, new, version)


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def dmn(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("api")).start()
    yield d
    d.kill()
    for name in d.segments():
        shm.unlink(name)


@pytest.fixture
def cl(dmn):
    c = dmn.client(timeout_s=20)
    yield c
    c.close()


# -- 1. happy paths ------------------------------------------------------------------------
def test_two_rank_commit_open_fetch_push(dmn, cl):
    job = "happy2"
    assert cl.register_job(job, 2).latest_committed_version == 0
    assert cl.register_job(job, 2).latest_committed_version == 0  # idempotent
    d0 = rnd(5 * BS + 17, 1)
    d1 = rnd(4 * MiB + 3 * BS + 5, 2)  # more than one FetchShard chunk, odd size
    tensors0 = [
        pb.TensorEntry(name="model/w", dtype="float32", shape=[5, 256], offset=0, nbytes=5 * 256 * 4),
        pb.TensorEntry(name="opt/step", dtype="int64", shape=[], offset=5 * 256 * 4, nbytes=8),
    ]
    resp = write_shard(cl, job, 0, 1, d0, tensors=tensors0)
    assert (resp.version, resp.committed, resp.latest_committed_version) == (1, False, 0)

    c = cl.commit(job, 1)
    assert not c.committed and list(c.missing_ranks) == [1] and c.latest_committed_version == 0
    lv = cl.list_versions(job)
    assert lv.latest_committed_version == 0
    assert [(v.version, v.committed, list(v.delivered_ranks)) for v in lv.versions] == [(1, False, [0])]
    # nothing is readable before the version commits
    refused(errors.UnknownJobError, C.NOT_FOUND, cl.open_shard, job, 0)
    refused(errors.UnknownJobError, C.NOT_FOUND, cl.fetch_shard, job, 0)

    resp = write_shard(cl, job, 1, 1, d1)
    assert (resp.version, resp.committed, resp.latest_committed_version) == (1, True, 1)
    c = cl.commit(job, 1)
    assert c.committed and not c.missing_ranks and c.latest_committed_version == 1

    m0, got0 = read_open(cl, job, 0)
    assert got0 == d0
    assert list(m0.block_checksums) == block_checksums(d0, len(d0), BS)  # daemon computed them
    assert list(m0.tensors) == tensors0 and m0.meta_json == '{"step": 1}'
    m1, got1 = read_open(cl, job, 1, version=1)
    assert got1 == d1 and m1.payload_bytes == len(d1)
    fm, fdata = cl.fetch_shard(job, 1)
    assert fm == m1 and bytes(fdata) == d1
    fm, fdata = cl.fetch_shard(job, 0, 1)
    assert fm == m0 and bytes(fdata) == d0

    # push version 2 (the other-host path) supersedes version 1
    p0, p1 = rnd(2 * BS, 3), rnd(3 * BS + 1, 4)
    r = cl.push_shard(manifest(job, 0, 2, p0, checksums=True), p0)
    assert (r.version, r.committed, r.latest_committed_version) == (2, False, 1)
    assert read_open(cl, job, 0)[1] == d0  # still version 1 until all ranks delivered
    r = cl.push_shard(manifest(job, 1, 2, p1, checksums=True), p1)
    assert (r.version, r.committed, r.latest_committed_version) == (2, True, 2)
    assert_intact(cl, job, {0: p0, 1: p1}, 2)
    refused(errors.UnknownJobError, C.NOT_FOUND, cl.open_shard, job, 0, 1, match="not held")
    assert cl.register_job(job, 2).latest_committed_version == 2

    lv = cl.list_versions(job)
    assert lv.latest_committed_version == 2
    assert [(v.version, v.committed, list(v.delivered_ranks)) for v in lv.versions] == [(2, True, [0, 1])]
    assert lv.versions[0].bytes >= len(p0) + len(p1)
    st = cl.stats()
    assert st.node_id == dmn.node_id and st.pid == dmn.proc.pid
    assert st.memory_budget_bytes == 1 << 30
    (js,) = [j for j in st.jobs if j.job_id == job]
    assert (js.world_size, js.latest_committed_version) == (2, 2)
    assert js.segments == len(job_segments(dmn, job))
    assert js.bytes_held == sum(os.path.getsize(shm.path_of(n)) for n in job_segments(dmn, job))
    assert st.bytes_committed >= len(p0) + len(p1)
    assert st.bytes_reserved >= js.bytes_held


def test_zero_byte_shards(dmn, cl):
    job = "empty"
    cl.register_job(job, 1)
    assert write_shard(cl, job, 0, 1, b"").committed
    m, data = read_open(cl, job, 0)
    assert m.payload_bytes == 0 and data == b"" and not m.block_checksums
    fm, fdata = cl.fetch_shard(job, 0)
    assert fm.version == 1 and bytes(fdata) == b""
    # a push of an empty shard, also with an explicit empty data chunk
    assert cl.push_shard(manifest(job, 0, 2, b"", checksums=True), b"").committed
    r = raw_push(cl, [pb.PushShardChunk(manifest=manifest(job, 0, 3, b"", checksums=True)),
                      pb.PushShardChunk(data=b"")])
    assert r.committed and r.latest_committed_version == 3
    assert read_open(cl, job, 0)[0].version == 3


def test_segments_are_reused_across_versions(dmn, cl):
    job = "ring"
    ws = 2
    cl.register_job(job, ws)
    seen: set[str] = set()
    for v in range(1, 11):
        size = 8 * BS if v < 9 else 12 * BS  # grows at the end: segments are re-created
        datas = {r: rnd(size + r, 100 * v + r) for r in range(ws)}
        for r in range(ws):
            assert write_shard(cl, job, r, v, datas[r]).committed == (r == ws - 1)
        assert_intact(cl, job, datas, v)
        segs = job_segments(dmn, job)
        seen.update(segs)
        for r in range(ws):
            mine = [n for n in segs if f".{job}.r{r}." in n]
            assert 1 <= len(mine) <= 3, segs
        assert [x.version for x in cl.list_versions(job).versions] == [v]
    # the committed and the superseded segment alternate: no new names while sizes stay
    assert len(seen) <= ws * 3 + ws * 2, seen
    st = [j for j in cl.stats().jobs if j.job_id == job][0]
    assert st.segments == len(job_segments(dmn, job)) <= ws * 3


def test_drop_job_frees_segments(dmn, cl):
    job = "dropme"
    datas = committed_job(cl, job, ws=2)
    stage(cl, job, 0, 2, rnd(BS, 5))
    write_shard(cl, job, 1, 2, rnd(BS, 6))  # pending
    assert job_segments(dmn, job)
    before = cl.stats()
    held = [j for j in before.jobs if j.job_id == job][0].bytes_held
    assert cl.drop_job(job) == held > 0
    assert job_segments(dmn, job) == []
    after = cl.stats()
    assert job not in [j.job_id for j in after.jobs]
    assert after.bytes_reserved == before.bytes_reserved - held
    assert after.bytes_committed == before.bytes_committed - sum(map(len, datas.values()))
    refused(errors.UnknownJobError, C.NOT_FOUND, cl.list_versions, job)
    refused(errors.UnknownJobError, C.NOT_FOUND, cl.drop_job, job)
    refused(errors.UnknownJobError, C.NOT_FOUND, cl.open_shard, job, 0)
    # the id is free again, with a new world size
    assert cl.register_job(job, 1).latest_committed_version == 0
    assert write_shard(cl, job, 0, 1, b"x" * 10).committed


# -- 2. bad input ----------------------------------------------------------------------------
def test_malformed_manifests_on_adopt(dmn, cl):
    job = "badmf"
    datas = committed_job(cl, job)
    data = rnd(3 * BS + 10, 11)
    name = stage(cl, job, 0, 2, data)
    before = state_of(dmn, cl, job)
    refused_before = cl.stats().requests_refused
    n = len(data)

    def bad(version=2, **kw):
        return manifest(job, 0, version, data, **kw)

    def t(**kw):
        return pb.TensorEntry(**{"name": "x", "dtype": "uint8", "shape": [4], "offset": 0, "nbytes": 4, **kw})

    U64 = (1 << 64) - 1
    cases = [
        bad(job_id="bad/job"), bad(job_id="../x"), bad(job_id=""), bad(job_id="a" * 65),
        bad(version=0),
        bad(bs=5000), bad(bs=3 * BS), bad(bs=2048), bad(bs=0), bad(bs=1 << 31),
        bad(checksum_algo="crc32"),
        bad(payload_bytes=U64), bad(payload_bytes=1 << 62),
        bad(payload_bytes=os.path.getsize(shm.path_of(name)) + 1),  # larger than the segment
        bad(tensors=[t(offset=n - 3)]),  # runs past the end
        bad(tensors=[t(offset=n + 1, shape=[0], nbytes=0)]),
        bad(tensors=[t(offset=U64)]),
        bad(tensors=[t(offset=U64 - 3)]),  # offset + nbytes wraps to 0 in uint64
        bad(tensors=[t(offset=8, shape=[(1 << 61) - 1, 8], nbytes=(1 << 64) - 8)]),  # wraps too
        bad(tensors=[t(shape=[(1 << 63) - 1], nbytes=(1 << 63) - 1)]),
        bad(tensors=[t(dtype="float33")]), bad(tensors=[t(dtype="")]),
        bad(tensors=[t(dtype="float32", shape=[10], nbytes=39)]),  # length mismatch
        bad(tensors=[t(dtype="float32", shape=[10], nbytes=U64)]),
        bad(tensors=[t(shape=[-4], nbytes=4)]),
        bad(tensors=[t(name="")]),
    ]
    wrong_count = bad(checksums=True)
    wrong_count.block_checksums.append(1)
    cases.append(wrong_count)
    for m in cases:
        refused(errors.InvalidRequestError, C.INVALID_ARGUMENT, cl.adopt, name, m)
    # no manifest at all
    refused(errors.InvalidRequestError, C.INVALID_ARGUMENT, cl._call, "AdoptShard",
            pb.AdoptShardRequest(segment_name=name), match="manifest")
    # client checksums that do not match the segment's bytes
    m = bad(checksums=True)
    m.block_checksums[2] ^= 1
    refused(errors.ChecksumMismatchError, C.DATA_LOSS, cl.adopt, name, m, match="block")
    assert state_of(dmn, cl, job) == before
    assert cl.stats().requests_refused > refused_before
    assert_intact(cl, job, datas, 1)
    # the staging segment is still usable: the correct manifest (with checksums) commits
    r = cl.adopt(name, bad(checksums=True))
    assert r.committed and r.latest_committed_version == 2
    assert_intact(cl, job, {0: data}, 2)
    assert_serving(dmn, cl, job, datas, 3)


def test_unknown_job_rank_and_foreign_segment_names(dmn, cl):
    job = "unk"
    datas = committed_job(cl, job, ws=2)
    data = rnd(2 * BS, 12)
    name0 = stage(cl, job, 0, 2, data)
    name1 = stage(cl, job, 1, 2, data)
    committed_name = cl.open_shard(job, 0).segment_name
    before = state_of(dmn, cl, job)

    nf = (errors.UnknownJobError, C.NOT_FOUND)
    refused(*nf, cl.acquire_staging, "nosuchjob", 0, 2, 100, match="unknown job")
    refused(*nf, cl.adopt, name0, manifest("nosuchjob", 0, 2, data))
    refused(*nf, cl.commit, "nosuchjob", 1)
    refused(*nf, cl.list_versions, "nosuchjob")
    refused(*nf, cl.open_shard, "nosuchjob", 0)
    refused(*nf, cl.fetch_shard, "nosuchjob", 0)
    refused(*nf, cl.drop_job, "nosuchjob")
    refused(*nf, cl.push_shard, manifest("nosuchjob", 0, 2, data, checksums=True), data)
    for rank in (2, 3, 1 << 31):
        refused(*nf, cl.acquire_staging, job, rank, 2, 100, match="ranks 0..1")
        refused(*nf, cl.open_shard, job, rank, match="ranks 0..1")
        refused(*nf, cl.fetch_shard, job, rank, match="ranks 0..1")
        refused(*nf, cl.adopt, name0, manifest(job, rank, 2, data), match="ranks 0..1")
        refused(*nf, cl.push_shard, manifest(job, rank, 2, data, checksums=True), data)
    m = manifest(job, 0, 2, data)
    for wrong in ["../etc/passwd", "/etc/passwd", "/dev/shm/" + name0, "", name1, committed_name,
                  name0 + "x", name0.replace(".g", ".g9"), "snapshotd..x", "a" * 5000]:
        refused(errors.ConflictError, C.FAILED_PRECONDITION, cl.adopt, wrong, m,
                match="not the staging segment")
    # rank 1's staging segment offered as rank 0's, and a version that was never staged
    refused(errors.ConflictError, C.FAILED_PRECONDITION, cl.adopt, name0, manifest(job, 1, 2, data))
    refused(errors.ConflictError, C.FAILED_PRECONDITION, cl.adopt, name0, manifest(job, 0, 3, data))
    assert state_of(dmn, cl, job) == before
    assert_intact(cl, job, datas, 1)
    assert os.path.exists("/etc/passwd")
    assert_serving(dmn, cl, job, datas, 2)


def test_register_conflicts_and_stale_versions(dmn, cl):
    job = "stale"
    datas = committed_job(cl, job, ws=2, version=5)
    write_shard(cl, job, 0, 6, rnd(BS, 13))  # pending version 6 of rank 0
    before = state_of(dmn, cl, job)

    conflict = (errors.ConflictError, C.FAILED_PRECONDITION)
    # (another world size is a relaunch, not a refusal: tests/node/test_relayout.py)
    refused(errors.InvalidRequestError, C.INVALID_ARGUMENT, cl.register_job, job, 0)
    refused(errors.InvalidRequestError, C.INVALID_ARGUMENT, cl.register_job, "bad job", 1)
    refused(errors.InvalidRequestError, C.INVALID_ARGUMENT, cl.register_job, ".hidden", 1)
    for v in (5, 4, 1):
        refused(*conflict, cl.acquire_staging, job, 1, v, BS, match="not newer")
        d = rnd(BS, v)
        refused(*conflict, cl.push_shard, manifest(job, 1, v, d, checksums=True), d)
    refused(errors.InvalidRequestError, C.INVALID_ARGUMENT, cl.acquire_staging, job, 1, 0, BS)
    refused(*conflict, cl.acquire_staging, job, 0, 6, BS, match="already delivered")
    d = rnd(BS, 14)
    refused(*conflict, cl.push_shard, manifest(job, 0, 6, d, checksums=True), d)
    assert state_of(dmn, cl, job) == before
    assert_intact(cl, job, datas, 5)
    # rank 1 delivering version 6 commits it
    assert write_shard(cl, job, 1, 6, rnd(BS, 15)).committed
    assert_serving(dmn, cl, job, datas, 7)


def test_bad_pushes(dmn, cl):
    job = "badpush"
    datas = committed_job(cl, job)
    before = state_of(dmn, cl, job)
    data = rnd(3 * BS + 99, 21)
    good = manifest(job, 0, 2, data, checksums=True)

    def push(m, *chunks):
        return raw_push(cl, [pb.PushShardChunk(manifest=m)] + [pb.PushShardChunk(data=c) for c in chunks])

    inv = (errors.InvalidRequestError, C.INVALID_ARGUMENT)
    refused(*inv, push, good, data + b"x", match="more than")
    refused(*inv, push, good, data[:BS], data[BS:], b"\0" * BS, match="more than")
    refused(*inv, push, good, data[:-1], match="carried")
    refused(*inv, push, good, match="carried 0 bytes")
    bad_sum = manifest(job, 0, 2, data, checksums=True)
    bad_sum.block_checksums[3] += 1
    refused(errors.ChecksumMismatchError, C.DATA_LOSS, push, bad_sum, data, match="block")
    corrupted = bytearray(data)
    corrupted[BS + 1] ^= 0x40
    refused(errors.ChecksumMismatchError, C.DATA_LOSS, push, good, bytes(corrupted))
    refused(*inv, push, manifest(job, 0, 2, data), data)  # checksums are required
    refused(*inv, push, manifest(job, 0, 2, data, checksums=True, payload_bytes=(1 << 64) - 1), data)
    refused(*inv, push, manifest(job, 0, 2, data, checksums=True, bs=5000), data)
    refused(*inv, raw_push, cl, [], match="first message")
    refused(*inv, raw_push, cl, [pb.PushShardChunk(data=data)], match="first message")
    refused(*inv, raw_push, cl, [pb.PushShardChunk(manifest=good, data=data[:BS]),
                                 pb.PushShardChunk(manifest=good, data=data[BS:])], match="only the first")
    tensors = [pb.TensorEntry(name="t", dtype="float32", shape=[4], offset=(1 << 64) - 8, nbytes=16)]
    refused(*inv, push, manifest(job, 0, 2, data, checksums=True, tensors=tensors), data)
    assert state_of(dmn, cl, job) == before
    assert_intact(cl, job, datas, 1)
    # the same version pushed correctly afterwards commits (manifest and data in one message too)
    r = raw_push(cl, [pb.PushShardChunk(manifest=good, data=data[:100]), pb.PushShardChunk(data=data[100:])])
    assert r.committed and r.latest_committed_version == 2
    assert_intact(cl, job, {0: data}, 2)
    assert_serving(dmn, cl, job, datas, 3)


def test_stale_adopt_after_newer_commit_changes_nothing(dmn, cl):
    """Rank 0 staged v3, but v4 committed first: adopting v3 now is refused cleanly."""
    job = "lateadopt"
    datas = committed_job(cl, job, ws=2, size=2 * BS)
    write_shard(cl, job, 0, 2, rnd(2 * BS, 31))              # rank 0: v2 pending
    d3 = rnd(2 * BS, 32)
    late = stage(cl, job, 0, 3, d3)                          # rank 0: v3 staged (third slot)
    write_shard(cl, job, 1, 2, rnd(2 * BS, 33))              # v2 commits
    v4 = {r: rnd(2 * BS, 40 + r) for r in range(2)}
    for r in range(2):
        write_shard(cl, job, r, 4, v4[r])                    # v4 commits
    assert cl.list_versions(job).latest_committed_version == 4
    before = state_of(dmn, cl, job)
    refused(errors.ConflictError, C.FAILED_PRECONDITION, cl.adopt, late, manifest(job, 0, 3, d3),
            match="not newer")
    after = state_of(dmn, cl, job)
    assert after["bytes_committed"] == before["bytes_committed"]
    assert after["versions"] == before["versions"] and after["segments"] == before["segments"]
    assert after["manifests"] == before["manifests"]  # no manifest left for the refused v3
    assert_intact(cl, job, v4, 4)
    assert_serving(dmn, cl, job, v4, 5)


def test_push_overtaken_by_a_newer_version_cannot_touch_it(dmn, cl):
    """A slow push of v2 whose staging slot is reused for v3 must not write into v3."""
    job = "race"
    size = 8 * BS
    committed_job(cl, job, size=size)
    d2 = rnd(size, 51)
    gate, sent = threading.Event(), threading.Event()

    def msgs():
        yield pb.PushShardChunk(manifest=manifest(job, 0, 2, d2, checksums=True), data=d2[:BS])
        sent.set()  # the first message is on its way
        gate.wait(20)
        yield pb.PushShardChunk(data=d2[BS:])

    out = {}

    def run():
        try:
            out["resp"] = raw_push(cl, msgs())
        except errors.SnapshotdError as exc:
            out["err"] = exc

    th = threading.Thread(target=run)
    th.start()
    try:
        # v2 is in flight (a push is received whole and verified before it is staged)
        assert sent.wait(20)
        d3 = rnd(size, 52)
        assert write_shard(cl, job, 0, 3, d3).committed  # the trainer moved on
    finally:
        gate.set()
        th.join(30)
    assert_intact(cl, job, {0: d3}, 3)
    assert "err" in out, out
    assert out["err"].grpc_code == C.FAILED_PRECONDITION, out["err"]
    assert_serving(dmn, cl, job, {0: d3}, 4)


def test_memory_budget(daemon_factory):
    d = daemon_factory(budget="8MiB").start()
    cl = d.client()
    job = "budget"
    cl.register_job(job, 1)
    assert write_shard(cl, job, 0, 1, rnd(2 * MiB, 61)).committed
    v2 = rnd(2 * MiB, 62)
    assert write_shard(cl, job, 0, 2, v2).committed  # v1's segment is kept (FREE) for reuse
    cl.register_job("big", 1)
    before = state_of(d, cl, job)
    assert before["bytes_reserved"] == 4 * MiB
    ref0 = cl.stats().requests_refused

    ex = (errors.MemoryBudgetExceededError, C.RESOURCE_EXHAUSTED)
    # 2 MiB committed + 7 MiB > 8 MiB, even after giving up the FREE 2 MiB segment
    refused(*ex, cl.acquire_staging, job, 0, 3, 7 * MiB, match="budget")
    refused(*ex, cl.acquire_staging, job, 0, 3, 9 * MiB)
    refused(*ex, cl.acquire_staging, job, 0, 3, 1 << 63)
    refused(*ex, cl.acquire_staging, job, 0, 3, (1 << 64) - 1)
    big = pb.ShardManifest(job_id=job, rank=0, version=3, payload_bytes=16 * MiB,
                           block_size_bytes=16 * MiB, checksum_algo="xxh3_64", block_checksums=[1])
    refused(*ex, raw_push, cl, [pb.PushShardChunk(manifest=big, data=b"\0" * BS)])
    # another job: hopeless even if the FREE 2 MiB were given up, so it is kept
    refused(*ex, cl.acquire_staging, "big", 0, 1, 7 * MiB)
    refused(*ex, cl.acquire_staging, "big", 0, 1, 9 * MiB)
    assert state_of(d, cl, job) == before
    st = cl.stats()
    assert st.requests_refused == ref0 + 7
    assert st.bytes_reserved <= st.memory_budget_bytes == 8 * MiB
    assert_intact(cl, job, {0: v2}, 2)

    # what fits still works: 2 MiB committed + 6 MiB staged = 8 MiB
    v3 = rnd(6 * MiB, 63)
    assert write_shard(cl, job, 0, 3, v3).committed
    assert cl.stats().bytes_reserved <= 8 * MiB
    refused(*ex, cl.acquire_staging, job, 0, 4, 6 * MiB)  # 6 committed + 6 > 8
    assert cl.stats().bytes_reserved <= 8 * MiB
    assert_intact(cl, job, {0: v3}, 3)
    # a second job cannot squeeze past the budget either
    cl.register_job("other", 1)
    refused(*ex, cl.acquire_staging, "other", 0, 1, 3 * MiB)
    assert d.alive()
    assert write_shard(cl, "other", 0, 1, rnd(MiB, 64)).committed
    assert cl.stats().bytes_reserved <= 8 * MiB
    assert_intact(cl, job, {0: v3}, 3)


# -- 3. corruption ----------------------------------------------------------------------------
def test_corrupted_committed_segment_is_detected(dmn, cl):
    job = "corrupt"
    datas = committed_job(cl, job, size=4 * BS)
    name = cl.open_shard(job, 0).segment_name
    before = state_of(dmn, cl, job)
    ref0 = cl.stats().requests_refused
    seg = shm.open_segment(name, writable=True)
    try:
        seg.buf[2 * BS + 7] ^= 0xFF
        refused(errors.ChecksumMismatchError, C.DATA_LOSS, cl.open_shard, job, 0, match="blocks: 2")
        refused(errors.ChecksumMismatchError, C.DATA_LOSS, cl.fetch_shard, job, 0, match="blocks: 2")
        refused(errors.ChecksumMismatchError, C.DATA_LOSS, cl.fetch_shard, job, 0, 1)
        assert dmn.alive()
        assert cl.stats().requests_refused == ref0 + 3
        assert state_of(dmn, cl, job) == before
        seg.buf[2 * BS + 7] ^= 0xFF  # repaired: readable again
    finally:
        seg.close()
    assert_intact(cl, job, datas, 1)
    assert_serving(dmn, cl, job, datas, 2)


# -- 4. token ---------------------------------------------------------------------------------
def test_token_required_on_unix_socket_and_tcp(daemon_factory):
    d = daemon_factory(token="s3cret", tcp=True).start()
    port = d.info["tcp_port"]
    assert port
    good_unix = d.client()
    good_tcp = DaemonClient(f"127.0.0.1:{port}", token="s3cret", timeout_s=20)
    job = "tok"
    datas = committed_job(good_unix, job)
    before = state_of(d, good_unix, job)
    ref0 = good_unix.stats().requests_refused

    bad_clients = [
        DaemonClient.for_socket(d.socket, timeout_s=20),
        DaemonClient.for_socket(d.socket, token="wrong", timeout_s=20),
        DaemonClient.for_socket(d.socket, token="s3cret ", timeout_s=20),
        DaemonClient(f"127.0.0.1:{port}", timeout_s=20),
        DaemonClient(f"127.0.0.1:{port}", token="S3CRET", timeout_s=20),
    ]
    au = (errors.AuthenticationError, C.UNAUTHENTICATED)
    n = 0
    data = rnd(BS, 71)
    for i, bc in enumerate(bad_clients):
        msg = "missing" if i in (0, 3) else "wrong"
        refused(*au, bc.stats, match=msg)
        refused(*au, bc.register_job, "intruder", 1)
        refused(*au, bc.list_versions, job)
        refused(*au, bc.open_shard, job, 0)
        refused(*au, bc.fetch_shard, job, 0)
        refused(*au, bc.drop_job, job)
        refused(*au, bc.push_shard, manifest(job, 0, 2, data, checksums=True), data)
        n += 7
        bc.close()
    st = good_unix.stats()
    assert st.requests_refused == ref0 + n
    assert "intruder" not in [j.job_id for j in st.jobs]
    assert state_of(d, good_unix, job) == before
    assert_intact(good_unix, job, datas, 1)
    assert_intact(good_tcp, job, datas, 1)
    # a shard pushed over TCP with the token commits
    r = good_tcp.push_shard(manifest(job, 0, 2, data, checksums=True), data)
    assert r.committed
    assert_intact(good_unix, job, {0: data}, 2)

    for target in (f"unix:{d.socket}", f"127.0.0.1:{port}"):
        with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert good_unix.stats().requests_refused == ref0 + n  # health checks are not refused
    assert d.alive()
    good_tcp.close()


def test_tcp_without_token_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SNAPSHOTD_TOKEN", "SNAPSHOTD_TCP")}
    sock = tmp_path / "s.sock"
    for extra in ([], ["--token", ""]):
        p = subprocess.run(
            [sys.executable, "-m", "snapshotd.node", "serve", "--tcp", "127.0.0.1:0",
             "--node-id", "notoken", "--state-dir", str(tmp_path / "state"), "--socket", str(sock),
             "--memory-budget-bytes", "8MiB", "--ready-file", str(tmp_path / "ready.json"), *extra],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0
        assert "needs a token" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr, p.stderr
        assert not sock.exists() and not (tmp_path / "ready.json").exists()
    assert shm.list_segments("snapshotd.notoken.") == []


# -- 5. socket mode ------------------------------------------------------------------------------
def test_socket_file_is_private(dmn, cl):
    st = os.stat(dmn.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    job = "modes"
    committed_job(cl, job)
    for name in job_segments(dmn, job):
        assert stat.S_IMODE(os.stat(shm.path_of(name)).st_mode) == 0o600


# -- 6. restart ------------------------------------------------------------------------------------
def test_restart_after_sigkill(daemon_factory):
    d = daemon_factory().start()
    cl = d.client()
    job, solo = "restart", "solo"
    datas = committed_job(cl, job, ws=2, size=3 * BS + 5)
    write_shard(cl, job, 0, 2, rnd(4 * BS, 81))     # v2: pending (rank 0 delivered)
    stage(cl, job, 1, 2, rnd(4 * BS, 82))           # v2: rank 1 staged, not adopted
    cl.register_job(solo, 1)
    write_shard(cl, solo, 0, 1, rnd(BS, 83))
    solo_data = {0: rnd(BS, 84)}
    write_shard(cl, solo, 0, 2, solo_data[0])      # v1's segment stays behind as FREE
    committed = {cl.open_shard(job, r).segment_name for r in range(2)} | {cl.open_shard(solo, 0).segment_name}
    assert len(d.segments()) > len(committed)

    stray = f"snapshotd.{d.node_id}.ghost.r0.s0.g1"
    foreign = f"snapshotd.x{d.node_id}.ghost.r0.s0.g1"  # another daemon's prefix
    for n in (stray, foreign):
        shm.create(n, BS).close()
    try:
        d.kill(signal.SIGKILL)
        assert not d.alive()
        assert committed <= set(d.segments())  # the bytes outlive the daemon
        d.start()
        cl.close()
        cl = d.client()
        assert set(d.segments()) == committed
        assert os.path.exists(shm.path_of(foreign))
        manifests = sorted(os.listdir(os.path.join(d.state_dir, "manifests")))
        assert manifests == sorted(n + ".pb" for n in committed)

        lv = cl.list_versions(job)
        assert lv.latest_committed_version == 1
        assert [(v.version, v.committed, list(v.delivered_ranks)) for v in lv.versions] == [(1, True, [0, 1])]
        assert_intact(cl, job, datas, 1)
        assert_intact(cl, solo, solo_data, 2)
        assert cl.register_job(job, 2).latest_committed_version == 1
        st = cl.stats()
        assert st.bytes_committed == sum(map(len, datas.values())) + len(solo_data[0])
        assert sorted(j.job_id for j in st.jobs) == [job, solo]
        # work goes on: v2 again from both ranks
        assert_serving(d, cl, job, datas, 2)
        assert_serving(d, cl, solo, solo_data, 3)
        assert max(len([n for n in d.segments() if f".r{r}." in n and f".{job}." in n]) for r in range(2)) <= 3
    finally:
        shm.unlink(foreign)
        shm.unlink(stray)
        cl.close()
