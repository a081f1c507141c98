"""The durable tier on a local cluster of real daemons: each node writes its own rank's
file and part, the last one the version's index; m+1 nodes of the group lost -> every
rank's ``restore()`` falls back to the newest durable checkpoint, bit-exact, and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from clusterkit import BLOCK, Cluster, cluster_fixture, wait_for
from conftest import REPO
from snapshotd.node.spec_file import load_spec
from snapshotd.wire import durable_store as ds
from snapshotd_tools import localcluster as lc

import pytest

JOB = "durjob"
TRAINER = os.path.join(REPO, "tests", "integration", "durable_trainer.py")


class DurableCluster(Cluster):
    """A Cluster whose daemons flush to ``url`` every 2 versions."""

    def __init__(self, d: str, n: int, m: int, url: str):
        self.d, self.n, self.m = d, n, m
        self.info = lc.up(d, n, m, block_size=BLOCK, budget="1GiB", daemon_args=[
            "--durable-url", url, "--durable-every-versions", "2", "--durable-keep", "2",
            "--log-level", "INFO"])
        self.nodes = sorted(self.info["nodes"], key=lambda x: int(x[1:]))
        self.spec = load_spec(os.path.join(d, "spec.yaml"))
        self.bs = self.spec.block_size_bytes
        self._clients = {}
        self.versions = {}


@pytest.fixture
def make_durable_cluster(tmp_path):
    yield from cluster_fixture(tmp_path, DurableCluster)


def _ranks(c, url: str, mode: str, steps: int = 6) -> dict[int, list[dict]]:
    port = lc.free_port()
    procs = []
    for r, node in enumerate(c.nodes):
        cmd = [sys.executable, TRAINER, "--rank", str(r), "--world-size", str(c.n), "--master-port",
               str(port), "--socket", os.path.join(c.d, f"{node}.sock"), "--job", JOB,
               "--durable-url", url, "--mode", mode, "--steps", str(steps)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=REPO))
    outs = {}
    try:
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
            outs[r] = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            outs[r].append({"stderr": err})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


@pytest.mark.slow  # 3 daemons and 2 x 3 trainer processes: ~1 min idle, 3-4 min under load
def test_lost_m_plus_1_nodes_restore_from_the_durable_checkpoint(make_durable_cluster, tmp_path):
    url = str(tmp_path / "durable")
    c = make_durable_cluster(3, 1, url)
    trained = _ranks(c, url, "train", steps=6)
    store = ds.open_store(url)
    wait_for(lambda: ds.complete_versions(store, JOB)[-1:] == [6], 60, "v6 complete on the durable tier")
    idx = ds.verify_version(store, JOB, 6)
    # one commit names the set: each node wrote its own rank's file and part
    assert sorted(idx["ranks"]) == ["0", "1", "2"]
    assert {idx["ranks"][str(r)]["node"] for r in range(3)} == set(c.nodes)
    assert sorted(idx["nodes"]) == sorted(c.nodes)
    assert set(idx["files"]) == {ds.METADATA, *(ds.rank_file(r) for r in range(3))}
    c.lose(c.nodes[1:])  # m + 1 = 2 nodes of the group: the parity cannot rebuild them
    got = _ranks(c, url, "restore")
    for r in range(3):
        res = got[r][0]
        assert "error" not in res, (r, res, got[r][-1]["stderr"][-3000:])
        want = next(x["digest"] for x in trained[r] if x.get("step") == 6)
        assert res == {"restored": 6, "method": "durable", "digest": want}, r
        assert "restored by the durable rung at step 6" in got[r][-1]["stderr"], r
