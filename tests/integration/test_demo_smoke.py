"""``snapshotd demo`` end to end at a small size: 4-node cluster, a node lost and rebuilt,
the data-parallel job resumes bit-identically, and nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from snapshotd.wire import shm

from conftest import REPO


def _segments() -> set[str]:
    try:
        return {n for n in os.listdir(shm.SHM_DIR) if n.startswith("snapshotd.")}
    except FileNotFoundError:
        return set()


def _leftover_processes(d: str) -> list[str]:
    """Daemons and trainers of this demo still running (their command lines name ``d``)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if d in cmd and ("snapshotd.node" in cmd or "dp_trainer" in cmd) and p.pid != os.getpid():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid}: {cmd}")
            except psutil.NoSuchProcess:
                pass
    return out


@pytest.mark.timeout(300)
def test_demo_multi_node_smoke(tmp_path):
    d = str(tmp_path / "demo")
    before = _segments()
    p = subprocess.Popen([sys.executable, "-m", "snapshotd_tools.cli", "demo", "--dir", d,
                          "--steps", "8", "--kill-at", "4"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the demo then stops its trainers and its cluster (a SIGKILL, as
        # subprocess.run's timeout sends, left 4 daemons running after a timed-out run)
        p.terminate()
        out, _ = p.communicate(timeout=25)
        pytest.fail(f"snapshotd demo did not finish in 270 s:\n{out[-3000:]}")
    r = subprocess.CompletedProcess(p.args, p.returncode, out)
    assert r.returncode == 0, out
    assert "BIT-IDENTICAL: 4 of 4 ranks" in out, out  # every rank's state, not only rank 0's
    assert "MISMATCH" not in out, out
    assert "SIGKILL node n2" in out, out
    assert "restored step" in out, out
    assert os.path.getsize(os.path.join(d, "loss.png")) > 1000, out
    with open(os.path.join(d, "reference.json")) as f:
        ref = json.load(f)
    with open(os.path.join(d, "resumed.json")) as f:
        got = json.load(f)
    assert got["digest"] == ref["digest"]
    assert 0 < got["start"] <= 4  # resumed from a snapshot taken before the failure
    assert not os.path.exists(os.path.join(d, "cluster.json")), "cluster was not stopped"
    # No shared memory and no processes left behind.
    left = set()
    if os.path.exists(os.path.join(d, "instance")):
        with open(os.path.join(d, "instance")) as f:
            inst = f.read().strip()
        left |= {n for n in _segments() if n.startswith(f"snapshotd.{inst}.")}
    left |= {n for n in _segments() - before if n.startswith("snapshotd.n")}
    assert not left, f"segments left behind: {sorted(left)}"
    assert not _leftover_processes(d), _leftover_processes(d)
