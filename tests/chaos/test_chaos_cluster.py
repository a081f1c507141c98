"""``snapshotd chaos`` against real daemons and trainers.

- the full built-in matrix (every fault kind, 25 scenarios, about 3 minutes here) must
  hold every invariant: one cluster, one running job, the faults one after another,
  four of them with a second fault during the first one's recovery (overlaps);
- the same harness against a deliberately broken build (SNAPSHOTD_UNSAFE_SKIP_VERIFY=1:
  the daemons skip every checksum check) with the data-corruption scenario must report
  the violation and exit non-zero;
- a one-minute trace-driven soak (``--soak --profile llama3``): faults at random times
  (seeded) into the same running job, their kinds at the Llama 3 failure profile's rates
  (process restarts, lost nodes, a whole failure domain lost at once, slow nodes), some
  with a correlated second fault during the first one's recovery (``--overlap``); its
  30-minute version is marked slow (``-m slow``).

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
from collections import Counter

import pytest

from conftest import REPO
from snapshotd.wire import shm
from snapshotd.core.sim.profiles import fault_kinds, llama3
from snapshotd_tools.chaos.profile import KINDS, profile_schedule
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


def _profile_soak(workdir, duration: str, mtbf: float, seed: int, overlap: float, timeout: int):
    """A ``--soak --profile llama3`` run; every invariant must hold, and the faults that ran
    must be the seeded schedule's, in order, at the profile's kinds."""
    rc, out, doc = _chaos(workdir, "--soak", "--profile", "llama3", "--duration", duration, "--mtbf",
                          str(mtbf), "--seed", str(seed), "--overlap", str(overlap), timeout=timeout)
    assert rc == 0, out[-4000:]
    meta = doc["meta"]
    assert doc["ok"] is True and meta["soak"] is True and meta["seed"] == seed
    assert meta["profile"] == "llama3" and meta["domains"] == [["n0", "n1"], ["n2", "n3"]]
    kinds = fault_kinds(llama3())
    events = profile_schedule(seed, meta["duration_s"], mtbf, kinds, 4, 2, 80, overlap, tag="llama3")
    faults = [s for s in doc["scenarios"] if s["scenario"] != "teardown"]
    assert doc["scenarios"][-1]["scenario"] == "teardown" and doc["scenarios"][-1]["ok"]
    assert [s["scenario"] for s in faults] == [e.scenario.name for e in events[:len(faults)]]
    assert all(s["ok"] for s in faults)
    by_kind, ran = meta["kinds"], Counter(e.fault for e in events[:len(faults)])
    for k, share in kinds:
        assert by_kind[k]["share"] == pytest.approx(share, abs=1e-4)
        assert by_kind[k]["drawn"] == sum(e.fault == k for e in events) and by_kind[k]["run"] == ran[k]
    assert sum(v["run"] for v in by_kind.values()) == len(faults) == meta["faults_run"]
    for s, e in zip(faults, events):
        if e.fault == "kill_domain":  # one whole rack at once, replaced and rebuilt
            assert s["fault"].startswith(f"SIGKILL nodes {','.join(e.scenario.params['nodes'])} "), s
            assert "rebuilt from the group" in s["recovery"], s
        if s["params"].get("overlap"):  # the correlated second fault went in, during its phase
            assert s["overlap"].startswith(f"during {s['params']['overlap']['during']}:"), s
    times = [s["params"]["t_s"] for s in faults]
    assert times == sorted(times) and times[-1] < meta["duration_s"]
    return faults, events


@pytest.mark.timeout(600)
def test_profile_soak_injects_llama3_faults_into_one_running_job(workdir):
    """``--soak --profile llama3`` for a minute: seed 10's schedule opens with a slow node, a
    whole failure domain (n2,n3) lost at once and a lost node, and carries overlaps."""
    faults, events = _profile_soak(workdir, "60s", 8, 10, 0.5, timeout=600)
    assert len(faults) >= 3, faults
    assert [e.fault for e in events[:3]] == ["slow_node", "kill_domain", "kill_node"]
    assert sum(bool(e.scenario.overlap) for e in events) >= 2


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_profile_soak_30_minutes(workdir):
    """The 30-minute version (run on demand: ``-m slow``); docs/CHAOS.md quotes one."""
    faults, events = _profile_soak(workdir, "30m", 20, 1, 0.25, timeout=2600)
    assert len(faults) >= 40 and {e.fault for e in events[:len(faults)]} == set(KINDS)
