"""One verdict for all ranks at restore time (issue 18): the ranks of a job restore the
same version, or all give the restore up together -- never a mix.

Real parts: a local cluster of two daemons (group 2, parity 1), two trainer processes
with a gloo process group, each rank on its own node. Faults are real too: a daemon
frozen with SIGSTOP (cut off from its trainer and its peers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from clusterkit import JOB, make_cluster, wait_for  # noqa: F401 (fixture)

W = 2

TRAINER = textwrap.dedent(r"""
    import datetime, json, sys, warnings
    import torch
    import torch.distributed as dist
    from snapshotd_client.snapshotter import Snapshotter

    rank, world, sock, init, job = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    for line in sys.stdin:  # one command a line, one result line each
        torch.manual_seed(1000 + rank)  # a fresh model differs from every saved one
        m = torch.nn.Linear(32, 32)
        s = Snapshotter(m, job_id=job, socket_path=sock, rank=rank, world_size=world,
                        local_world_size=1, on_daemon_unavailable="warn", timeout_s=3)
        out = {"rank": rank}
        if line.strip() == "save":
            for v in (1, 2):
                with torch.no_grad():
                    m.weight.fill_(10 * v + rank)
                assert s.save(v).result(30) is not None
        else:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    out["step"] = s.restore()
                except Exception as e:
                    out["error"] = f"{type(e).__name__}: {e}"
                out["warned"] = any("daemon unavailable" in str(x.message) for x in w)
            out["w"] = float(m.weight[0, 0])
        s.close()
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
""")


class Ranks:
    """The trainer processes, rank r talking to node r's daemon, driven line by line."""

    def __init__(self, c, tmp_path):
        script = tmp_path / "trainer.py"
        script.write_text(TRAINER)
        self.procs = [subprocess.Popen(
            [sys.executable, str(script), str(r), str(W), os.path.join(c.d, f"{c.nodes[r]}.sock"),
             str(tmp_path / "pg"), JOB], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"rank{r}.err", "w"), text=True) for r in range(W)]
        self.tmp_path = tmp_path

    def run(self, cmd: str) -> list[dict]:
        for p in self.procs:
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
        outs = []
        for r, p in enumerate(self.procs):
            line = p.stdout.readline()  # the trainer's own deadlines bound this
            assert line.startswith("RESULT "), \
                f"rank {r}: {line!r} {(self.tmp_path / f'rank{r}.err').read_text()[-3000:]}"
            outs.append(json.loads(line[len("RESULT "):]))
        return outs

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
                p.wait(30)
            except Exception:
                p.kill()
                p.wait()


def test_a_rank_whose_daemon_is_cut_off_makes_every_rank_skip_the_restore_not_a_mix(
        make_cluster, tmp_path):
    c = make_cluster(W, 1)
    ranks = Ranks(c, tmp_path)
    try:
        ranks.run("save")
        c.wait_committed(2)

        frozen = c.pid(c.nodes[-1])
        os.kill(frozen, signal.SIGSTOP)  # the last node cut off: its trainer and peers get nothing
        try:
            outs = ranks.run("restore")
        finally:
            os.kill(frozen, signal.SIGCONT)
        # The last rank cannot reach its daemon; on its own it would start over while the
        # others loaded version 2 (the mix). Together: every rank skips, warns, keeps its
        # fresh model.
        assert [o.get("step") for o in outs] == [0] * W, outs
        assert all(o["warned"] and "error" not in o for o in outs), outs
        assert all(o["w"] not in (20.0 + r, 10.0 + r) for r, o in enumerate(outs)), outs

        # The node back: every rank restores version 2, each its own state.
        wait_for(lambda: c.committed(c.nodes[-1]) == 2, 30, "the node to answer again")
        outs = ranks.run("restore")
        assert [(o.get("step"), o["w"]) for o in outs] == [(2, 20.0 + r) for r in range(W)], outs
    finally:
        ranks.close()


def test_a_node_that_missed_the_commit_still_restores_the_version_every_other_rank_restores(
        make_cluster, tmp_path, monkeypatch):
    """One node misses version 2's commit (it voted, the others committed; it heard none
    of their votes, words or heartbeat reports: the test hook of node/cluster/commit.py).
    Its daemon alone would answer "latest committed: 0"; the ranks agree on 2 anyway, and
    the lagging node promotes the version it holds complete when asked to open it."""
    from snapshotd.node.cluster.commit import MISS_COMMIT_ENV

    monkeypatch.setenv(MISS_COMMIT_ENV, f"n{W - 1}")  # inherited by the daemons; one acts on it
    c = make_cluster(W, 1)
    deaf = c.nodes[-1]
    assert deaf == f"n{W - 1}"
    ranks = Ranks(c, tmp_path)
    try:
        ranks.run("save")
        c.wait_committed(2, nodes=c.nodes[:-1])
        assert c.committed(deaf) < 2, "the hook did not make the node miss the commit"
        outs = ranks.run("restore")
        assert [(o.get("step"), o["w"]) for o in outs] == [(2, 20.0 + r) for r in range(W)], outs
        assert c.committed(deaf) == 2  # promoted when asked to open it
    finally:
        ranks.close()
