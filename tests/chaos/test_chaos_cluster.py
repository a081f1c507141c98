"""``snapshotd chaos`` against real daemons and trainers.

- the full built-in matrix (every fault kind, 24 scenarios, about 3 minutes here) must
  hold every invariant: one cluster, one running job, the faults one after another,
  four of them with a second fault during the first one's recovery (overlaps);
- the same harness against a deliberately broken build (SNAPSHOTD_UNSAFE_SKIP_VERIFY=1:
  the daemons skip every checksum check) with the data-corruption scenario must report
  the violation and exit non-zero;
- a one-minute soak: faults at random times (seeded) into the same running job, some
  with an overlapping second fault (``--overlap``).

The harness runs as a subprocess (``snapshotd chaos``), as a user would run it; the
``teardown`` row checks that no daemon, trainer or /dev/shm segment of its cluster is
left. The reference run is shared by the tests of this module (one work directory).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from snapshotd.wire import shm
from snapshotd_tools.chaos.scenarios import FAULTS, builtin_scenarios


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chaos")
    yield d
    # Belt and braces: the harness frees its segments itself (no_leaks checks it).
    for inst in d.glob("*/instance"):
        for name in shm.list_segments(f"snapshotd.{inst.read_text().strip()}."):
            shm.unlink(name)


def _chaos(workdir, *args, env=None, timeout=900) -> tuple[int, str, dict]:
    report = workdir / f"report-{len(list(workdir.glob('report-*')))}.json"
    p = subprocess.Popen([sys.executable, "-m", "snapshotd_tools.cli", "chaos", "--dir", str(workdir),
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
    assert [s["scenario"] for s in doc["scenarios"]] == names + ["teardown"]
    for s in doc["scenarios"]:
        assert s["ok"] and not s["error"], s
        checks = {c["name"]: c for c in s["checks"]}
        assert checks and all(c["ok"] for c in checks.values()), checks
        if s["scenario"] == "teardown":
            assert "no_leaks" in checks
            continue
        assert "no_leaks" in checks and "memory" in checks
        assert "not measured" not in checks["memory"]["detail"]
        assert "since the session's start" in checks["memory"]["detail"]
        if s["params"].get("overlap"):  # the second fault went in, during that phase
            assert s["overlap"].startswith(f"during {s['params']['overlap']['during']}:"), s
        if s["params"]["kind"] != "pipeline_loss":  # a new version after every fault
            assert checks["commit_after_fault"]["ok"], checks
        if s["params"]["kind"] == "pipeline_loss":
            assert checks["checkfree"]["ok"]
        else:
            assert "bit_identical" in checks
            assert checks.get("restorable", checks.get("refused"))["ok"]
    assert f"{len(names) + 1}/{len(names) + 1} scenarios held every invariant" in out


@pytest.mark.timeout(900)
def test_full_builtin_matrix_holds_every_invariant(workdir):
    names = [s.name for s in builtin_scenarios()]
    rc, out, doc = _chaos(workdir)
    _assert_all_held(rc, out, doc, names)
    by = {s["scenario"]: s for s in doc["scenarios"]}
    assert {s["params"]["kind"] for s in doc["scenarios"][:-1]} == set(FAULTS)
    # One cluster and one job for the whole matrix: the job was restarted, never rebooted.
    assert doc["meta"]["launches"] >= len(names) and doc["meta"]["epochs"] >= 2
    # The m+1 loss was refused with an error naming the version, never restored.
    refused = {c["name"]: c for c in by["kill-m-plus-1-nodes"]["checks"]}["refused"]
    assert "version" in refused["detail"]
    # The flipped bits were caught by a checksum, and the data came back from the group:
    # the corrupt shard decoded from it, or repaired (by the scrubber, or a told holder).
    for name in ("corrupt-data-block", "corrupt-parity-scrubbed", "corrupt-data-scrubbed"):
        assert "checksum" in by[name]["detected"].lower(), by[name]
        assert any(w in by[name]["recovery"] for w in ("decoded", "repaired", "rebuilt")), by[name]
    # The overlaps landed where they say: the replacement still rebuilding, a restore
    # under way, the daemons logging the degraded reads.
    assert "still rebuilding" in by["overlap-node-during-rebuild"]["overlap"]
    assert "0 done" in by["overlap-daemon-during-restore"]["overlap"]
    degraded = by["overlap-trainer-during-degraded-read"]["overlap"]
    assert "inside its restore" in degraded and "degraded read(s) logged" in degraded
    # Junk was answered with the promised codes (the verdict built from the answers).
    checks = {c["name"]: c for c in by["garbage-grpc"]["checks"]}
    assert "answered: INVALID_ARGUMENT x8" in checks["garbage_refused"]["detail"]
    assert len(doc["meta"]["memory_curve"]) >= 2
    # Every state any rank held, between faults too, was compared with the reference.
    compared = sum(int(c["detail"].split()[0]) for s in doc["scenarios"] for c in s["checks"]
                   if c["name"] == "bit_identical" and c["ok"])
    assert compared > 4 * 80


@pytest.mark.timeout(600)
def test_a_build_that_skips_verification_fails_the_harness(workdir):
    rc, out, doc = _chaos(workdir, "--only", "corrupt-data-block",
                          env={"SNAPSHOTD_UNSAFE_SKIP_VERIFY": "1"})
    assert rc == 1, out[-4000:]
    assert doc["ok"] is False and doc["meta"]["unsafe_skip_verify"] is True
    s = doc["scenarios"][0]
    assert s["scenario"] == "corrupt-data-block"
    failed = {c["name"]: c["detail"] for c in s["checks"] if not c["ok"]}
    assert "bit_identical" in failed, s
    assert re.search(r"restored step \d+: \w+ != reference", failed["bit_identical"]), failed
    assert "violated:" in out and "corrupt-data-block: bit_identical:" in out


@pytest.mark.timeout(600)
def test_soak_injects_seeded_random_faults_into_one_running_job(workdir):
    rc, out, doc = _chaos(workdir, "--soak", "--duration", "60s", "--mtbf", "8", "--seed", "5",
                          "--overlap", "0.5")
    assert rc == 0, out[-4000:]
    assert doc["ok"] is True and doc["meta"]["soak"] is True and doc["meta"]["seed"] == 5
    faults = [s for s in doc["scenarios"] if s["scenario"] != "teardown"]
    assert len(faults) >= 3, out[-3000:]
    assert all(s["scenario"].startswith("soak-") and s["ok"] for s in faults)
    # Seed 5's first fault carries an overlap (a partition during a commit).
    assert doc["meta"]["overlap_p"] == 0.5 and faults[0]["overlap"].startswith("during commit:")
    # The faults went into the running job at their scheduled times (late only while
    # the previous one was still being recovered from).
    times = [s["params"]["t_s"] for s in faults]
    assert times == sorted(times) and times[-1] < 60
    assert doc["scenarios"][-1]["scenario"] == "teardown" and doc["scenarios"][-1]["ok"]
