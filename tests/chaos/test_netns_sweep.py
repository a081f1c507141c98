"""What a SIGKILLed harness leaves of its network namespaces is swept by the next one
(snapshotd_tools.chaos.netns: owner records, ``sweep_stale``). Real namespaces and
bridges; skipped without root and ``ip``."""

import json
import os
import subprocess
import sys

import pytest

from snapshotd_tools.chaos import netns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _need_netns():
    why = netns.unavailable()
    if why:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"root is here but network namespaces are not: {why}")
        pytest.skip(why)


def _namespaces() -> set:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


KILLED = """
import os, signal, sys
from snapshotd_tools.chaos import netns
net = netns.Network(sys.argv[1], 2)
net.owners = sys.argv[2]
net.create()
os.kill(os.getpid(), signal.SIGKILL)  # no destroy: what a killed test run leaves
"""


@pytest.mark.timeout(60)
def test_a_killed_owners_network_is_swept_and_a_live_ones_is_not(tmp_path):
    _need_netns()
    owners = str(tmp_path / "owners")
    dead_tag, live_tag = os.urandom(3).hex(), os.urandom(3).hex()
    p = subprocess.run([sys.executable, "-c", KILLED, dead_tag, owners], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == -9, p.stderr
    dead_ns = {f"c{dead_tag}-n0", f"c{dead_tag}-n1"}
    assert dead_ns <= _namespaces() and _link_exists(f"c{dead_tag}b")  # left behind
    with open(os.path.join(owners, dead_tag)) as f:
        assert json.load(f)["nodes"] == 2

    live = netns.Network(live_tag, 1)
    live.owners = owners
    try:
        live.create()  # sweeps first: the dead owner's network goes, ours is made
        assert not dead_ns & _namespaces() and not _link_exists(f"c{dead_tag}b")
        assert sorted(os.listdir(owners)) == [live_tag]
        assert netns.sweep_stale(owners) == []  # a live owner's network stays
        assert f"c{live_tag}-n0" in _namespaces() and _link_exists(f"c{live_tag}b")
    finally:
        assert live.destroy() == []
    assert f"c{live_tag}-n0" not in _namespaces() and not _link_exists(f"c{live_tag}b")
    assert os.listdir(owners) == []  # destroy removed its record


def test_records_that_are_not_ours_or_unreadable_are_left_alone(tmp_path):
    owners = tmp_path / "owners"
    owners.mkdir()
    (owners / "abc123.tmp").write_text("{}")                   # being written
    (owners / "abc124").write_text("not json")                 # torn
    (owners / "ABC125").write_text('{"pid": 1, "start": "0", "nodes": 1}')  # not a tag of ours
    me = {"pid": os.getpid(), "start": netns._start_time(os.getpid()), "nodes": 1}
    (owners / "abc126").write_text(json.dumps(me))             # alive: this process
    assert netns.sweep_stale(str(owners)) == []
    assert sorted(os.listdir(owners)) == ["ABC125", "abc123.tmp", "abc124", "abc126"]
    assert netns._start_time(os.getpid()) == netns._start_time(os.getpid()) is not None
    assert netns._start_time(2 ** 22 + 7) is None
