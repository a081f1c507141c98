"""``dcp.async_save`` with ``SnapshotdWriter`` as its own ``AsyncStager`` (issue 14).

The same assertions for DCP's FileSystemWriter (its DefaultStager) and for ours, with the
THREAD and the PROCESS executor, at 2 gloo ranks: the state dict is changed as soon as
``async_save`` returns (staging must have copied it), and a load gets the pre-change tensors
bit for bit. For ours also: write_data found every tensor item already in the daemon's
segment (no second copy), and DCP's pickling of the staged state dict into the checkpoint
process carries a file descriptor, not the bytes.

Multi-rank cases run this file as a script (``async RANK WORLD INIT WHERE_JSON``).
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_dcp import daemon_m, make_reader, make_writer  # noqa: E402,F401  (shared fixture)


def _state(world: int, mesh=None) -> dict:
    g = torch.Generator().manual_seed(77)
    sd = {"w": torch.randn(64, 33, generator=g), "h": torch.randn(17, generator=g).half(),
          "i": torch.randint(0, 1 << 40, (5, 5), generator=g), "step": 3, "meta": {"lr": 0.5}}
    if mesh is not None:
        from torch.distributed.tensor import Shard, distribute_tensor

        sd["dt"] = distribute_tensor(torch.randn(9, 4, generator=g), mesh, [Shard(0)])
    return sd


def _snapshot(sd):
    from torch.distributed.tensor import DTensor

    if isinstance(sd, dict):
        return {k: _snapshot(v) for k, v in sd.items()}
    if isinstance(sd, DTensor):
        return sd.full_tensor().clone()
    return sd.clone() if isinstance(sd, torch.Tensor) else sd


def _scribble(sd) -> None:
    """What training does to the live state after async_save returns."""
    from torch.distributed.tensor import DTensor

    for v in sd.values():
        if isinstance(v, DTensor):
            v.to_local().add_(1000)
        elif isinstance(v, torch.Tensor):
            v.add_(1000)
    sd["step"] = 99


def async_ranks(rank: int, world: int, init_file: str, where: dict) -> None:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for kind in ("fs", "snapshotd"):
            for ex in ("thread", "process"):
                name = f"async-{ex}"
                sd = _state(world, mesh)
                before = _snapshot(sd)
                writer = make_writer(kind, where, name, rank)
                etype = AsyncCheckpointerType.PROCESS if ex == "process" else AsyncCheckpointerType.THREAD
                fut = dcp.async_save(sd, storage_writer=writer, async_checkpointer_type=etype)
                _scribble(sd)
                fut.result(timeout=300)
                if kind == "snapshotd" and ex == "thread":  # w, h, i once (deduplicated), dt twice
                    n = torch.tensor([writer.staged_copies])
                    dist.all_reduce(n)
                    assert n.item() == 5, (rank, writer.staged_copies, n.item())
                out = _state(world, mesh)
                out["dt"] = distribute_tensor(torch.zeros(9, 4), mesh, [Shard(0)])
                for k in ("w", "h", "i"):
                    out[k] = torch.zeros_like(out[k])
                out["step"], out["meta"] = 0, {"lr": 0.0}
                dcp.load(out, storage_reader=make_reader(kind, where, name))
                got = _snapshot(out)
                for k in ("w", "h", "i", "dt"):
                    assert got[k].dtype == before[k].dtype and torch.equal(got[k], before[k]), (kind, ex, k)
                assert got["step"] == 3 and got["meta"] == {"lr": 0.5}, (kind, ex, got["step"])
    finally:
        dist.destroy_process_group()


def test_async_save_thread_and_process_executors_at_2_ranks(daemon_m, tmp_path):
    where = {"fs": str(tmp_path / "fs"), "socket": daemon_m.socket}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")])}
    init = str(tmp_path / "pg")
    procs = [subprocess.Popen([sys.executable, __file__, "async", str(r), "2", init, json.dumps(where)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    outs = [p.communicate(timeout=400)[0].decode(errors="replace") for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"


def _items(n_mib: int = 1) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"big": torch.randn(n_mib * 262144, generator=g), "bf": torch.randn(7, 3, generator=g).bfloat16(),
            "odd": torch.arange(15.0).view(3, 5).t(), "obj": {"k": [1, 2]}, "raw": io.BytesIO(b"xyz")}


def test_staged_state_dict_crosses_to_a_process_as_a_descriptor_not_bytes(daemon_m, tmp_path):
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions, as DCP's executor does)

    where = {"fs": str(tmp_path), "socket": daemon_m.socket}
    sd = _items(1)
    writer = make_writer("snapshotd", where, "stage-pickle")
    staged = writer.stage(sd)
    assert torch.equal(staged["odd"], sd["odd"]) and staged["obj"] == sd["obj"]
    ptr = staged["big"].untyped_storage().data_ptr()
    wire = ForkingPickler.dumps(staged)
    assert len(wire) < 16384, len(wire)  # 1 MiB of tensors: a descriptor and a few numbers
    assert staged["big"].untyped_storage().data_ptr() == ptr  # not moved into fresh memory
    # and the writer itself pickles to names and numbers (no client, no mapping)
    import pickle

    clone = pickle.loads(pickle.dumps(writer))
    assert clone._staged == writer._staged and clone._stage_storage is None
    dcp.save(staged, storage_writer=writer)  # the staged path of write_data, in this process
    assert writer.staged_copies == 3
    out = {k: torch.zeros_like(v.contiguous()) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    out.update(obj={"k": []}, raw=io.BytesIO())
    dcp.load(out, storage_reader=make_reader("snapshotd", where, "stage-pickle"))
    for k in ("big", "bf", "odd"):
        assert torch.equal(out[k], sd[k].contiguous()), k
    assert out["obj"] == {"k": [1, 2]} and out["raw"].getvalue() == b"xyz"


def test_a_save_at_another_version_than_staged_copies_and_stays_exact(daemon_m, tmp_path):
    where = {"fs": str(tmp_path), "socket": daemon_m.socket}
    sd = _items(1)
    writer = make_writer("snapshotd", where, "stage-moved")
    staged = writer.stage(sd)
    assert writer._staged.version == 1
    dcp.save(staged, storage_writer=writer, checkpoint_id=5)  # not the staged version
    assert writer.staged_copies == 0 and writer.last_version == 5
    out = {k: torch.zeros_like(v.contiguous()) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    out.update(obj={"k": []}, raw=io.BytesIO())
    dcp.load(out, storage_reader=make_reader("snapshotd", where, "stage-moved"))
    for k in ("big", "bf", "odd"):
        assert torch.equal(out[k], sd[k].contiguous()), k


if __name__ == "__main__":
    if sys.argv[1] == "async":
        async_ranks(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
