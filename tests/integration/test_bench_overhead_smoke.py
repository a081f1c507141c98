"""Smoke test: the per-save overhead benchmark (bench/bench_overhead_gpt.py) runs end to
end at tiny sizes, and what it reports is consistent with itself (no timing asserted)."""

import json
import statistics

import pytest

from bench import bench_overhead_gpt as bo


def test_bench_overhead_quick(tmp_path):
    out = tmp_path / "r.json"
    assert bo.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    g = r["gpt"]
    steps = g["rounds"] * g["round_steps"]
    assert g["steps_each"] == 2 * steps  # both ranks' steps, each mode
    for k in g["ranks"]:
        assert k["steps_each"] == steps and k["skipped"] == 0
        assert k["last_step"] == 5 + 2 * steps  # warm-up steps + the timed ones
        # the last save (the last round's "on" half: the order flips every round) committed
        last_on = k["last_step"] - (g["round_steps"] if g["rounds"] % 2 == 0 else 0)
        assert k["last_saved"] == k["latest_committed"] == last_on
        assert k["payload_bytes"] >= k["state_bytes"] > 1_000_000  # model + AdamW moments
        assert k["overhead_median"] == pytest.approx(k["median_step_on_s"] / k["median_step_off_s"] - 1)
        assert 0 < k["save_median_s"] <= k["save_p90_s"] <= k["save_max_s"]
        assert k["save_median_s"] < k["median_step_on_s"]  # a save is part of its step
        assert 0 <= k["backpressure_median_s"] <= k["save_max_s"]
        # after the gap of the "off" steps three saves set the interval again, asking the
        # daemon themselves; the next ones may find their segment staged ahead
        assert 3 <= k["acquired_by_save"] <= steps
    assert g["overhead_median"] == pytest.approx(g["median_step_on_s"] / g["median_step_off_s"] - 1)
    assert g["met"] == (g["overhead_median"] <= g["goal_overhead"])
    assert g["cpu_overhead"] == pytest.approx(g["cpu_step_on_s"] / g["cpu_step_off_s"] - 1)
    # the daemon's CPU is a part of the total (read in clock ticks: may be 0 in a short run)
    assert 0 <= g["daemon_cpu_step_off_s"] < g["cpu_step_off_s"]
    assert 0 <= g["daemon_cpu_step_on_s"] < g["cpu_step_on_s"]
    assert g["warm_copy_s"] == statistics.median(k["warm_copy_s"] for k in g["ranks"])
    (row,) = r["blocking"]["rows"]
    assert abs(row["state_bytes"] - (1 << 20)) <= 4096 and row["repeats"] == 2  # params + moments
    assert row["payload_bytes"] >= row["state_bytes"]
    assert row["excess_s"] == pytest.approx(row["blocking_median_s"] - row["warm_copy_median_s"])
    assert row["blocking_over_copy"] == pytest.approx(row["blocking_median_s"] / row["warm_copy_median_s"])
    assert row["met"] == (row["excess_s"] <= r["blocking"]["goal_excess_s"])


def test_bench_overhead_refuses_bad_arguments():
    for bad in (["--rounds", "0"], ["--sizes", "x"], ["--nodes", "3"], ["--nodes", "1", "--parity", "1"]):
        with pytest.raises(SystemExit):
            bo.main(bad)
