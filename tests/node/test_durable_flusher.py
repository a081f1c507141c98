"""The durable flusher's parts in-process (snapshotd.node.durable, durable_dcp; the client's
payload rebuild): nodes' parts meet in one index, DCP's stock reader reads what they wrote
(sharded chunks, replicated state, DCP-written versions), retention, a capture that does
not verify is never flushed. Real files in a temporary folder; the store is a stand-in
for the daemon's ShardStore (what the flusher reads of it)."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from snapshotd.node import durable_dcp as dd
from snapshotd.node.durable import DurableConfig, DurableFlusher
from snapshotd.wire import durable_store as ds
from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb

JOB = "j"
BS = 4096


class FakeStore:
    """What the flusher reads of a ShardStore: one job, this node's ranks' shards."""

    def __init__(self, world_size: int, shards: dict, version: int, local_world_size=None):
        self.world, self.shards, self.version = world_size, shards, version
        self.lws = len(shards) if local_world_size is None else local_world_size

    def jobs_summary(self):
        return {JOB: {"committed": self.version, "world_size": self.world, "local_world_size": self.lws}}

    def committed_version(self, job):
        return self.version

    def local_shards(self, job, version):
        if version != self.version:
            return []
        return [(r, m, SimpleNamespace(buf=buf)) for r, (m, buf) in sorted(self.shards.items())]


def shard(rank: int, version: int, tensors: list, replicated: list = (), slice_=None, dp=()):
    """(manifest, payload) with ``replicated`` laid out first, then ``tensors``; entries
    (name, tensor[, global_shape, global_offset])."""
    parts, off = [], 0
    m = pb.ShardManifest(job_id=JOB, rank=rank, version=version, block_size_bytes=BS,
                         checksum_algo="xxh3_64", meta_json=json.dumps({"rank": rank}))

    def add(dst, entries, base):
        nonlocal off
        for e in entries:
            name, t = e[0], e[1]
            raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            off = -(-off // 64) * 64
            ent = dst.add(name=name, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                          offset=off - base, nbytes=len(raw))
            if len(e) > 2:
                ent.global_shape.extend(e[2])
                ent.global_offset.extend(e[3])
            parts.append((off, raw))
            off += len(raw)

    add(m.replicated_tensors, replicated, 0)
    m.replicated_bytes = m.slice_bytes = off
    add(m.tensors, tensors, 0)
    buf = np.zeros(max(off, 1), np.uint8)
    for o, raw in parts:
        buf[o:o + len(raw)] = np.frombuffer(raw, np.uint8)
    m.payload_bytes = off
    if slice_ is not None:  # stored sharded: this rank holds bytes [lo, hi) of the replicated payload
        lo, hi, total = slice_
        m.replicated_bytes, m.slice_offset, m.slice_bytes = total, lo, hi - lo
        m.dp_ranks.extend(dp)
    m.block_checksums.extend(mf.block_checksums(buf, m.payload_bytes, BS))
    return m, buf


def flusher(tmp_path, store, node: str, **kw) -> DurableFlusher:
    cfg = DurableConfig(url=str(tmp_path / "dur"), every_versions=1, **kw)
    return DurableFlusher(store, cfg, node)


def _flush(f: DurableFlusher) -> bool:
    f.poll_once(now=0.0)
    cap = f._pending.pop(JOB)
    return f.flush(cap)


def test_two_nodes_parts_meet_in_one_index_and_stock_dcp_reads_it(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    rep = torch.randn(5)
    rng = torch.arange(3, dtype=torch.int64)
    s0 = shard(0, 2, [("rng/torch", rng)], [("model/w", w[:2], [4, 3], [0, 0]), ("model/b", rep)])
    s1 = shard(1, 2, [("rng/torch", rng + 1)], [("model/w", w[2:], [4, 3], [2, 0]), ("model/b", rep * 2)])
    a = flusher(tmp_path, FakeStore(2, {0: s0}, 2), "nA")
    b = flusher(tmp_path, FakeStore(2, {1: s1}, 2), "nB")
    assert _flush(a) is False  # rank 1's part is not there yet: no index, not complete
    root = str(tmp_path / "dur")
    assert ds.complete_versions(ds.open_store(root), JOB) == []
    assert _flush(b) is True  # the last node writes the index naming the set
    idx = ds.verify_version(ds.open_store(root), JOB, 2)
    assert idx["nodes"] == ["nA", "nB"] and set(idx["ranks"]) == {"0", "1"}
    assert set(idx["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # a second node completing the same version again is idempotent
    assert a.try_complete(JOB, 2) is True
    vdir = os.path.join(root, JOB, ds.version_dir(2))
    got = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(5)},
           "rank0": {"rng": {"torch": torch.zeros(3, dtype=torch.int64)}},
           "rank1": {"model": {"b": torch.zeros(5)}, "rng": {"torch": torch.zeros(3, dtype=torch.int64)}}}
    dcp.load(got, checkpoint_id=vdir)
    assert torch.equal(got["model"]["w"], w)  # two ranks' chunks of one sharded tensor
    assert torch.equal(got["model"]["b"], rep)  # rank 0's replicated state, top level
    assert torch.equal(got["rank1"]["model"]["b"], rep * 2)  # "all": rank 1's own copy too
    assert torch.equal(got["rank1"]["rng"]["torch"], rng + 1)
    # the client rebuilds rank 1's payload from the files, byte for byte where tensors lie
    from snapshotd_client.durable import build_payload

    m1, buf1 = build_payload(ds.open_store(root), JOB, 2, idx, 1)
    for e_new, e_old in zip(list(m1.replicated_tensors) + list(m1.tensors),
                            list(s1[0].replicated_tensors) + list(s1[0].tensors)):
        assert bytes(buf1[e_new.offset:e_new.offset + e_new.nbytes]) == \
            bytes(s1[1][e_old.offset:e_old.offset + e_old.nbytes]), e_old.name


def test_replicated_rank0_mode_and_sharded_slices(tmp_path):
    from snapshotd_client.durable import build_payload

    rep = torch.arange(40, dtype=torch.float32)
    s0 = shard(0, 3, [("step", torch.tensor(3))], [("model/p", rep)])
    s1 = shard(1, 3, [("step", torch.tensor(3))], [("model/p", rep)])
    f = flusher(tmp_path, FakeStore(2, {0: s0, 1: s1}, 3), "n", replicated="rank0")
    assert _flush(f) is True
    root = ds.open_store(str(tmp_path / "dur"))
    idx = ds.verify_version(root, JOB, 3)
    assert not any(it["fqn"].startswith("rank1.model") for it in idx["ranks"]["1"]["items"])
    m1, buf1 = build_payload(root, JOB, 3, idx, 1)  # rank 1 takes rank 0's copy
    e = m1.replicated_tensors[0]
    assert bytes(buf1[e.offset:e.offset + e.nbytes]) == rep.numpy().tobytes()
    # shard_replicated: each rank holds a slice of the replicated payload; the restore gathers
    full = rep.numpy().tobytes()
    half = 64
    sl = []
    for r, (lo, hi) in enumerate(((0, half), (half, len(full)))):
        m, _ = shard(r, 4, [("step", torch.tensor(4))], [("model/p", rep)])
        part = torch.frombuffer(bytearray(full[lo:hi]), dtype=torch.uint8)
        m2, buf = shard(r, 4, [("step", torch.tensor(4 + r))], [("__slice", part)],
                        slice_=(lo, hi, len(full)), dp=(0, 1))
        del m2.replicated_tensors[:]
        m2.replicated_tensors.extend(m.replicated_tensors)
        sl.append((m2, buf))
    f2 = flusher(tmp_path, FakeStore(2, {0: sl[0], 1: sl[1]}, 4), "n")
    assert _flush(f2) is True
    idx4 = ds.verify_version(root, JOB, 4)
    assert any(it["fqn"] == f"rank1.{dd.SLICE_NAME}" for it in idx4["ranks"]["1"]["items"])
    m, buf = build_payload(root, JOB, 4, idx4, 1)
    e = m.replicated_tensors[0]
    assert m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes == len(full)
    assert bytes(buf[e.offset:e.offset + e.nbytes]) == full
    t = m.tensors[0]
    assert bytes(buf[t.offset:t.offset + t.nbytes]) == torch.tensor(5).numpy().tobytes()


def test_retention_keeps_the_newest_complete_and_drops_dead_flushes(tmp_path):
    root = ds.open_store(str(tmp_path / "dur"))
    for v in (2, 3, 4):
        f = flusher(tmp_path, FakeStore(1, {0: shard(0, v, [("x", torch.ones(3) * v)])}, v), "n", keep=2)
        if v == 3:  # a flush that died before its index: never complete
            f.poll_once(now=0.0)
            cap = f._pending.pop(JOB)
            root.write_bytes(f"{JOB}/{ds.version_dir(3)}/{ds.rank_file(0)}", b"partial")
            continue
        assert _flush(f) is True
    assert ds.complete_versions(root, JOB) == [2, 4]
    assert ds.versions(root, JOB) == [2, 3, 4]  # keep 2: nothing deleted yet
    f = flusher(tmp_path, FakeStore(1, {0: shard(0, 6, [("x", torch.ones(3))])}, 6), "n", keep=2)
    root.write_bytes(f"{JOB}/{ds.version_dir(7)}/{ds.rank_file(0)}", b"in flight")  # newer, incomplete
    assert _flush(f) is True
    assert ds.complete_versions(root, JOB) == [4, 6]
    assert ds.versions(root, JOB) == [4, 6, 7]  # v2 and the dead v3 gone; v7 may be in progress
    assert json.loads(root.read_bytes(f"{JOB}/{ds.LATEST}"))["version"] == 6
    assert cap.version == 3


def test_a_capture_that_does_not_verify_is_never_flushed(tmp_path):
    m, buf = shard(0, 2, [("x", torch.arange(2000, dtype=torch.float32))])
    buf[100] ^= 0xFF  # corrupted in shared memory after it was checksummed
    f = flusher(tmp_path, FakeStore(1, {0: (m, buf)}, 2), "n")
    f.poll_once(now=0.0)
    assert JOB not in f._pending and f.stats["abandoned"] == 1
    buf[100] ^= 0xFF
    f2 = flusher(tmp_path, FakeStore(1, {0: (m, buf)}, 2), "n")
    f2.poll_once(now=0.0)
    assert f2._pending[JOB].version == 2


def test_due_versions(tmp_path):
    f = flusher(tmp_path, FakeStore(1, {}, 1), "n")
    f.cfg.every_versions = 5
    info = {"world_size": 2, "local_world_size": 1}
    assert [v for v in range(1, 13) if f._due(JOB, v, info, 0.0) and not f._last.update({JOB: (v, 0.0)})] \
        == [5, 10]
    f._last.clear()
    assert f._due(JOB, 7, info, 0.0)  # a skipped multiple: the first version of the window
    f.cfg.every_versions, f.cfg.every_s = 0, 30.0
    f._last[JOB] = (7, 100.0)
    assert not f._due(JOB, 8, info, 200.0)  # by time: only a job whose ranks are all here
    single = {"world_size": 2, "local_world_size": 2}
    assert not f._due(JOB, 8, single, 110.0) and f._due(JOB, 8, single, 131.0)


def test_bad_config_is_refused():
    for kw, msg in (({}, "every"), ({"every_versions": 1, "keep": 0}, "keep"),
                    ({"every_versions": -1}, ">= 0"), ({"every_versions": 1, "replicated": "x"}, "replicated")):
        with pytest.raises(ValueError, match=msg):
            DurableConfig(url="/tmp/x", **kw).check()


def test_dcp_written_version_across_two_nodes(tmp_path):
    """A SnapshotdWriter version on two nodes: the metadata rank's node shares the DCP
    metadata beside the parts, the other waits for it; stock DCP reads the result. The
    node's decoder reads what the client's codec (dcp_codec) writes."""
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                       Metadata, MetadataIndex, TensorProperties,
                                                       TensorStorageMetadata)
    import io

    from snapshotd_client.dcp_codec import SnapshotdStorageInfo, encode_metadata

    w = torch.randn(6, 2)
    blob = io.BytesIO()
    torch.save({"lr": 0.1}, blob)
    items = {0: [("w", w[:3], (0, 0))], 1: [("w", w[3:], (3, 0)), ("cfg", blob.getvalue(), None)]}
    sdm = {"w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([6, 2]),
                                      [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([3, 2])),
                                       ChunkStorageMetadata(torch.Size([3, 0]), torch.Size([3, 2]))]),
           "cfg": BytesStorageMetadata()}
    storage, shards = {}, {}
    for r, its in items.items():
        buf, off = bytearray(), 0
        for i, (fqn, x, offs) in enumerate(its):
            raw = x.numpy().tobytes() if torch.is_tensor(x) else x
            off = -(-len(buf) // 64) * 64
            buf += b"\0" * (off - len(buf)) + raw
            key = MetadataIndex(fqn, None if offs is None else torch.Size(offs), 0 if offs == (0, 0) else (1 if offs else None))
            storage[key] = SnapshotdStorageInfo(r, off, len(raw), "float32" if torch.is_tensor(x) else None,
                                                tuple(x.shape) if torch.is_tensor(x) else None)
        shards[r] = np.frombuffer(bytes(buf), np.uint8).copy()
    md = Metadata(state_dict_metadata=sdm, planner_data={"w": ("w",), "cfg": ("cfg",)}, storage_data=storage)
    heads = {0: {"format": dd.DCP_FORMAT, "metadata_rank": 0, "world_size": 2,
                 "metadata": json.loads(encode_metadata(md))},
             1: {"format": dd.DCP_FORMAT, "metadata_rank": 0, "world_size": 2}}
    mans = {}
    for r in (0, 1):
        m = pb.ShardManifest(job_id=JOB, rank=r, version=5, payload_bytes=len(shards[r]),
                             block_size_bytes=BS, checksum_algo="xxh3_64", meta_json=json.dumps(heads[r]))
        m.block_checksums.extend(mf.block_checksums(shards[r], len(shards[r]), BS))
        mans[r] = (m, shards[r])
    a = flusher(tmp_path, FakeStore(2, {0: mans[0]}, 5), "nA")
    b = flusher(tmp_path, FakeStore(2, {1: mans[1]}, 5), "nB")
    b.poll_once(now=0.0)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", b.flush(b._pending.pop(JOB))))
    t.start()  # waits for the metadata rank's node
    assert _flush(a) is False
    t.join(60)
    assert out["b"] is True
    vdir = os.path.join(str(tmp_path / "dur"), JOB, ds.version_dir(5))
    got = {"w": torch.zeros(6, 2), "cfg": {}}
    dcp.load(got, checkpoint_id=vdir)
    assert torch.equal(got["w"], w) and got["cfg"] == {"lr": 0.1}
    assert ds.read_index(ds.open_store(str(tmp_path / "dur")), JOB, 5)["kind"] == "dcp"


def test_a_flushed_captures_buffer_serves_the_next_capture_then_is_freed(tmp_path):
    """The next capture of the job copies into the last flushed one's buffer (no fresh
    allocation), never into one still in use, and the flushed bytes are the new version's;
    unused for spare_s, the spare is freed."""
    w5, w6 = torch.arange(3000, dtype=torch.float32), -torch.arange(3000, dtype=torch.float32)
    store = FakeStore(1, {0: shard(0, 5, [], [("model/w", w5)])}, 5)
    f = flusher(tmp_path, store, "n", spare_s=30.0)
    a = f.capture(JOB, 5, 1)
    first = a.shards[0][2]
    assert f.flush(a) is True
    store.shards, store.version = {0: shard(0, 6, [], [("model/w", w6)])}, 6
    b = f.capture(JOB, 6, 1)  # a is still held (not given back): a fresh buffer
    assert not np.shares_memory(b.shards[0][2], first)
    f.give_back(a)  # a is done with: its buffer waits for the job's next capture
    c = f.capture(JOB, 6, 1)
    reused = c.shards[0][2]
    assert np.shares_memory(reused, first)
    assert f.flush(c) is True
    got = {"model": {"w": torch.zeros(3000)}}
    dcp.load(got, checkpoint_id=os.path.join(str(tmp_path / "dur"), JOB, ds.version_dir(6)))
    assert torch.equal(got["model"]["w"], w6)  # the new version's bytes, not the old buffer's
    from torch.utils.serialization import config

    assert config.save.compute_crc32  # the flush's torch.save without CRC32 did not leak out
    f.give_back(c)
    assert f.free_spares() == 1  # kept for the next capture...
    assert f.free_spares(now=time.monotonic() + 31.0) == 0  # ...until unused for spare_s
    d = f.capture(JOB, 6, 1)
    assert not np.shares_memory(d.shards[0][2], reused)
