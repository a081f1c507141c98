"""``snapshotd plan``: the console script runs, recommends something the simulator can
stand behind, refuses bad input with a clear message, and draws its plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from snapshotd.core.sim.analysis import domain_members
from snapshotd.core.sim.model import Job
from snapshotd_tools import plan

SNAPSHOTD = os.path.join(os.path.dirname(sys.executable), "snapshotd")


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SNAPSHOTD, "plan", *args], capture_output=True, text=True, timeout=120)


def test_plan_recommends_and_compares():
    p = _plan("--nodes", "256", "--state-per-node", "20GB", "--memory-per-node", "256GiB", "--nic-gbps", "200",
              "--step-s", "5", "--profile", "llama3", "--days", "30", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    n, m = out["group_size"], out["parity"]
    assert 256 % n == 0 and 0 < m < n
    assert m >= domain_members(Job(nodes=256, state_bytes_per_node=20e9), n)  # survives a whole rack
    rec = out["recommended"]
    assert rec["survives_domain"] and rec["memory_losses"] == 0
    assert rec["memory_bytes_per_node"] <= 256 * 2 ** 30
    alts = {a["strategy"]: a for a in out["alternatives"]}
    assert rec["ettr"] > alts["disk checkpoint"]["ettr"]
    zero = [a for s, a in alts.items() if s.endswith("m=0")]
    assert zero and zero[0]["memory_losses"] > 0 and rec["ettr"] > zero[0]["ettr"]
    assert out["snapshot_interval_s"] >= 5 and out["durable_interval_s"] >= 3600


def test_plan_text_llama3_and_memory_budget(capsys):
    assert plan.main(["--nodes", "64", "--state-per-node", "20GB", "--memory-per-node", "30GB", "--days", "20"]) == 0
    out = capsys.readouterr().out
    assert "recommended:" in out and "DOES NOT FIT" in out
    assert "no snapshotd option fits the memory budget" in out


@pytest.mark.parametrize("args,msg", [
    (["--nodes", "64", "--state-per-node", "lots"], "not a size"),
    (["--nodes", "64", "--state-per-node", "1GB", "--profile", "custom"], "--gpu-mtbf-h"),
    (["--nodes", "0", "--state-per-node", "1GB"], "nodes must be"),
    (["--nodes", "63", "--state-per-node", "1GB"], "divides 63"),
])
def test_plan_refuses_bad_input(args, msg, capsys):
    assert plan.main(args) == 2
    out = capsys.readouterr()
    assert msg in out.err and not out.out


def test_plan_custom_profile_and_plot(tmp_path, capsys):
    png = tmp_path / "ettr.png"
    rc = plan.main(["--nodes", "32", "--state-per-node", "8GB", "--profile", "custom", "--gpu-mtbf-h", "2000",
                    "--days", "10", "--pipeline-stages", "4", "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr()
    assert f"job MTBF {2000 / 256:.2f} h" in out.out and "CheckFree (4 stages)" in out.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plan_parity_covers_big_failure_domains(capsys):
    """Racks of 16 nodes in a 64-node job: a group of 8 has 2 nodes per rack, so only
    m >= 2 survives a rack (a group of 4 has 1 per rack)."""
    assert plan.main(["--nodes", "64", "--state-per-node", "10GB", "--nodes-per-domain", "16",
                      "--days", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n, m = out["group_size"], out["parity"]
    need = domain_members(Job(nodes=64, state_bytes_per_node=10e9, nodes_per_domain=16), n)
    assert m >= need and out["recommended"]["survives_domain"], (n, m, need)
