"""Real daemon process + real training processes: crashes and bit-exact resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from snapshotd_tools.demo.single_node import run_to_end, run_until_killed, trainer_cmd

STEPS = 24


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "ref.json")
    run_to_end(trainer_cmd(STEPS, "ref", None, out))
    with open(out) as f:
        return json.load(f)


def _digest(path) -> str:
    with open(path) as f:
        return json.load(f)["digest"]


def test_trainer_sigkill_resumes_bit_exact(daemon, reference, tmp_path):
    events = run_until_killed(trainer_cmd(STEPS, "j", daemon.socket, None), kill_after_step=11)
    killed_at = events[-1]["step"]
    committed = daemon.client().list_versions("j").latest_committed_version
    assert 1 <= committed <= killed_at
    out = str(tmp_path / "resumed.json")
    ev = run_to_end(trainer_cmd(STEPS, "j", daemon.socket, out))
    restored = next(e["step"] for e in ev if e["event"] == "restored")
    assert restored == committed
    assert killed_at - restored <= 2, "lost more than the steps since the last snapshot"
    assert _digest(out) == reference["digest"]
    # The resumed run's losses continue the reference curve exactly.
    with open(out) as f:
        assert json.load(f)["losses"] == reference["losses"][restored:]


def test_daemon_sigkill_between_snapshots_readopts(daemon, reference, tmp_path):
    run_to_end(trainer_cmd(9, "j", daemon.socket, None))
    assert daemon.client().list_versions("j").latest_committed_version == 9
    before = set(daemon.segments())
    daemon.kill(signal.SIGKILL)
    assert set(daemon.segments()) == before, "segments must outlive the daemon"
    daemon.start()
    out = str(tmp_path / "resumed.json")
    ev = run_to_end(trainer_cmd(STEPS, "j", daemon.socket, out))
    assert next(e["step"] for e in ev if e["event"] == "restored") == 9
    assert _digest(out) == reference["digest"]
    assert len(daemon.segments()) <= 3  # committed + rotating staging, nothing leaked


def test_daemon_down_mid_run_training_continues(daemon, reference, tmp_path):
    """The daemon dies while the trainer runs: training goes on with warnings, snapshots
    resume once a daemon is back, and the final state is still exact."""
    out = str(tmp_path / "out.json")
    p = subprocess.Popen(trainer_cmd(STEPS, "j", daemon.socket, out, "--step-delay-s", "0.15"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if json.loads(line).get("step", 0) >= 4:
            break
    daemon.kill(signal.SIGKILL)
    time.sleep(0.6)
    daemon.start()
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "daemon unavailable" in err
    assert _digest(out) == reference["digest"]
    latest = daemon.client().list_versions("j").latest_committed_version
    assert latest == STEPS, "snapshots resumed after the daemon came back"


def test_no_daemon_warns_or_raises(tmp_path):
    sock = str(tmp_path / "nobody.sock")
    code = (
        "import torch, warnings\n"
        "from snapshotd_client import Snapshotter\n"
        "from snapshotd.wire.errors import DaemonUnavailableError\n"
        "m = torch.nn.Linear(2, 2)\n"
        f"s = Snapshotter(m, job_id='x', socket_path={sock!r}, timeout_s=2)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert s.restore() == 0 and s.save(1) is None\n"
        "assert any('daemon unavailable' in str(x.message) for x in w), w\n"
        f"s2 = Snapshotter(m, job_id='x', socket_path={sock!r}, timeout_s=2, on_daemon_unavailable='raise')\n"
        "try:\n    s2.save(1)\nexcept DaemonUnavailableError:\n    print('RAISED')\n"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "RAISED" in r.stdout
    assert time.monotonic() - t0 < 30, "must never hang on a missing daemon"
