"""ShardStore and its parts, in-process: the facade forwards to TrainerStore, ClusterView,
StoreState and PayloadVerifier; block_reader walks node blocks with core.blockmap; a
restarted store re-adopts committed shards and aux segments."""

from __future__ import annotations

import os
import random

import pytest
import xxhash

from snapshotd.wire import shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import ChecksumMismatchError, UnknownJobError, VersionNotFoundError
from snapshotd.node.store import ShardStore
from snapshotd.node.store_cluster import ClusterView

BS = 4096


@pytest.fixture
def make_store(tmp_path):
    instance = f"t{os.getpid()}x{random.randrange(1 << 30)}"
    stores = []

    def make(cluster_mode: bool = False, budget: int = 64 << 20) -> ShardStore:
        s = ShardStore("n0", str(tmp_path / "state"), budget, cluster_mode=cluster_mode,
                       instance=instance)
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()
    for name in shm.list_segments(f"snapshotd.{instance}."):
        shm.unlink(name)


def deliver(store: ShardStore, job: str, rank: int, version: int, payload: bytes):
    name, _ = store.acquire_staging(job, rank, version, len(payload))
    seg = shm.open_segment(name, writable=True)
    seg.buf[:len(payload)] = payload
    seg.close()
    m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=len(payload),
                         block_size_bytes=BS, checksum_algo="xxh3_64")
    return store.adopt(name, m)


def test_single_node_commit_restore_and_restart(make_store):
    store = make_store()
    data = {r: random.Random(r).randbytes(3 * BS + 17 * r) for r in range(2)}
    assert store.register_job("j", 2) == 0
    assert deliver(store, "j", 0, 5, data[0]) == (False, 0)
    assert deliver(store, "j", 1, 5, data[1]) == (True, 5)
    assert store.commit("j", 5) == (True, [], 5)
    assert store.bytes_committed() == sum(len(d) for d in data.values())
    store.close()
    again = make_store()  # a restarted daemon re-adopts the committed version
    assert again.register_job("j", 2) == 5
    for r, d in data.items():
        _, m, seg = again.committed_shard("j", r)
        assert bytes(seg.buf[:m.payload_bytes]) == d
    assert again.stats()["jobs"][0]["segments"] == 2


def test_facade_forwards_counters_and_hook(make_store):
    store = make_store(cluster_mode=True)
    calls = []
    store.commit_hook = lambda job, v: calls.append((job, v))
    assert store.trainer.commit_hook is store.commit_hook
    before = store.requests_refused
    store.requests_refused += 1  # the service counts what the store never saw
    with pytest.raises(UnknownJobError):
        store.commit("nope", 1)
    assert store.requests_refused == before + 2 == store.stats()["requests_refused"]
    store.register_job("j", 1)
    assert deliver(store, "j", 0, 3, b"x" * 10) == (False, 0)  # cluster mode: not yet
    assert calls == [("j", 3)] and store.committed_version("j") == 0
    store.commit_version("j", 3)
    assert store.committed_version("j") == 3
    assert isinstance(store.cluster_view, ClusterView)
    assert store.jobs_summary() == {"j": {"committed": 3, "world_size": 1, "local_world_size": 1}}


def test_block_reader_walks_ranks_pads_and_checks(make_store):
    store = make_store(cluster_mode=True)
    store.register_job("j", 2)
    data = {0: random.Random(0).randbytes(2 * BS + 100), 1: random.Random(1).randbytes(BS)}
    for r, d in data.items():
        deliver(store, "j", r, 7, d)
    read = store.block_reader("j", 7, BS, verify=True)
    node = data[0][:2 * BS] + data[0][2 * BS:] + bytes(BS - 100) + data[1]
    for j in range(4):
        assert bytes(read(j)) == node[j * BS:(j + 1) * BS]
    with pytest.raises(IndexError, match="4 blocks"):
        read(4)
    checked = store.block_reader("j", 7, BS, with_checksum=True)
    blk, c = checked(1)
    assert c == xxhash.xxh3_64_intdigest(bytes(blk))
    assert checked(2)[1] is None  # the padded last block of rank 0
    _, _, seg = store.local_shards("j", 7)[1]
    seg.buf[5] ^= 0xFF  # rank 1's only block, node block 3
    with pytest.raises(ChecksumMismatchError, match="rank 1: data block 0"):
        read(3)
    with pytest.raises(ChecksumMismatchError):
        store.verify_shard("j", 1, 7)
    m = store.local_shards("j", 7)[1][1]
    with pytest.raises(ChecksumMismatchError):
        store.verify_payload(seg.buf, m, "test copy")
    with pytest.raises(VersionNotFoundError):
        store.block_reader("j", 8, BS)


def test_aux_segments_count_and_survive_a_restart(make_store):
    store = make_store(cluster_mode=True)
    name, seg = store.create_aux("j.parity.x", 3 * BS)
    assert store.bytes_reserved() == 3 * BS and store.aux_names() == [name]
    seg.buf[:4] = b"abcd"
    store.close()
    again = make_store(cluster_mode=True)
    assert again.aux_names() == [name] and bytes(again.aux(name).buf[:4]) == b"abcd"
    again.release_aux(name)
    assert again.aux_names() == [] and again.bytes_reserved() == 0
