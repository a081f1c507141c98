"""What the framework integrations' crash-and-resume tests share (tests/integration/
test_hf_trainer.py, test_lightning.py): each test file is also the training script it
launches (``script --job J --out F --hold-at N``); the script trains the job, then a
failure-free reference under ``J-ref``, then relaunches the finished job, and writes
``{"run", "reference", "again"}`` records with ``start``, ``global_step``, ``epoch``,
``lr`` and ``digest`` (model + optimizer state)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest


def require(module: str):
    """The framework under test: skipped where it is not installed, but a failure under
    CI (CI=1), where the test extra must have installed it."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def committed(client, job: str) -> int:
    from snapshotd.wire.errors import UnknownJobError

    try:
        return client.list_versions(job).latest_committed_version
    except UnknownJobError:
        return 0


def _start(daemon, script: str, tmp_path, job: str, name: str, hold_at: int) -> subprocess.Popen:
    env = dict(os.environ, SNAPSHOTD_SOCKET=daemon.socket, OMP_NUM_THREADS="1")
    cmd = [sys.executable, script, "--job", job, "--out", str(tmp_path / f"{name}.json"),
           "--hold-at", str(hold_at)]
    return subprocess.Popen(cmd, env=env, stdout=open(tmp_path / f"{name}.log", "wb"),
                            stderr=subprocess.STDOUT)


def crash_and_resume(daemon, script: str, tmp_path, job: str, kill_after: int,
                     hold_at: int) -> tuple[int, dict]:
    """Run ``script`` until ``kill_after`` is committed (it holds at ``hold_at``), SIGKILL
    it, run it again to the end; return (the committed step at the kill, its records)."""
    client = daemon.client()
    first = _start(daemon, script, tmp_path, job, "first", hold_at)
    second = None
    try:
        deadline = time.monotonic() + 150  # generous: a loaded machine, not a timing bound
        while committed(client, job) < kill_after:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        killed_at = committed(client, job)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _start(daemon, script, tmp_path, job, "second", 0)
        assert second.wait(140) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        client.close()
    return killed_at, json.loads((tmp_path / "second.json").read_text())


def check_resumed_bit_exact(rec: dict, killed_at: int, hold_at: int, steps: int) -> None:
    run, ref = rec["run"], rec["reference"]
    assert killed_at <= run["start"] <= hold_at and ref["start"] == 0, rec
    assert run["global_step"] == ref["global_step"] == steps, rec
    assert run["epoch"] == ref["epoch"] and run["lr"] == ref["lr"], rec
    assert run["digest"] == ref["digest"], rec
    # relaunched once finished, the job restores its last step and trains nothing more
    again = rec["again"]
    assert again["start"] == again["global_step"] == steps and again["digest"] == run["digest"], rec


def check_imports_without(framework: str, integration: str, message: str) -> None:
    """``snapshotd_client`` imports without ``framework``; ``integration`` says what to install."""
    code = (f"import sys\nsys.modules[{framework!r}] = None  # as if not installed\n"
            "import snapshotd_client, snapshotd_client.integrations\n"
            f"try:\n    import {integration}\n"
            "except ImportError as e:\n    print(e)\nelse:\n    print('imported')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == message, r.stdout
