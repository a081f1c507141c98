"""bench/save_loop.py (issue 16's per-save CPU figures) runs against a real daemon and its
per-thread CPU adds up: a smoke test, no timing asserted."""

import json
import subprocess
import sys


def test_save_loop_reports_cpu_per_save_and_per_thread(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.save_loop", "--saves", "40"], capture_output=True,
                         text=True, timeout=240, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["saves"] == 40 and r["blocking_median_ms"] > 0 and r["daemon_cpu_ms"] > 0
    t, d = r["trainer_threads_ms"], r["daemon_threads_ms"]
    assert t["training"] > 0 and t["handoff"] > 0 and d["busiest"] > 0
    # the threads named are part of their process's totals (process_time: this process)
    assert t["training"] + t["handoff"] + t["zmq_io"] <= r["trainer_cpu_ms"] * 1.05 + 0.05
    assert d["busiest"] + d["zmq_io"] <= r["daemon_cpu_ms"] * 1.05 + 0.05
