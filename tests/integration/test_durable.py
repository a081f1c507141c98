"""The durable tier with real daemons (docs/DURABLE.md): a daemon flushes committed
versions in DCP's layout; stock ``dcp.load`` / ``dcp_to_torch_save`` read them; a flush
SIGKILLed halfway never becomes latest; a corrupted file is detected and the older
checkpoint used; ``Snapshotter.restore()`` falls back to the durable checkpoint."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.distributed.checkpoint as dcp

from clusterkit import wait_for
from snapshotd.wire import durable_store as ds
from snapshotd_client import Snapshotter

JOB = "dur"
# A daemon with --durable-url imports torch and DCP before it says ready: slow on a busy host.
START_S = 120


def _model(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def _train(model, opt, steps, snap=None, start=1):
    g = torch.Generator().manual_seed(1234 + start)
    for step in range(start, start + steps):
        x = torch.randn(8, 16, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if snap is not None:
            snap.save(step).result(30)


def _flagged(daemon_factory, url, *extra):
    d = daemon_factory(extra_args=["--durable-url", url, "--durable-every-versions", "2",
                                   "--durable-keep", "2", "--log-level", "INFO", *extra])
    return d


def _complete(root, job=JOB):
    return ds.complete_versions(ds.open_store(root), job)


def _wait_latest(root, v):
    """latest.json (a hint for people and tools) moves after the index is written."""
    path = os.path.join(root, JOB, ds.LATEST)
    wait_for(lambda: os.path.exists(path) and json.load(open(path))["version"] == v, 30,
             f"latest.json to name v{v}")


def _snap(d, model, opt, url, **kw):
    return Snapshotter(model, opt, job_id=JOB, socket_path=d.socket, durable_url=url, **kw)


def test_flush_layout_stock_load_and_retention(daemon_factory, tmp_path):
    root = str(tmp_path / "durable")
    d = _flagged(daemon_factory, root).start(timeout_s=START_S)
    model, opt = _model()
    with _snap(d, model, opt, root) as snap:
        _train(model, opt, 6, snap)
        wait_for(lambda: _complete(root)[-1:] == [6], 30, "v6 complete on the durable tier")
    # keep 2: the newest two complete versions stay (v4 may have been replaced by v6 while
    # v2 was being written: one capture waits per job), nothing older is left
    done = _complete(root)
    assert done[-1] == 6 and len(done) == 2 and done[0] in (2, 4), done
    assert ds.versions(ds.open_store(root), JOB) == done
    vdir = os.path.join(root, JOB, ds.version_dir(6))
    assert sorted(os.listdir(vdir)) == [".metadata", "__0_0.distcp", "parts", ds.INDEX]
    _wait_latest(root, 6)
    # stock DCP reads it: the model's tensors under their names, the step as rank0.*
    want = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    got = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(got, checkpoint_id=vdir)
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = str(tmp_path / "full.pt")
    dcp_to_torch_save(vdir, out)
    full = torch.load(out, weights_only=False)
    assert torch.equal(full["model"]["0.weight"], want["model"]["0.weight"])
    assert torch.equal(full["optimizer"]["state"]["0"]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert json.loads(full["rank0"]["__meta_json__"])  # the non-tensor structure (step, RNG)
    # a version written by dcp.save into snapshotd (SnapshotdWriter) keeps its DCP items
    from snapshotd_client.dcp import SnapshotdWriter

    sd = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "nested": {"b": torch.ones(5, dtype=torch.bfloat16)},
          "step": 7, "name": "run"}
    for _ in range(2):
        sd["w"] += 1
        w = SnapshotdWriter(job_id="dcpjob", socket_path=d.socket)
        dcp.save(sd, storage_writer=w)
        w.close()
    assert w.last_version == 2
    wait_for(lambda: _complete(root, "dcpjob") == [2], 30, "the DCP version flushed")
    ddir = os.path.join(root, "dcpjob", ds.version_dir(2))
    got = {"w": torch.zeros(3, 4), "nested": {"b": torch.zeros(5, dtype=torch.bfloat16)}, "step": 0, "name": ""}
    dcp.load(got, checkpoint_id=ddir)
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["nested"]["b"], sd["nested"]["b"])
    assert got["step"] == 7 and got["name"] == "run"
    d.stop()


def test_corrupt_durable_file_is_detected_and_older_used(daemon_factory, tmp_path):
    """The whole allocation is replaced (a fresh daemon holds nothing) and the newest
    durable checkpoint is corrupt: restore() detects it and loads the older one, bit-exact
    (optimizer included), and says so; without the durable rung nothing is restored."""
    root = str(tmp_path / "durable")
    d = _flagged(daemon_factory, root, "--durable-keep", "3").start(timeout_s=START_S)
    model, opt = _model()
    with _snap(d, model, opt, root) as snap:
        _train(model, opt, 2, snap)
        wait_for(lambda: _complete(root)[-1:] == [2], 30, "v2 durable")
        want2 = {k: v.clone() for k, v in model.state_dict().items()}
        want2_opt = opt.state_dict()["state"][1]["exp_avg_sq"].clone()
        _train(model, opt, 2, snap, start=3)
        wait_for(lambda: _complete(root)[-1:] == [4], 30, "v4 durable")
    d.kill()
    path = os.path.join(root, JOB, ds.version_dir(4), ds.rank_file(0))
    with open(path, "r+b") as f:  # flip one byte in the middle of v4's rank file
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    store = ds.open_store(root)
    with pytest.raises(Exception, match="corrupt"):
        ds.verify_version(store, JOB, 4)
    fresh = daemon_factory().start()
    m3, o3 = _model(seed=5)
    with Snapshotter(m3, o3, job_id=JOB, socket_path=fresh.socket, durable_url=None) as snap3:
        assert snap3.restore() == 0  # no durable rung: nothing to restore
    m2, o2 = _model(seed=7)
    with _snap(fresh, m2, o2, root) as snap2:
        assert snap2.restore() == 2
        assert snap2.restored_method == "durable"
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want2[k]), k
    assert torch.equal(o2.state_dict()["state"][1]["exp_avg_sq"], want2_opt)


@pytest.mark.parametrize("point", ["mid-file", pytest.param("before-index", marks=pytest.mark.slow)])
def test_flush_killed_halfway_never_becomes_latest(daemon_factory, tmp_path, point):
    root = str(tmp_path / "durable")
    d = daemon_factory(extra_args=["--durable-url", root, "--durable-every-versions", "2"])
    d.start(timeout_s=START_S)
    model, opt = _model()
    with _snap(d, model, opt, root) as snap:
        _train(model, opt, 2, snap)
        wait_for(lambda: _complete(root) == [2], 30, "v2 durable")
        _wait_latest(root, 2)
        want2 = {k: v.clone() for k, v in model.state_dict().items()}
        d.kill(signal.SIGKILL)
    # the same daemon state, now with the stall hook: v4's flush stops at `point`
    env_before = os.environ.get("SNAPSHOTD_DURABLE_TEST_STALL")
    os.environ["SNAPSHOTD_DURABLE_TEST_STALL"] = point
    try:
        d.start(timeout_s=START_S)
    finally:
        if env_before is None:
            del os.environ["SNAPSHOTD_DURABLE_TEST_STALL"]
    with _snap(d, model, opt, root) as snap:
        assert snap.restore() == 2
        _train(model, opt, 2, snap, start=3)
        marker = os.path.join(root, JOB, ds.version_dir(4) + ".stalled")
        wait_for(lambda: os.path.exists(marker), 30, f"v4's flush stalled at {point}")
    d.kill(signal.SIGKILL)
    assert open(marker).read() == point
    assert _complete(root) == [2]
    assert json.load(open(os.path.join(root, JOB, ds.LATEST)))["version"] == 2
    left = os.listdir(os.path.join(root, JOB, ds.version_dir(4)))
    assert ds.INDEX not in left and ds.METADATA not in left
    if point == "mid-file":
        assert not any(n.endswith(".distcp") for n in left), left  # only a temporary name
    fresh = daemon_factory().start()
    m2, o2 = _model(seed=3)
    with _snap(fresh, m2, o2, root) as snap2:
        assert snap2.restore() == 2
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want2[k]), k
