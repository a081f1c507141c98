"""A demo SIGKILLed takes its daemons and trainers with it (issue 18).

``snapshotd demo`` starts its cluster with ``localcluster.up(..., tie_to_parent=True)``
and its trainers through ``localcluster.tied``; a demo that was SIGKILLed used to
leave its 4 daemons (and trainers) running for hours. Here a small parent script starts a
2-node local cluster through that same code path and one child as the demo starts its
trainers, prints their pids and waits; the test SIGKILLs the script and waits (on the
condition, with a generous bound) for every one of them to be gone. The same script
with ``tie_to_parent=False`` (what ``snapshotd cluster up`` does: a cluster meant to
outlive the command) leaves its daemons serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from snapshotd.wire import shm

PARENT = r"""
import json, signal, subprocess, sys
from snapshotd_tools import localcluster as lc
d, tie = sys.argv[1], sys.argv[2] == "1"
info = lc.up(d, 2, 1, block_size="16KiB", budget="64MiB", tie_to_parent=tie)
argv = [sys.executable, "-c", "import time; time.sleep(600)"]
child = subprocess.Popen(lc.tied(argv, signal.SIGKILL) if tie else argv)
print(json.dumps({"daemons": [v["pid"] for v in info["nodes"].values()], "child": child.pid}), flush=True)
signal.pause()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone_within(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still alive after waiting up to ``timeout_s`` for all to be gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _start_and_kill_parent(d, tie: bool) -> dict:
    p = subprocess.Popen([sys.executable, "-c", PARENT, str(d), "1" if tie else "0"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = p.stdout.readline()
        pids = json.loads(line) if line.startswith("{") else None
        assert pids, line + p.stdout.read() if p.poll() is not None else line
    finally:
        p.kill()  # SIGKILL: no handler, no cleanup of its own
        p.wait(30)
        p.stdout.close()
    return pids


def _cleanup(d, pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    try:
        inst = (d / "instance").read_text().strip()
    except OSError:
        return
    for name in shm.list_segments(f"snapshotd.{inst}."):
        shm.unlink(name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_demo_takes_its_daemons_and_trainers_with_it(tmp_path):
    d = tmp_path / "tied"
    pids = _start_and_kill_parent(d, tie=True)
    everyone = pids["daemons"] + [pids["child"]]
    try:
        assert all(p > 0 for p in everyone)
        left = _gone_within(everyone, 60)
        assert not left, f"still running 60 s after the parent was SIGKILLed: {left}"
    finally:
        _cleanup(d, everyone)


def test_an_untied_cluster_outlives_the_command_that_started_it(tmp_path):
    """``snapshotd cluster up``: not tied; after the command is gone its daemons still serve."""
    from snapshotd_tools import localcluster as lc

    d = tmp_path / "untied"
    pids = _start_and_kill_parent(d, tie=False)
    try:
        rows = lc.collect_status(str(d))
        assert [r["alive"] for r in rows] == [True, True], rows
        assert all(_alive(p) for p in pids["daemons"])
        assert lc.down(str(d)) == 0
    finally:
        _cleanup(d, pids["daemons"] + [pids["child"]])
