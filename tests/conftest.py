"""Shared fixtures: real daemon processes on private sockets and shm prefixes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from snapshotd.wire import shm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DaemonProcess:
    """A ``snapshotd serve`` subprocess with its own node id, state dir and socket."""

    def __init__(self, tmp_path, node_id: str | None = None, budget: str = "1GiB",
                 token: str | None = None, tcp: bool = False, extra_args=()):
        self.node_id = node_id or "t" + uuid.uuid4().hex[:10]
        self.dir = tmp_path / self.node_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = str(self.dir / "state")
        self.socket = str(self.dir / "d.sock")
        self.ready = str(self.dir / "ready.json")
        self.budget, self.token, self.tcp, self.extra_args = budget, token, tcp, list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self, timeout_s: float = 30.0) -> "DaemonProcess":
        if os.path.exists(self.ready):
            os.unlink(self.ready)
        cmd = [sys.executable, "-m", "snapshotd.node", "serve", "--node-id", self.node_id,
               "--state-dir", self.state_dir, "--socket", self.socket,
               "--memory-budget-bytes", self.budget, "--ready-file", self.ready,
               "--log-level", "WARNING", *self.extra_args]
        if self.token:
            cmd += ["--token", self.token]
        if self.tcp:
            cmd += ["--tcp", "127.0.0.1:0"]
        self.log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.read_log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon not ready: {self.read_log()}")
            time.sleep(0.02)
        with open(self.ready) as f:
            self.info = json.load(f)
        return self

    def read_log(self) -> str:
        try:
            return (self.dir / "daemon.log").read_text()[-4000:]
        except OSError:
            return ""

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def segments(self) -> list[str]:
        return shm.list_segments(f"snapshotd.{self.node_id}.")

    def client(self, **kw):
        from snapshotd_client.transport import DaemonClient

        return DaemonClient.for_socket(self.socket, token=self.token, **kw)


@pytest.fixture
def daemon_factory(tmp_path):
    made: list[DaemonProcess] = []

    def make(**kw) -> DaemonProcess:
        d = DaemonProcess(tmp_path, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()
        for name in d.segments():  # a test must not leak segments into /dev/shm
            shm.unlink(name)


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory().start()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
