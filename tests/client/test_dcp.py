"""torch.distributed.checkpoint through snapshotd: the same assertions for DCP's own
FileSystemWriter/FileSystemReader and for SnapshotdWriter/SnapshotdReader on a real daemon.

Cases adapted from PyTorch's test/distributed/checkpoint (torch 2.13):
test_file_system_checkpoint_cpu.py TestDistributedStateDictSaveLoad.test_read_write_only_tensor
(tensors + bytes round trip), test_dtensor_resharding.py (DTensor Shard(0) saved at 2 ranks,
loaded at 1, and the "resharding with empty shard" case: a 1-row tensor over 2 ranks),
test_state_dict.py (model + optimizer through get_state_dict / set_state_dict) and
test_save_load_api.py / async_save with the THREAD executor.

Multi-rank saves and loads run as real gloo processes (this file run as a script:
``save`` / ``load``); the cluster case runs a 3-node local cluster (tests/clusterkit.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BACKENDS = ["fs", "snapshotd"]


# -- the two storages behind one interface ------------------------------------------------------
def make_writer(kind: str, where: dict, name: str, rank: int = 0, **kw):
    """``where``: {"fs": dir, "socket": path} or, for a cluster, {"sockets": [one per rank],
    "local_world_size": 1}."""
    if kind == "fs":
        return dcp.FileSystemWriter(os.path.join(where["fs"], name))
    from snapshotd_client.dcp import SnapshotdWriter

    if "sockets" in where:
        kw.update(local_world_size=where["local_world_size"])
    socket = where["sockets"][rank] if "sockets" in where else where["socket"]
    return SnapshotdWriter(job_id=f"dcp-{name}", socket_path=socket, **kw)


def make_reader(kind: str, where: dict, name: str, **kw):
    if kind == "fs":
        return dcp.FileSystemReader(os.path.join(where["fs"], name))
    from snapshotd_client.dcp import SnapshotdReader

    return SnapshotdReader(job_id=f"dcp-{name}", socket_path=where["socket"], **kw)


def full_tensors() -> dict:
    """The global tensors every rank derives the same way (bit-identical on every run)."""
    g = torch.Generator().manual_seed(1234)
    return {"w": torch.randn(8, 6, generator=g), "col": torch.randn(4, 6, generator=g).to(torch.bfloat16),
            "uneven": torch.randn(5, 3, generator=g).double(), "tiny": torch.arange(4.0).view(1, 4),
            "rep": torch.randint(0, 1 << 30, (3, 3), generator=g), "plain": torch.randn(7, generator=g)}


def save_at_world(rank: int, world: int, init_file: str, where: dict) -> None:
    """One rank of the multi-rank save (run in its own process)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        f = full_tensors()
        sd = {"w": distribute_tensor(f["w"], mesh, [Shard(0)]),
              "col": distribute_tensor(f["col"], mesh, [Shard(1)]),
              "uneven": distribute_tensor(f["uneven"], mesh, [Shard(0)]),
              "tiny": distribute_tensor(f["tiny"], mesh, [Shard(0)]),  # rank 1 holds no rows
              "rep": distribute_tensor(f["rep"], mesh, [Replicate()]),
              "plain": f["plain"], "step": 7, "nested": {"a": [1, "x"], "b": b"\x00\xff"}}
        only0 = {"only0": f["plain"] * 2} if rank == 0 else {}  # rank 1: an empty plan
        for kind in where.get("kinds", BACKENDS):
            dcp.save(sd, storage_writer=make_writer(kind, where, "dt", rank))
            dcp.save(only0, storage_writer=make_writer(kind, where, "emptyrank", rank))
    finally:
        dist.destroy_process_group()


def load_at_world(rank: int, world: int, init_file: str, where: dict) -> None:
    """One rank of a load at ``world`` ranks into Shard(0) DTensors: asserts bit-identity."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        f = full_tensors()
        for kind in BACKENDS:
            out = {k: distribute_tensor(torch.zeros_like(f[k]), mesh, [Shard(0)])
                   for k in ("w", "col", "uneven", "tiny")}
            dcp.load(out, storage_reader=make_reader(kind, where, "dt"))
            for k, v in out.items():
                assert torch.equal(v.full_tensor(), f[k]), (kind, k)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: str, world: int, where: dict, tmp_path) -> None:
    init = str(tmp_path / f"pg-{fn}-{world}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, fn, str(r), str(world), init, json.dumps(where)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    outs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} of {fn} at {world} ranks failed:\n{out[-4000:]}"


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon_m(tmp_path_factory):
    """One daemon for the whole module (each test uses its own job ids): starting one per
    test would cost more than the tests."""
    from conftest import DaemonProcess
    from snapshotd.wire import shm

    d = DaemonProcess(tmp_path_factory.mktemp("dcpd")).start()
    try:
        yield d
    finally:
        d.kill()
        for name in d.segments():
            shm.unlink(name)


@pytest.fixture
def where(daemon_m, tmp_path) -> dict:
    return {"fs": str(tmp_path / "fs"), "socket": daemon_m.socket}


@pytest.fixture(scope="module")
def saved_at_2(daemon_m, tmp_path_factory):
    """The 2-rank DTensor checkpoints, in the daemon and in a directory."""
    tmp = tmp_path_factory.mktemp("dcp2")
    where = {"fs": str(tmp / "fs"), "socket": daemon_m.socket}
    run_ranks("save", 2, where, tmp)
    return where, tmp


def _eq(a, b) -> bool:
    if isinstance(a, io.BytesIO):
        return isinstance(b, io.BytesIO) and a.getvalue() == b.getvalue()
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# -- single process -------------------------------------------------------------------------------
def _plain_state() -> dict:
    g = torch.Generator().manual_seed(5)
    return {"f32": torch.randn(10, 10, generator=g), "bf16": torch.randn(3, 5, generator=g).bfloat16(),
            "i64": torch.randint(-9, 9, (4,), generator=g), "mask": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5), "strided": torch.arange(12.0).view(3, 4).t(),
            "empty": torch.zeros(0, 3), "bytes": [1, 2, 3, 4], "raw": b"\x00\x01\xfe",
            "bytesio": io.BytesIO(b"stored as its raw bytes"),
            "nested": {"step": 11, "name": "run", "deep": {"t": torch.ones(2, 2, dtype=torch.int8)}}}


def _zeros_like_state(sd):
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd.contiguous())
    if isinstance(sd, dict):
        return {k: _zeros_like_state(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_zeros_like_state(v) for v in sd]
    if isinstance(sd, io.BytesIO):
        return io.BytesIO()
    return type(sd)() if isinstance(sd, (int, str, bytes)) else None


@pytest.mark.parametrize("kind", BACKENDS)
def test_plain_state_dict_round_trip(kind, where):
    sd = _plain_state()
    dcp.save(sd, storage_writer=make_writer(kind, where, "plain"))
    out = _zeros_like_state(sd)
    dcp.load(out, storage_reader=make_reader(kind, where, "plain"))
    assert _eq(out, {**sd, "strided": sd["strided"].contiguous()})


@pytest.mark.parametrize("kind", BACKENDS)
def test_model_and_adamw_round_trip(kind, where):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2)

    def step(m, opt, i):
        opt.zero_grad()
        m(torch.full((4, 6), float(i))).square().sum().backward()
        opt.step()

    m, opt = make(0)
    for i in range(3):
        step(m, opt, i)
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=make_writer(kind, where, "adamw"))
    m2, opt2 = make(1)
    step(m2, opt2, 9)  # different values and an optimizer state to overwrite
    msd2, osd2 = get_state_dict(m2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, storage_reader=make_reader(kind, where, "adamw"))
    set_state_dict(m2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert _eq(m2.state_dict(), m.state_dict())
    assert _eq(opt2.state_dict(), opt.state_dict())
    step(m, opt, 3)
    step(m2, opt2, 3)  # and training goes on identically
    assert _eq(m2.state_dict(), m.state_dict())


@pytest.mark.parametrize("kind", BACKENDS)
def test_async_save_thread_executor(kind, where):
    sd = _plain_state()
    fut = dcp.async_save(sd, storage_writer=make_writer(kind, where, "async"))
    fut.result(timeout=120)
    out = _zeros_like_state(sd)
    dcp.load(out, storage_reader=make_reader(kind, where, "async"))
    assert _eq(out, {**sd, "strided": sd["strided"].contiguous()})


@pytest.mark.parametrize("kind", BACKENDS)
def test_unknown_checkpoint_is_a_clear_error(kind, where):
    dcp.save({"x": torch.ones(2)}, storage_writer=make_writer(kind, where, "known"))
    expected = {"fs": "No such file", "snapshotd": "version 99 is not held (latest committed: 1)"}[kind]
    reader = (make_reader(kind, where, "missing") if kind == "fs"
              else make_reader(kind, where, "known", version=99))
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"x": torch.zeros(2)}, storage_reader=reader)
    assert expected in str(ei.value.failures)


def test_a_first_run_finds_no_checkpoint_and_says_so(where):
    reader = make_reader("snapshotd", where, "first-run")
    assert reader.latest_version() == 0  # what a training script checks before dcp.load
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"x": torch.zeros(2)}, storage_reader=reader)
    assert "no checkpoint of job 'dcp-first-run' on this daemon" in str(ei.value.failures)
    dcp.save({"x": torch.ones(2)}, storage_writer=make_writer("snapshotd", where, "first-run"))
    reader = make_reader("snapshotd", where, "first-run")
    assert reader.latest_version() == 1
    out = {"x": torch.zeros(2)}
    dcp.load(out, storage_reader=reader)
    assert out["x"].tolist() == [1.0, 1.0]


# -- snapshotd only: what a file system does not check ------------------------------------------
def test_versions_grow_and_load_reads_the_latest(where):
    w = make_writer("snapshotd", where, "grow")
    for v in (1, 2):
        dcp.save({"v": torch.tensor(float(v))}, storage_writer=w)
        assert w.last_version == v
    out = {"v": torch.tensor(0.0)}
    dcp.load(out, storage_reader=make_reader("snapshotd", where, "grow"))
    assert out["v"].item() == 2.0
    with pytest.raises(CheckpointException) as ei:  # an old version id is refused, not overwritten
        dcp.save({"v": torch.tensor(9.0)}, storage_writer=w, checkpoint_id=2)
    assert "version 2 cannot be written" in str(ei.value.failures)


@pytest.mark.parametrize("phase", ["write_data", "finish"])
def test_a_failed_save_commits_nothing_and_the_next_save_works(where, phase):
    """After DCP's FaultyStorageWriter idea: the writer fails in a chosen phase."""
    w = make_writer("snapshotd", where, f"faulty-{phase}")
    dcp.save({"v": torch.tensor(1.0)}, storage_writer=w)
    real = getattr(w, phase)

    def fail(*a, **k):
        raise RuntimeError(f"injected failure in {phase}")

    setattr(w, phase, fail)
    with pytest.raises(CheckpointException) as ei:
        dcp.save({"v": torch.tensor(2.0)}, storage_writer=w)
    assert f"injected failure in {phase}" in str(ei.value.failures)
    out = {"v": torch.tensor(0.0)}
    dcp.load(out, storage_reader=make_reader("snapshotd", where, f"faulty-{phase}"))
    assert out["v"].item() == 1.0  # the failed save committed nothing
    setattr(w, phase, real)
    dcp.save({"v": torch.tensor(3.0)}, storage_writer=w)
    dcp.load(out, storage_reader=make_reader("snapshotd", where, f"faulty-{phase}"))
    assert out["v"].item() == 3.0 and w.last_version >= 2


def test_the_next_version_passes_one_another_rank_delivered_in_a_failed_save(where):
    """Rank 1 delivered version 1, rank 0 failed before delivering it: the next save must not
    write version 1 again (rank 1 could not stage it twice)."""
    from torch.distributed.checkpoint.planner import SavePlan

    from snapshotd.wire import manifest as mf
    from snapshotd.wire._proto import snapshotd_pb2 as pb

    w = make_writer("snapshotd", where, "pending", world_size=2)
    c = w.client
    c.register_job("dcp-pending", 2)
    st = c.acquire_staging("dcp-pending", 1, 1, 64)
    c.adopt(st.segment_name, pb.ShardManifest(job_id="dcp-pending", rank=1, version=1, payload_bytes=0,
                                              block_size_bytes=mf.DEFAULT_BLOCK_SIZE_BYTES,
                                              checksum_algo=mf.CHECKSUM_ALGO))
    w.set_up_storage_writer(True, rank=0)
    plans = w.prepare_global_plan([SavePlan([]), SavePlan([])])
    assert [p.storage_data.version for p in plans] == [2, 2]
    assert [p.storage_data.world_size for p in plans] == [2, 2]


def test_corrupted_bytes_are_detected(where, daemon_m):
    from snapshotd.wire import shm

    dcp.save({"x": torch.arange(1000.0)}, storage_writer=make_writer("snapshotd", where, "corrupt"))
    name = daemon_m.client().open_shard("dcp-corrupt", 0).segment_name
    with open(shm.path_of(name), "r+b") as f:
        f.seek(100)
        f.write(b"\xde\xad")
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"x": torch.zeros(1000)}, storage_reader=make_reader("snapshotd", where, "corrupt"))
    assert "checksum mismatch" in str(ei.value.failures)


def test_a_snapshotter_job_is_not_taken_for_a_dcp_checkpoint(where):
    from snapshotd_client import Snapshotter

    m = torch.nn.Linear(2, 2)
    with Snapshotter(m, job_id="dcp-notdcp", socket_path=where["socket"]) as s:
        assert s.save(1).result(30).committed
    with pytest.raises(CheckpointException) as ei:
        dcp.load({"weight": torch.zeros(2, 2)}, storage_reader=make_reader("snapshotd", where, "notdcp"))
    assert "was not written by SnapshotdWriter" in str(ei.value.failures)


def test_remote_shard_is_fetched_when_not_mappable(where):
    sd = _plain_state()
    dcp.save(sd, storage_writer=make_writer("snapshotd", where, "remote"))
    r = make_reader("snapshotd", where, "remote")

    def not_here(name, writable=True):
        raise FileNotFoundError(name)  # as for a daemon on another host

    r.segments.get = not_here
    out = _zeros_like_state(sd)
    dcp.load(out, storage_reader=r)
    assert r.fetched_ranks == [0]
    assert _eq(out, {**sd, "strided": sd["strided"].contiguous()})


def test_a_remote_load_fetches_only_the_covering_blocks(where, daemon_m):
    """Not mappable here: each rank's items come by ranged FetchShard, the covering checksum
    blocks only (merged, each once), verified by the daemon and again here; a corrupted
    block outside the range does not stop it, one inside does."""
    from snapshotd.wire import errors, shm
    from snapshotd.wire.manifest import DEFAULT_BLOCK_SIZE_BYTES as BS

    big = torch.arange(3 * BS // 4, dtype=torch.float32)  # 3 blocks
    sd = {"big": big, "small": torch.arange(100.0), "tail": torch.ones(7, dtype=torch.int64)}
    dcp.save(sd, storage_writer=make_writer("snapshotd", where, "ranged"))
    m = daemon_m.client().open_shard("dcp-ranged", 0).manifest
    assert m.payload_bytes > 3 * BS

    def load(keys):
        r = make_reader("snapshotd", where, "ranged")
        r.segments.get = lambda name, writable=True: (_ for _ in ()).throw(FileNotFoundError(name))
        out = {k: torch.zeros_like(sd[k]) for k in keys}
        dcp.load(out, storage_reader=r)
        assert r.fetched_ranks == [0] and all(torch.equal(out[k], sd[k]) for k in keys)
        r.close()
        return r.fetched_bytes

    assert load(["small", "tail"]) == m.payload_bytes - 3 * BS  # the last block only
    assert load(list(sd)) == m.payload_bytes  # every block once
    cl = daemon_m.client()
    with open(shm.path_of(cl.open_shard("dcp-ranged", 0).segment_name), "r+b") as f:
        f.seek(BS + 8)  # block 1
        f.write(b"\xde\xad")
    _, got, moved = cl.fetch_range("dcp-ranged", 0, 0, 3 * BS + 10, 20)
    assert moved == m.payload_bytes - 3 * BS and len(got) == 20
    with pytest.raises(errors.ChecksumMismatchError, match="block"):
        cl.fetch_range("dcp-ranged", 0, 0, BS - 4, 8)  # blocks 0 and 1
    with pytest.raises(errors.InvalidRequestError, match="not within"):
        cl.fetch_range("dcp-ranged", 0, 0, m.payload_bytes - 4, 8)
    cl.close()


def test_metadata_codec_round_trip_and_refusals(where, daemon_m):
    from snapshotd.wire import shm
    from snapshotd.wire.errors import InvalidRequestError
    from snapshotd_client.dcp_codec import decode_metadata, encode_metadata

    md = dcp.save(_plain_state(), storage_writer=make_writer("snapshotd", where, "codec"))
    assert md.storage_meta.checkpoint_id == "snapshotd:dcp-codec/1"
    info = next(v for k, v in md.storage_data.items() if k.fqn == "bytesio")
    with open(shm.path_of(daemon_m.client().open_shard("dcp-codec", 0).segment_name), "rb") as f:
        f.seek(info.offset)  # a BytesIO item: the bytes DCP gives (torch.save'd), where the metadata says
        stored = f.read(info.length)
    assert stored.startswith(b"PK") and b"stored as its raw bytes" in stored
    text = encode_metadata(md)
    assert json.loads(text)["planner_data"]  # JSON, not pickle
    back = decode_metadata(text)
    assert back == md
    assert [k.index for k in back.storage_data] == [k.index for k in md.storage_data]
    md.planner_data = {"k": object()}
    with pytest.raises(InvalidRequestError, match="cannot be stored without pickle"):
        encode_metadata(md)
    with pytest.raises(InvalidRequestError, match="malformed"):
        decode_metadata('{"state_dict_metadata": {}}')


# -- world size changes ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BACKENDS)
def test_dtensor_saved_at_2_ranks_loads_at_1_into_plain_tensors(kind, saved_at_2):
    where, _ = saved_at_2
    f = full_tensors()
    out = {k: torch.zeros_like(v) for k, v in f.items()}
    out.update(step=0, nested={"a": [0, ""], "b": b""})
    dcp.load(out, storage_reader=make_reader(kind, where, "dt"))
    assert _eq(out, {**f, "step": 7, "nested": {"a": [1, "x"], "b": b"\x00\xff"}})
    only0 = {"only0": torch.zeros(7)}  # saved while rank 1 had nothing to write
    dcp.load(only0, storage_reader=make_reader(kind, where, "emptyrank"))
    assert torch.equal(only0["only0"], f["plain"] * 2)


@pytest.mark.parametrize("kind", BACKENDS)
def test_dtensor_saved_at_2_ranks_loads_at_1_into_dtensors(kind, saved_at_2):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    where, tmp = saved_at_2
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg1-{kind}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        f = full_tensors()
        out = {k: distribute_tensor(torch.zeros_like(f[k]), mesh, [Shard(0)]) for k in ("w", "col", "tiny")}
        dcp.load(out, storage_reader=make_reader(kind, where, "dt"))
        for k, v in out.items():
            assert torch.equal(v.full_tensor(), f[k]), k
    finally:
        dist.destroy_process_group()


@pytest.fixture
def make_cluster(tmp_path):
    from clusterkit import cluster_fixture

    yield from cluster_fixture(tmp_path)


@pytest.mark.slow
def test_cluster_saved_at_3_nodes_loads_at_1_from_peers_and_parity(make_cluster, tmp_path):
    """Rank i on node i of a 3-node m=1 cluster; one rank then loads everything from node 0:
    the other ranks' shards come from their nodes, and after node 2 is lost, rank 2's from
    the parity."""
    from snapshotd_client.dcp import SnapshotdReader

    c = make_cluster(3, 1)
    where = {"sockets": [os.path.join(c.d, f"{n}.sock") for n in c.nodes], "local_world_size": 1,
             "kinds": ["snapshotd"]}
    run_ranks("save", 3, where, tmp_path)
    f = full_tensors()

    def load():
        out = {k: torch.zeros_like(v) for k, v in f.items()}
        r = SnapshotdReader(job_id="dcp-dt", socket_path=where["sockets"][0])
        dcp.load(out, storage_reader=r)
        r.close()
        for k, v in f.items():
            assert torch.equal(out[k], v), k

    load()
    c.kill(c.nodes[2], wipe=True)  # the machine is gone: its daemon, state and memory
    load()


@pytest.mark.slow
def test_dtensor_saved_at_2_ranks_loads_at_4(saved_at_2):
    where, tmp = saved_at_2
    run_ranks("load", 4, where, tmp)


if __name__ == "__main__":
    fn, rank, world, init_file, where_json = sys.argv[1:6]
    {"save": save_at_world, "load": load_at_world}[fn](int(rank), int(world), init_file,
                                                       json.loads(where_json))
