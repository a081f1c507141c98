"""The chaos harness's fork server: ranks forked from a process that imported torch once.

Real processes throughout: the server, and the trainer module forked from it with its
stdout on a pipe we read, its stderr in a log, its exit status (or the signal that
killed it) reported back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from snapshotd_tools.chaos.forkserver import ForkServer
from snapshotd_tools.chaos.rig import Trainers, _alive
from snapshotd_tools.localcluster import free_port

TRAINER = "snapshotd_tools.chaos.trainer"  # what the harness forks (dp_trainer plus digests)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fs = ForkServer(str(tmp_path_factory.mktemp("fs") / "forkserver.log"))
    yield fs
    fs.close()


def test_exit_status_stdout_and_stderr_of_a_forked_rank(server, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = str(tmp_path / "err.log")
    p = server.spawn(TRAINER, ["--no-such-flag"], env, log)  # argparse: usage, exit 2
    assert p.pid != os.getpid() and p.wait(60) == 2 and p.poll() == 2
    err = open(log).read()
    assert "usage:" in err and "error:" in err and "RuntimeWarning" not in err, err
    p = server.spawn(TRAINER, ["--help"], env, str(tmp_path / "help.log"))
    out = p.stdout.read()  # EOF once the rank exited: the pipe's only writer is gone
    assert p.wait(60) == 0 and "--world-size" in out


def test_a_reused_pid_does_not_inherit_an_earlier_ranks_exit_status(server, tmp_path):
    """The kernel reuses pids (they wrap at pid_max, within an hour on a busy machine): a
    new rank whose pid an earlier rank had must not be taken to have exited with that
    rank's status. A 2-hour soak saw ranks "exit 1" with no error at all. Every pid is
    made to look used (an exit status of 1 recorded), so the new rank's is one of them."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    with server.cond:
        server.exits.update({pid: 1 for pid in range(1, pid_max + 1)})
    try:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        p = server.spawn(TRAINER, ["--help"], env, str(tmp_path / "help.log"))
        out = p.stdout.read()
        assert p.wait(60) == 0 and "--world-size" in out
    finally:
        with server.cond:
            server.exits.clear()


def test_a_killed_rank_reports_the_signal_and_its_pid_is_gone(server, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Rank 0 of 2 waits forever in the gloo rendezvous: a live process to kill.
    p = server.spawn(TRAINER, ["--rank", "0", "--world-size", "2", "--master-port", str(free_port()),
                               "--steps", "1", "--no-snapshot", "--gloo-timeout-s", "300"],
                     env, str(tmp_path / "r0.log"))
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(1.0)
    assert _alive(p.pid)
    p.send_signal(signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL
    assert not _alive(p.pid)


def test_a_forked_job_is_bit_identical_to_fresh_processes(server, tmp_path):
    """The same 2-rank job, 3 steps, forked and as fresh interpreters: the same digests."""
    forked = Trainers(str(tmp_path), "forked", 2, 3, None, spawner=server)
    fresh = Trainers(str(tmp_path), "fresh", 2, 3, None)
    for g in (forked, fresh):
        try:
            assert g.wait_end(180) == {0: 0, 1: 0}, g.error_lines()
        finally:
            g.kill()
    digest = {tag: sorted(x for x in g.digests if x[1] == 3) for tag, g in (("f", forked), ("p", fresh))}
    assert len(digest["f"]) == 2 and digest["f"] == digest["p"]


def test_bad_commands_are_refused_and_the_server_keeps_serving(tmp_path):
    import socket

    fs = ForkServer(str(tmp_path / "fs.log"))
    try:
        r, w = os.pipe()
        try:  # one descriptor instead of two
            socket.send_fds(fs.sock, [json.dumps({"spawn": 99, "module": TRAINER, "argv": []}).encode()], [w])
        finally:
            os.close(w)
            os.close(r)
        p = fs.spawn(TRAINER, ["--help"], dict(os.environ), str(tmp_path / "ok.log"))
        assert p.wait(60) == 0
        assert any("error" in rep for rep in fs.replies.values())
    finally:
        fs.close()
    assert fs.proc.returncode == 0  # closing our end stops it
