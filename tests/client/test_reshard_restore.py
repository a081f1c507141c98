"""``Snapshotter.restore()`` at another world size for data-parallel-replicated state
(stored whole on each rank, or as ``shard_replicated=True`` slices), the per-rank state
rule (new rank r takes old rank r mod W_old's RNG and extra state), and the daemon's
side: a job relaunched at another size registers, its old layout stays readable until a
version of the new one commits (then its segments go), and two runs of different sizes
writing one version get a ConflictError. One real daemon; the ranks are Snapshotters in
this process (no process group: each rank's verdict is its daemon's).
"""

from __future__ import annotations

import copy

import pytest
import torch

from snapshotd.wire import errors
from snapshotd_client.snapshotter import Snapshotter

JOB = "reshard"


def trained(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 7))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for i in range(2):
        m(torch.randn(5, 24)).sum().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def snap(daemon, model, opt, rank, world, **kw):
    return Snapshotter(model, opt, job_id=JOB, socket_path=daemon.socket, rank=rank,
                       world_size=world, on_daemon_unavailable="raise", timeout_s=30,
                       extra_state={"tag": f"rank{rank}"}, **kw)


def same_state(a_model, a_opt, b_model, b_opt) -> None:
    for (k, x), (_, y) in zip(a_model.state_dict().items(), b_model.state_dict().items()):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k
    sa, sb = a_opt.state_dict(), b_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


def save_at(daemon, world: int, version: int, **kw):
    """Every rank of ``world`` saves ``version`` (DP replicas of one model), each rank
    with its own RNG state; returns (model, optimizer, {rank: torch RNG state})."""
    model, opt = trained()
    rngs = {}
    for r in range(world):
        s = snap(daemon, copy.deepcopy(model), copy.deepcopy(opt), r, world, **kw)
        torch.manual_seed(500 + r)
        rngs[r] = torch.get_rng_state()
        assert s.save(version).result(30) is not None
        s.close()
    return model, opt, rngs


@pytest.mark.parametrize("sharded", [False, True], ids=["whole", "shard_replicated"])
def test_restore_at_fewer_and_more_ranks(daemon, sharded):
    model, opt, rngs = save_at(daemon, 2, 1, shard_replicated=sharded)
    cl = daemon.client()
    assert cl.list_versions(JOB).latest_committed_version == 1

    for world in (1, 3):
        for r in range(world):
            m2, o2 = trained(seed=9)  # other weights: the restore must replace them
            s = snap(daemon, m2, o2, r, world, shard_replicated=sharded)
            s.extra_state["tag"] = None
            torch.manual_seed(12345)
            assert s.restore() == 1
            assert (s.restored_method, s.restored_from_world_size) == ("resharded", 2)
            same_state(model, opt, m2, o2)
            home = r % 2  # the documented rule: new rank r takes old rank r mod W_old's
            assert torch.equal(torch.get_rng_state(), rngs[home]), (world, r)
            assert s.extra_state["tag"] == f"rank{home}"
            s.close()
    cl.close()


def test_saving_at_the_new_size_retires_the_old_layout(daemon):
    save_at(daemon, 3, 1)
    cl = daemon.client()
    old = [n for n in daemon.segments() if f"{JOB}.r2." in n]
    assert old
    m2, o2 = trained(seed=9)
    s = snap(daemon, m2, o2, 0, 1)
    assert s.restore() == 1 and s.restored_method == "resharded"
    # the old ranks stay readable until a version of the new layout commits
    assert cl.open_shard(JOB, 2, 1).manifest.rank == 2
    assert s.save(2).result(30).committed
    assert s.save(3).result(30).committed  # the next save releases the old ranks' segments
    assert [n for n in daemon.segments() if f"{JOB}.r1." in n or f"{JOB}.r2." in n] == []
    with pytest.raises(errors.UnknownRankError):
        cl.open_shard(JOB, 2, 3)
    s.close()
    m3, o3 = trained(seed=10)
    s = snap(daemon, m3, o3, 0, 1)
    assert s.restore() == 3 and s.restored_method == "exact"
    same_state(m2, o2, m3, o3)
    s.close()
    cl.close()


def test_two_runs_of_different_sizes_writing_one_version_conflict(daemon):
    cl = daemon.client()
    cl.register_job(JOB, 2)
    cl.acquire_staging(JOB, 0, 5, 64)  # a run at world size 2 is writing version 5
    cl.register_job(JOB, 1)  # another run registers the same job id at world size 1
    with pytest.raises(errors.ConflictError, match="world_size 2 and now at world_size 1"):
        cl.acquire_staging(JOB, 0, 5, 64)
    with pytest.raises(errors.UnknownRankError, match="world_size 1"):
        cl.acquire_staging(JOB, 1, 5, 64)  # the size-2 run's rank 1 is refused too
    cl.close()


# -- the covering reads, on synthetic shards (no daemon) -----------------------------------

def _shards(rows_per_rank: int, ranks: int, cols: int = 4):
    """An [rows_per_rank * ranks, cols] float32 tensor stored as Shard(0) chunks, one per
    rank: {rank: _Source}, and the whole tensor."""
    from snapshotd.wire._proto import snapshotd_pb2 as pb
    from snapshotd_client.reshard import _Source

    whole = torch.arange(rows_per_rank * ranks * cols, dtype=torch.float32).view(-1, cols)
    out = {}
    for r in range(ranks):
        chunk = whole[r * rows_per_rank:(r + 1) * rows_per_rank].contiguous()
        m = pb.ShardManifest(job_id=JOB, rank=r, version=4, replicated_bytes=chunk.numel() * 4,
                             slice_offset=0, slice_bytes=chunk.numel() * 4)
        m.replicated_tensors.add(name="model/w", dtype="float32", shape=list(chunk.shape), offset=0,
                                 nbytes=chunk.numel() * 4, global_shape=list(whole.shape),
                                 global_offset=[r * rows_per_rank, 0])
        out[r] = _Source(r, bytearray(chunk.numpy().tobytes()), m)
    return out, whole


def test_a_reshard_copies_only_the_covering_elements(monkeypatch):
    from snapshotd_client import reshard

    sources, whole = _shards(2, 4)  # saved by 4 ranks, 2 rows each
    rs = reshard.Reshard(None, None, JOB, 1, 2)  # new rank 1 of 2: rows 3..6 (a made-up box)
    rs.sources, rs.old_world = sources, 4
    monkeypatch.setattr(reshard, "_local_box", lambda spec: ((3, 4), (3, 0)))
    monkeypatch.setattr(reshard, "_dtensor_cls", lambda: type("D", (), {
        "from_local": staticmethod(lambda t, *a, **k: t)}))
    e = sources[1].m.replicated_tensors[0]
    got = rs._assemble("model/w", e, ("mesh", ("Shard(0)",), tuple(whole.shape)))
    assert torch.equal(got, whole[3:6])
    assert rs.bytes_copied == 3 * 4 * 4  # rows 3, 4, 5 only: not the 3 chunks they lie in

    rs.bytes_copied = 0
    whole_again = rs._assemble("model/w", e, None)  # no live DTensor: the whole tensor
    assert torch.equal(whole_again, whole) and rs.bytes_copied == whole.numel() * 4


def test_chunks_that_do_not_cover_the_new_chunk_are_a_clear_error(monkeypatch):
    from snapshotd.wire.errors import SnapshotdError
    from snapshotd_client import reshard

    sources, whole = _shards(2, 4)
    del sources[2]  # rows 4..5 are nowhere
    rs = reshard.Reshard(None, None, JOB, 0, 1)
    rs.sources, rs.old_world = sources, 4
    with pytest.raises(SnapshotdError, match=r"do not cover the part \[0, 0\]\+\[8, 4\]"):
        rs._assemble("model/w", sources[0].m.replicated_tensors[0], None)


def test_stored_world_size_from_the_meta():
    from snapshotd.wire._proto import snapshotd_pb2 as pb
    from snapshotd_client.reshard import stored_world_size

    assert stored_world_size(pb.ShardManifest(meta_json='{"world_size": 4}'), 2) == 4
    for bad in ("", "{}", '{"world_size": 0}', '{"world_size": "4"}', "[1]", "not json"):
        assert stored_world_size(pb.ShardManifest(meta_json=bad), 2) == 2  # older snapshots


def test_a_remote_chunk_is_read_by_its_covering_blocks_only(monkeypatch):
    """Sources on other nodes (read by ranged fetches): a box of the new chunk fetches only
    the checksum blocks from each piece's first element to its last, each block once,
    and the strided piece comes back exact."""
    from snapshotd_client import reshard

    sources, whole = _shards(2, 4, cols=6)  # [8, 6] float32: 24-byte rows, 48-byte chunks
    calls = []
    for r, src in list(sources.items()):
        m = src.m
        m.block_size_bytes, m.payload_bytes = 16, m.replicated_bytes
        raw = bytes(whole[2 * r:2 * r + 2].numpy().tobytes())

        def fetch(offset, length, r=r, raw=raw):
            assert offset % 16 == 0 and (length % 16 == 0 or offset + length == len(raw))
            calls.append((r, offset, length))
            return raw[offset:offset + length], length

        sources[r] = reshard._Source(r, None, m, fetch)
    rs = reshard.Reshard(None, None, JOB, 1, 2)
    rs.sources, rs.old_world = sources, 4
    monkeypatch.setattr(reshard, "_local_box", lambda spec: ((4, 3), (3, 2)))  # rows 3..6, cols 2..4
    monkeypatch.setattr(reshard, "_dtensor_cls", lambda: type("D", (), {
        "from_local": staticmethod(lambda t, *a, **k: t)}))
    e = sources[1].m.replicated_tensors[0]
    got = rs._assemble("model/w", e, ("mesh", ("Shard(0)",), tuple(whole.shape)))
    assert torch.equal(got, whole[3:7, 2:5])
    # chunk 1 row 1 cols 2..4: bytes 32..44 -> block 2; chunk 2 rows 0-1 cols 2..4: bytes
    # 8..44 -> blocks 0..2; chunk 3 row 0 cols 2..4: bytes 8..20 -> blocks 0..1
    assert sorted(calls) == [(1, 32, 16), (2, 0, 48), (3, 0, 32)]
    calls.clear()
    assert torch.equal(rs._assemble("model/w", e, ("mesh", ("Shard(0)",), tuple(whole.shape))),
                       whole[3:7, 2:5])
    assert calls == []  # each block once
