"""FSDP2 through ``Snapshotter`` at the same and at a new world size (issue 14).

Real parts: a local cluster (one daemon per node, Reed-Solomon parity), trainer
processes with a gloo process group, ``fully_shard`` on a small transformer, AdamW, a
snapshot every step. A node is lost for real: its daemon and its trainer SIGKILLed,
its shared memory wiped, the daemon started again empty (it rebuilds from the parity).
Then the job is relaunched: at the same world size the restored state and two more
steps are bit-identical to the failure-free run; at fewer ranks every parameter and
optimizer tensor, gathered whole, is bit-identical to the failure-free state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from clusterkit import JOB, make_cluster  # noqa: F401 (fixture)

TRAINER = os.path.join(os.path.dirname(__file__), "fsdp2_trainer.py")
STEPS = 3


def launch(c, tmp_path, world: int, mode: str, tag: str, then1: bool = False) -> list[subprocess.Popen]:
    pg = tmp_path / f"pg-{tag}"
    extra = [str(tmp_path / "at1.json")] if then1 else []
    return [subprocess.Popen(
        [sys.executable, TRAINER, str(r), str(world), os.path.join(c.d, f"{c.nodes[r]}.sock"),
         str(pg), JOB, mode, str(STEPS), str(tmp_path / f"{tag}.json")] + extra,
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=open(tmp_path / f"{tag}-rank{r}.err", "w"), text=True) for r in range(world)]


def wait_ready(procs, tmp_path, tag: str) -> None:
    for r, p in enumerate(procs):
        line = p.stdout.readline()  # the trainer's own deadlines bound this
        assert line.strip() == "ready", \
            f"{tag} rank {r}: {line!r} {(tmp_path / f'{tag}-rank{r}.err').read_text()[-4000:]}"


def finish(procs) -> None:
    for p in procs:
        try:
            p.stdin.close()
            assert p.wait(60) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def run(c, tmp_path, world: int, tag: str, then1: bool = False) -> dict:
    """A relaunch at ``world`` ranks that restores; ``then1``: rank 0 then restores again
    at world size 1 (its result in at1.json)."""
    procs = launch(c, tmp_path, world, "restore", tag, then1)
    try:
        wait_ready(procs, tmp_path, tag)
    finally:
        finish(procs)
    return json.loads((tmp_path / f"{tag}.json").read_text())


def scenario(c, tmp_path, world: int, smaller: list[int]) -> None:
    train = launch(c, tmp_path, world, "train", "train")
    try:
        wait_ready(train, tmp_path, "train")
        ref = json.loads((tmp_path / "train.json").read_text())["at"]
        c.wait_committed(STEPS)
        lost = c.nodes[-1]  # the node and its trainer die together
        train[-1].send_signal(signal.SIGKILL)
        c.kill(lost, wipe=True)
    finally:
        for p in train:
            p.kill()
            p.wait()
    c.start(lost)

    same = run(c, tmp_path, world, f"same{world}", then1=smaller == [1])
    assert (same["restored"], same["method"]) == (STEPS, "exact"), same
    for s in (STEPS, STEPS + 1, STEPS + 2):  # restored, then training goes on bit-exactly
        assert same["at"][str(s)] == ref[str(s)], f"step {s} differs after the restore"

    for w in smaller:
        if w != 1:
            run(c, tmp_path, w, f"at{w}", then1=smaller[-1] == 1)
        out = json.loads((tmp_path / f"at{w}.json").read_text())
        assert (out["restored"], out["method"], out["from_world"]) == (STEPS, "resharded", world), out
        got, want = out["at"][str(STEPS)], ref[str(STEPS)]
        assert sorted(got) == sorted(want) and len(want) > 20
        assert [k for k in want if got[k] != want[k]] == [], f"at {w} ranks"


def test_fsdp2_two_ranks_restore_at_two_and_at_one(make_cluster, tmp_path):
    c = make_cluster(2, 1)
    scenario(c, tmp_path, 2, [1])


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 4 + 4 + 2 + 1 trainer processes on a 2-core machine
def test_fsdp2_four_ranks_on_four_nodes_m2_restore_at_four_two_one(make_cluster, tmp_path):
    c = make_cluster(4, 2)
    scenario(c, tmp_path, 4, [2, 1])
