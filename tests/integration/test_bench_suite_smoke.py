"""Smoke test: the whole comparison suite (``python -m bench --quick``) at tiny sizes.

Runs every section end to end as a subprocess (real daemons, real local clusters, real
torch.save / DCP files) and checks that the JSON has every section with sane numbers:
positive and finite times, sizes that match the state, restores verified, the daemons'
memory at least the state they hold, plots written, and a clean machine afterwards.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from snapshotd.wire import shm

from conftest import REPO
SNAPSHOT_CONTENDERS = {"torch.save /dev/shm", "torch.save disk (fsync)", "DCP save disk",
                       "DCP async_save disk", "snapshotd m=0", "snapshotd m=1", "snapshotd m=2"}
RESTORE_CONTENDERS = {"torch.load /dev/shm", "torch.load disk", "DCP load disk", "snapshotd (local daemon)"}


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _bench_segments() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith("bench-suite-")}


def _run(argv, timeout_s):
    """python -m bench; on a timeout SIGTERM first, so the suite stops its daemons."""
    p = subprocess.Popen([sys.executable, "-m", "bench", *argv], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.terminate()
        out, err = p.communicate(timeout=60)
        pytest.fail(f"python -m bench {argv} did not finish in {timeout_s} s: {out[-2000:]} {err[-2000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-suite")
    before = _bench_segments()
    r = _run(["--quick", "--out", str(out), "--disk-dir", str(out)], timeout_s=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "results.json") as f:
        res = json.load(f)
    return out, res, r.stdout, before


@pytest.mark.timeout(300)
def test_every_section_has_sane_numbers(quick_run):
    out, res, stdout, _ = quick_run
    assert res["errors"] == []
    assert res["config"]["quick"] is True
    for key in ("machine", "snapshot", "restore", "memory", "train_overhead", "scaling", "kernels", "gpu",
                "goals"):
        assert key in res, key
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch"]

    (size,) = res["snapshot"]["sizes"]
    S = size["state_bytes"]
    assert 3.5 * 2**20 < S <= 4 * 2**20 + 4096  # params + 2 moments of a 4 MiB state
    assert _pos(size["warm_copy_s"])
    rows = {r["contender"]: r for r in size["rows"]}
    assert set(rows) == SNAPSHOT_CONTENDERS
    for r in rows.values():
        assert _pos(r["blocked_s"]) and _pos(r["safe_s"]), r
        assert r["safe_s"] >= r["blocked_s"] * 0.999, r
        assert all(_pos(x) for x in r["blocked_all_s"] + r["safe_all_s"])
        assert len(r["blocked_all_s"]) == res["config"]["repeats"]
    for name in ("torch.save /dev/shm", "torch.save disk (fsync)"):
        assert rows[name]["file_bytes"] >= S  # the whole state was written
    assert rows["snapshotd m=2"]["nodes"] == 4 and rows["snapshotd m=1"]["nodes"] == 3

    (rest,) = res["restore"]["sizes"]
    rrows = {r["contender"]: r for r in rest["rows"]}
    assert set(rrows) == RESTORE_CONTENDERS
    for r in rrows.values():
        assert r["verified"] is True and _pos(r["restore_s"]) and _pos(r["first_s"])
    (nl,) = res["restore"]["node_loss"]
    assert _pos(nl["rebuild_s"]) and nl["rebuild_bytes"] > 0
    assert nl["rebuild_fetched_bytes"] >= nl["rebuild_bytes"] // 2

    (mem,) = res["memory"]["sizes"]
    mrows = {r["contender"]: r for r in mem["rows"]}
    assert set(mrows) == {"snapshotd m=0", "snapshotd m=1", "snapshotd m=2"}
    for r in mrows.values():
        assert r["shm_bytes"] >= S  # the daemons hold at least the state they committed
        assert r["peak_rss_bytes"] > 0 and r["held_bytes"] >= r["shm_bytes"]
        assert r["ideal_factor"] == 1 + r["m"] / r["k"]
    assert mrows["snapshotd m=2"]["shm_bytes"] > mrows["snapshotd m=0"]["shm_bytes"]  # + parity

    tr = {r["config"]: r for r in res["train_overhead"]["rows"]}
    assert len(tr) == 7 and "never" in tr and "snapshotd every step" in tr
    assert all(_pos(r["mean_step_s"]) and _pos(r["p95_step_s"]) for r in tr.values())
    assert tr["never"]["overhead_pct"] == 0
    base = tr["never"]["mean_step_s"]
    for r in tr.values():  # the overhead quoted is the ratio of the mean steps in this run
        assert r["overhead_pct"] == pytest.approx((r["mean_step_s"] / base - 1) * 100, abs=0.05), r
    cpu_base = tr["never"]["cpu_s_per_step"]  # CPU seconds per step, from the drained rounds
    for r in tr.values():
        assert r["cpu_steps"] >= 10 and _pos(r["cpu_s_per_step"]), r
        assert r["cpu_overhead_pct"] == pytest.approx((r["cpu_s_per_step"] / cpu_base - 1) * 100, abs=0.05), r
    for c in res["train_overhead"]["comparison"]:  # "cheapest" follows from the rows it names
        assert c["snapshotd_cheapest_cpu"] == all(c["snapshotd_cpu_overhead_pct"] < v for v in c["others_cpu"].values())
    from bench import report  # the verdicts stored are those of the stored measurements

    assert [(g["goal"], g["status"]) for g in res["goals"]] == \
        [(g["goal"], g["status"]) for g in report.goals(res)]

    sc = res["scaling"]["nodes"]
    assert [r["nodes"] for r in sc] == [3]
    assert all(_pos(r["pipeline_s"]) and _pos(r["rebuild_s"]) and _pos(r["daemon_cpu_s_per_node"]) for r in sc)

    kr = res["kernels"]["rows"]
    assert any("erasure encode" in r["what"] for r in kr) and any("peer plane" in r["what"] for r in kr)
    assert all(_pos(r["gbps"]) for r in kr)

    gpu = res["gpu"]
    import torch

    if not torch.cuda.is_available():
        assert gpu["skipped"] is True and "no CUDA device" in gpu["reason"]
    else:
        assert _pos(gpu["raw_pinned_copy_s"]) and _pos(gpu["snapshotd"]["copy_done_s"])

    goals = {g["goal"]: g for g in res["goals"]}
    assert set(goals) == {"G1", "G2", "G3", "G4"}
    for gid in ("G1", "G2", "G3"):
        assert goals[gid]["status"] in ("pass", "miss") and _pos(goals[gid]["per_size"][0]["value"])


@pytest.mark.timeout(300)
def test_report_plots_and_cleanup(quick_run):
    out, res, stdout, before = quick_run
    md = (out / "results.md").read_text()
    assert "## Comparison" in md and "snapshotd m=2" in md and "## Goals" in md
    assert res["machine"]["cpu"] in md and res["machine"]["date_utc"] in md
    assert "## Comparison" in stdout  # the summary is printed too
    assert set(res["plots"]) == {"snapshot.png", "restore.png", "train_overhead.png", "memory.png",
                                 "scaling_nodes.png", "kernels.png"}
    for p in res["plots"]:
        data = (out / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert _bench_segments() <= before  # no torch.save file left in /dev/shm
    assert not any(n.startswith("bench-suite-") for n in os.listdir(out))  # disk contenders cleaned up


def test_bad_arguments_are_refused(capsys):
    from bench import suite

    for argv in (["--sizes", "abc"], ["--sizes", "-4"], ["--only", "nothing"], ["--nodes", "1"],
                 ["--repeats", "0"], ["--disk-dir", "/nonexistent/dir"], ["--train-steps", "0"]):
        with pytest.raises(SystemExit) as e:
            suite.parse_args(argv)
        assert e.value.code == 2, argv
        assert "error" in capsys.readouterr().err
    a = suite.parse_args(["--only", "restore"])  # restore comes from the snapshot runs
    assert "snapshot" in a.sections and "train" not in a.sections


def test_report_of_a_gpu_result():
    """Pure logic: how a GPU section (hand-written here, the numbers are made up) is judged
    and rendered; the GPU run itself needs a CUDA device."""
    from bench import report

    gpu = {"skipped": False, "device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda_runtime": "12.x",
           "state_bytes": 4 << 30, "raw_pinned_copy_s": 0.080, "raw_pinned_gbps": 53.7,
           "snapshotd": {"blocked_s": 0.002, "copy_done_s": 0.090, "safe_s": 0.5},
           "torch_save_shm_s": 3.0, "dcp_async": {"blocked_s": 0.4, "safe_s": 4.0},
           "copy_done_over_raw": 0.090 / 0.080, "errors": []}
    res = {"machine": {"cpu": "x", "cores": 16, "ram_bytes": 1 << 37, "python": "3.11", "torch": "2.x",
                       "torch_threads": 16, "kernel": "k", "loadavg_at_start": [0, 0, 0], "date_utc": "d"},
           "config": {"quick": False, "repeats": 3}, "gpu": gpu}
    g4 = next(g for g in report.goals(res) if g["goal"] == "G4")
    assert g4["status"] == "pass" and abs(g4["per_size"][0]["value"] - 1.125) < 1e-9
    gpu["snapshotd"]["copy_done_s"] = 0.2
    gpu["copy_done_over_raw"] = 2.5
    res["goals"] = report.goals(res)
    md = report.markdown(res)
    assert "G4 MISS" in md and "NVIDIA H100 80GB HBM3" in md and "2.50x" in md
