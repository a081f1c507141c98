"""CheckFree rung of restore(), end to end: a 3-stage pipeline-parallel trainer on a local
cluster with parity 0 loses the node of stage 1; the stage comes back approximately from
its neighbours (CheckFree), stages 0 and 2 exactly, and training goes on."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from snapshotd import errors
from snapshotd.checkfree import CheckFreeSettings
from snapshotd_client.checkfree_restore import CheckFreeUnavailableError
from snapshotd_client.snapshotter import Snapshotter
from test_cluster import JOB, make_cluster  # noqa: F401 (fixture)

S = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pp(c, steps: int, tmp_path, tag: str, checkfree: bool = False) -> dict[int, list[dict]]:
    port = _free_port()
    socks = [os.path.join(c.d, f"{n}.sock") for n in c.nodes]
    procs = []
    for r in range(S):
        cmd = [sys.executable, "-m", "snapshotd.demo.pp_trainer", "--rank", str(r), "--world-size", str(S),
               "--master-port", str(port), "--socket", socks[r], "--steps", str(steps), "--job", JOB,
               "--gloo-timeout-s", "60", "--out", str(tmp_path / f"{tag}-r{r}.json")]
        if checkfree:
            cmd += ["--checkfree"]  # neighbours are read through the local daemon
        err = open(tmp_path / f"{tag}-r{r}.err", "w")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO))
    outs = {}
    try:
        for r, p in enumerate(procs):
            out, _ = p.communicate(timeout=120)
            err = (tmp_path / f"{tag}-r{r}.err").read_text()
            assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out[-3000:]}\n{err[-5000:]}"
            outs[r] = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            outs[r].append({"event": "stderr", "text": err})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _losses(lines) -> list[float]:
    return [x["loss"] for x in lines if x["event"] == "step"]


@pytest.mark.timeout(300)
def test_lost_middle_stage_is_rebuilt_by_checkfree_and_training_goes_on(make_cluster, tmp_path):
    c = make_cluster(3, 0)  # group 3, m = 0: nothing can be rebuilt from parity
    first = _run_pp(c, 12, tmp_path, "a")
    for r in range(S):
        assert [x["step"] for x in first[r] if x["event"] == "restored"] == [0]
        assert len(_losses(first[r])) == 12
    pre = _losses(first[2])
    assert all(math.isfinite(x) for x in pre)
    c.wait_committed(12)

    c.lose([c.nodes[1]])  # the machine of stage 1 is gone: SIGKILL, wiped, restarted empty

    # Without CheckFree the lost stage's restore fails with the daemon's clear error.
    model = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    with Snapshotter(model, job_id=JOB, socket_path=os.path.join(c.d, "n1.sock"), rank=1, world_size=S,
                     local_world_size=1, pipeline_stage=(1, S), on_daemon_unavailable="raise") as s:
        with pytest.raises(errors.ConflictError) as ei:
            s.restore()
    assert "version 12" in str(ei.value), str(ei.value)

    t0 = time.monotonic()
    second = _run_pp(c, 22, tmp_path, "b", checkfree=True)
    restored = {r: next(x for x in second[r] if x["event"] == "restored") for r in range(S)}
    assert all(restored[r]["step"] == 12 for r in range(S)), restored
    assert restored[1]["approximate"] is True
    assert restored[0]["approximate"] is False and restored[2]["approximate"] is False
    assert "rebuilt APPROXIMATELY by CheckFree" in second[1][-1]["text"]
    post = _losses(second[2])
    assert len(post) == 10 and all(math.isfinite(x) for x in post), post
    # the approximate stage costs a little, then the loss keeps falling (deterministic run)
    tail = sum(post[-3:]) / 3
    assert tail < post[0], (pre, post)
    assert max(post) < 1.5 * pre[-1], (pre, post)
    # the job snapshots normally again: version 22 commits on every node
    c.wait_committed(22)
    print(f"checkfree run: {time.monotonic() - t0:.1f} s; losses before {pre[-3:]}, after {post}")


class _FakeClient:
    """Daemon stub: the job's latest version is 5 and this rank's shard is lost."""

    target = "fake"

    def register_job(self, *a, **k):
        return SimpleNamespace(latest_committed_version=5, block_size_bytes=0)

    def open_shard(self, job, rank, version=0):
        raise errors.ConflictError(f"OpenShard: job {job!r} version {version}: rank {rank} lost, "
                                   "cannot rebuild (0 parity blocks)")

    def close(self):
        pass


def _fake_snap(tmp_path, **kw) -> Snapshotter:
    s = Snapshotter(torch.nn.Linear(2, 2), job_id="j", socket_path=str(tmp_path / "none.sock"), rank=0,
                    world_size=3, local_world_size=1, on_daemon_unavailable="raise", **kw)
    s.client.close()
    s.client = _FakeClient()
    return s


def test_lost_shard_without_checkfree_raises_the_daemons_error(tmp_path):
    with _fake_snap(tmp_path, pipeline_stage=(1, 3)) as s:
        with pytest.raises(errors.ConflictError, match="cannot rebuild"):
            s.restore()
        assert not s.restored_approximate


def test_checkfree_impossible_raises_clear_error(tmp_path):
    # stage 0 is an edge stage: plain CheckFree cannot rebuild it
    with _fake_snap(tmp_path, pipeline_stage=(0, 3), checkfree=CheckFreeSettings()) as s:
        with pytest.raises(CheckFreeUnavailableError, match="CheckFree cannot rebuild it") as ei:
            s.restore()
        assert "edge stage" in str(ei.value) and "cannot rebuild (0 parity" in str(ei.value)
        assert isinstance(ei.value, errors.ConflictError)
        assert not s.restored_approximate
