"""The operator's commands against a real daemon: ``snapshotd jobs list | show | drop | gc``
(socket and TCP with a token), the job TTL, ``snapshotd health``, the world-size
conflict naming its fix, a closed pipe, and a stale ready file (issues 15 and 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from snapshotd_client import Snapshotter
from snapshotd_tools.cli import main as cli
from snapshotd.wire.errors import ConflictError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save(d, job: str, rank: int, world: int, step: int) -> None:
    torch.manual_seed(0)
    with Snapshotter(torch.nn.Linear(4, 4), job_id=job, socket_path=d.socket, token=d.token,
                     rank=rank, world_size=world, local_world_size=world) as s:
        s.save(step).result(30)


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _jobs(capsys, d, *extra) -> dict:
    rc, out, err = _run(capsys, "jobs", "list", "--socket", d.socket, "--json", *extra)
    assert rc == 0, err
    return {j["job_id"]: j for j in json.loads(out)["jobs"]}


def _wait(cond, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_jobs_list_show_drop_gc(daemon_factory, capsys):
    d = daemon_factory(extra_args=["--job-ttl", "0", "--job-active-s", "1"]).start()
    _save(d, "done", 0, 1, 3)  # committed
    _save(d, "torn", 0, 2, 5)  # rank 1 never delivers: never commits
    jobs = _jobs(capsys, d)
    assert set(jobs) == {"done", "torn"}
    assert jobs["done"]["latest_committed_version"] == "3" and jobs["done"]["state"] == "active"
    assert jobs["torn"]["world_size"] == 2 and jobs["torn"]["uncommitted_versions"] == ["5"]
    assert int(jobs["done"]["bytes_held"]) > 0 and jobs["done"]["last_activity_unix_s"] > 0
    rc, out, _ = _run(capsys, "jobs", "list", "--socket", d.socket)
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["JOB", "RANKS", "COMMITTED"]
    assert any(ln.split()[0] == "torn" and ln.split()[1] == "2/2" for ln in out.splitlines())

    # Unknown job: a clear error, nothing changed.
    for action in ("show", "drop"):
        rc, _, err = _run(capsys, "jobs", action, "nope", "--socket", d.socket)
        assert rc == 1 and "unknown job 'nope'" in err and "done, torn" in err
    # In use a moment ago: the drop is refused unless forced. On a daemon of its own with
    # the default activity window (30 s): this one's is 1 s (--job-active-s 1, for the gc
    # below), which a loaded machine could let pass between the save and the drop.
    busy = daemon_factory(extra_args=["--job-ttl", "0"]).start()
    _save(busy, "busy", 0, 1, 1)
    rc, _, err = _run(capsys, "jobs", "drop", "busy", "--socket", busy.socket)
    assert rc == 1 and "in use" in err and "--force" in err
    assert set(_jobs(capsys, busy)) == {"busy"}
    assert set(_jobs(capsys, d)) == {"done", "torn"}
    # No TTL on this daemon: gc must be told how old.
    rc, _, err = _run(capsys, "jobs", "gc", "--socket", d.socket)
    assert rc == 1 and "--older-than" in err

    _wait(lambda: all(j["state"] != "active" for j in _jobs(capsys, d).values()),
          "jobs still active 1 s after their last request")
    jobs = _jobs(capsys, d)
    assert jobs["done"]["state"] == "finished" and jobs["torn"]["state"] == "abandoned"
    rc, out, _ = _run(capsys, "jobs", "show", "torn", "--socket", d.socket, "--json")
    shown = json.loads(out)
    assert rc == 0 and shown["state"] == "abandoned"
    assert [(v["version"], v["committed"], v["delivered_ranks"]) for v in shown["versions"]] == \
        [(5, False, [0])]

    rc, out, _ = _run(capsys, "jobs", "gc", "--socket", d.socket, "--older-than", "1h")
    assert rc == 0 and "nothing to drop" in out
    rc, out, _ = _run(capsys, "jobs", "gc", "--socket", d.socket, "--older-than", "0", "--dry-run")
    assert rc == 0 and "would drop done" in out and "would drop torn" in out
    assert set(_jobs(capsys, d)) == {"done", "torn"}
    before = len(d.segments())
    rc, out, _ = _run(capsys, "jobs", "drop", "torn", "--socket", d.socket)
    assert rc == 0 and "dropped job torn" in out
    assert set(_jobs(capsys, d)) == {"done"} and len(d.segments()) < before
    rc, out, _ = _run(capsys, "jobs", "gc", "--socket", d.socket, "--older-than", "0s", "--json")
    assert rc == 0 and [j["job_id"] for j in json.loads(out)["dropped"]] == ["done"]
    assert _jobs(capsys, d) == {} and d.segments() == []


def test_jobs_over_tcp_need_the_token(daemon_factory, capsys):
    d = daemon_factory(token="tok", tcp=True).start()
    _save(d, "j", 0, 1, 1)
    target = f"127.0.0.1:{d.info['tcp_port']}"
    rc, out, err = _run(capsys, "jobs", "list", "--target", target, "--token", "tok", "--json")
    assert rc == 0 and [j["job_id"] for j in json.loads(out)["jobs"]] == ["j"], err
    assert json.loads(out)["job_ttl_s"] == 24 * 3600
    rc, _, err = _run(capsys, "jobs", "drop", "j", "--target", target, "--token", "wrong", "--force")
    assert rc == 1 and "wrong snapshotd token" in err
    rc, _, err = _run(capsys, "jobs", "show", "j", "--target", target, "--token", "tok")
    assert rc == 0
    rc, out, _ = _run(capsys, "stats", "--target", target, "--token", "tok")
    assert rc == 0 and json.loads(out)["jobs"][0]["jobId"] == "j"


def test_a_finished_job_is_dropped_after_the_ttl(daemon_factory, capsys):
    d = daemon_factory(extra_args=["--job-ttl", "2s", "--job-active-s", "1"]).start()
    _save(d, "old", 0, 1, 2)
    assert "old" in _jobs(capsys, d) and d.segments()
    _wait(lambda: "old" not in _jobs(capsys, d), "the job outlived its TTL by 30 s")
    assert d.segments() == []


def test_world_size_conflict_names_the_command_that_fixes_it(daemon_factory, capsys):
    """A job relaunched at another world size registers (its committed version keeps its
    layout, issue 14); what still conflicts is two runs of different sizes writing one
    version at once, and that error says what to do about it."""
    d = daemon_factory().start()
    _save(d, "resize", 1, 2, 4)  # rank 1 of 2 wrote version 4; rank 0 never will
    c = d.client()
    assert c.register_job("resize", 1).latest_committed_version == 0  # no ConflictError now
    with pytest.raises(ConflictError) as ei:
        c.acquire_staging("resize", 0, 4, 1024)  # version 4 again, at world size 1
    msg = str(ei.value)
    assert "world_size 2" in msg and "world_size 1" in msg and "own job id" in msg, msg
    assert "snapshotd jobs drop resize" in msg, msg
    argv = msg[msg.index("snapshotd jobs drop"):].split()[1:4]  # jobs drop resize
    rc, _, err = _run(capsys, *argv, "--socket", d.socket, "--force")
    assert rc == 0, err
    assert c.register_job("resize", 1).latest_committed_version == 0
    c.acquire_staging("resize", 0, 4, 1024)  # the job starts over at its new size


def test_health_answers_serving_only_while_the_daemon_serves(daemon_factory, capsys):
    d = daemon_factory(token="tok", tcp=True)
    # --wait: started before the daemon, succeeds once it serves
    p = subprocess.Popen([sys.executable, "-m", "snapshotd_tools.cli", "health", "--socket",
                          d.socket, "--wait", "60"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    d.start()
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0 and "SERVING" in out, err
    rc, out, _ = _run(capsys, "health", "--target", f"127.0.0.1:{d.info['tcp_port']}")
    assert rc == 0 and "SERVING" in out  # no token needed for health
    d.stop()
    rc, _, err = _run(capsys, "health", "--socket", d.socket, "--timeout", "2")
    assert rc == 1 and "not serving" in err and "UNAVAILABLE" in err


def test_a_closed_pipe_ends_the_command_without_a_traceback(daemon):
    p = subprocess.Popen([sys.executable, "-m", "snapshotd_tools.cli", "stats", "--socket",
                          daemon.socket], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes (`snapshotd stats | head`)
    err = p.stderr.read().decode()
    assert p.wait(60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_stale_ready_file_is_replaced_only_once_everything_serves(tmp_path):
    """A SIGKILLed daemon leaves its ready file; the next daemon removes it before it
    binds anything and writes its own only after every listener accepts."""
    import urllib.request

    from snapshotd_client.transport import DaemonClient

    ready = tmp_path / "ready.json"
    ready.write_text(json.dumps({"pid": 1, "socket": "stale"}))
    sock = str(tmp_path / "d.sock")
    p = subprocess.Popen([sys.executable, "-m", "snapshotd.node", "serve", "--node-id",
                          "stale" + str(os.getpid()), "--state-dir", str(tmp_path / "st"),
                          "--socket", sock, "--memory-budget-bytes", "64MiB",
                          "--ready-file", str(ready), "--metrics-addr", "127.0.0.1:0",
                          "--tcp", "127.0.0.1:0", "--token", "t", "--log-level", "WARNING"],
                         cwd=REPO)
    try:
        def mine():
            try:
                return json.loads(ready.read_text()).get("pid") == p.pid
            except (OSError, ValueError):
                return False

        _wait(lambda: mine() or p.poll() is not None, "no ready file of the new daemon", 60)
        info = json.loads(ready.read_text())
        # The moment the file is there, every promised listener answers.
        assert DaemonClient.for_socket(sock, token="t", timeout_s=5).stats().pid == p.pid
        assert DaemonClient(f"127.0.0.1:{info['tcp_port']}", token="t", timeout_s=5).stats().pid == p.pid
        body = urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=5).read()
        assert b"snapshotd_" in body
        p.terminate()
        assert p.wait(30) == 0
        assert not ready.exists(), "a stopped daemon's ready file says it is ready"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_a_port_in_use_stops_a_second_daemon_which_leaves_no_ready_file(daemon_factory, tmp_path):
    """Two daemons on one TCP port would split the traffic and the probes between them
    (SO_REUSEPORT): the second must fail to start, clearly, and its stale ready file
    must not survive to say otherwise."""
    first = daemon_factory(token="t", tcp=True).start()
    port = first.info["tcp_port"]
    ready = tmp_path / "second.ready"
    ready.write_text(json.dumps({"pid": 1}))  # left by a SIGKILLed predecessor
    r = subprocess.run([sys.executable, "-m", "snapshotd.node", "serve", "--node-id",
                        "second" + str(os.getpid()), "--state-dir", str(tmp_path / "st2"),
                        "--socket", str(tmp_path / "second.sock"), "--memory-budget-bytes", "64MiB",
                        "--ready-file", str(ready), "--tcp", f"127.0.0.1:{port}", "--token", "t"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr
    assert not ready.exists()
    assert first.client(timeout_s=5).stats().pid == first.info["pid"]
