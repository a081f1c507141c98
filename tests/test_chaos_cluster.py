"""``snapshotd chaos`` against real daemons and trainers.

- the CI-sized subset of the built-in matrix (``ci: true`` in builtin.yaml) must hold
  every invariant;
- the same harness against a deliberately broken build (SNAPSHOTD_UNSAFE_SKIP_VERIFY=1:
  the daemons skip every checksum check) with the data-corruption scenario must report
  the violation and exit non-zero;
- the full matrix, only with ``-m slow`` (10-25 minutes here).

The harness runs as a subprocess (``snapshotd chaos``), as a user would run it; each
scenario brings up and tears down its own cluster, and the ``no_leaks`` invariant checks
that no daemon, trainer or /dev/shm segment of it is left. The reference run is shared
by the tests of this module (one work directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from snapshotd import shm
from snapshotd.chaos.scenarios import builtin_scenarios


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chaos")
    yield d
    # Belt and braces: the harness frees its segments itself (no_leaks checks it).
    for inst in d.glob("*/instance"):
        for name in shm.list_segments(f"snapshotd.{inst.read_text().strip()}."):
            shm.unlink(name)


# CI size: 3 nodes, m = 1, 10 steps (the full matrix below runs the default 4 nodes, m = 2).
CI_CLUSTER = ("--nodes", "3", "--parity", "1", "--steps", "10")


def _chaos(workdir, *args, env=None, timeout=900) -> tuple[int, str, dict]:
    report = workdir / f"report-{len(list(workdir.glob('report-*')))}.json"
    p = subprocess.Popen([sys.executable, "-m", "snapshotd.cli", "chaos", "--dir", str(workdir),
                          "--report", str(report), *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **(env or {})))
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()  # SIGTERM: the harness tears its cluster down before it exits
        out, _ = p.communicate(timeout=120)
        pytest.fail(f"snapshotd chaos did not finish in {timeout} s:\n{out[-4000:]}")
    doc = json.loads(report.read_text()) if report.exists() else {}
    return p.returncode, out, doc


def _assert_all_held(rc, out, doc, names):
    assert rc == 0, out[-4000:]
    assert doc["ok"] is True
    assert [s["scenario"] for s in doc["scenarios"]] == names
    for s in doc["scenarios"]:
        assert s["ok"] and not s["error"], s
        checks = {c["name"]: c for c in s["checks"]}
        assert all(c["ok"] for c in checks.values()), checks
        assert "bit_identical" in checks and "no_leaks" in checks and "memory" in checks
        assert checks.get("restorable", checks.get("refused"))["ok"]
    assert f"{len(names)}/{len(names)} scenarios held every invariant" in out


@pytest.mark.timeout(900)
def test_ci_matrix_holds_every_invariant(workdir):
    names = [s.name for s in builtin_scenarios() if s.ci]
    rc, out, doc = _chaos(workdir, "--ci", *CI_CLUSTER)
    _assert_all_held(rc, out, doc, names)
    by = {s["scenario"]: s for s in doc["scenarios"]}
    # The m+1 loss was refused with an error naming the version, never restored.
    refused = {c["name"]: c for c in by["kill-m-plus-1-nodes"]["checks"]}["refused"]
    assert "version" in refused["detail"]
    # The flipped bit was caught by a checksum, and the node rebuilt.
    assert "checksum" in by["corrupt-data-block"]["detected"].lower()
    assert "rebuilt" in by["corrupt-data-block"]["recovery"]


@pytest.mark.timeout(600)
def test_a_build_that_skips_verification_fails_the_harness(workdir):
    rc, out, doc = _chaos(workdir, "--only", "corrupt-data-block", *CI_CLUSTER,
                          env={"SNAPSHOTD_UNSAFE_SKIP_VERIFY": "1"})
    assert rc == 1, out[-4000:]
    assert doc["ok"] is False and doc["meta"]["unsafe_skip_verify"] is True
    (s,) = doc["scenarios"]
    failed = {c["name"]: c["detail"] for c in s["checks"] if not c["ok"]}
    assert "bit_identical" in failed, s
    assert "restored step 10" in failed["bit_identical"]
    assert "0/1 scenarios held every invariant" in out and "violated:" in out


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_builtin_matrix_holds_every_invariant(workdir, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full matrix takes 10-25 min on 2 shared cores: run it with -m slow")
    names = [s.name for s in builtin_scenarios()]
    rc, out, doc = _chaos(workdir, timeout=3600)
    _assert_all_held(rc, out, doc, names)
