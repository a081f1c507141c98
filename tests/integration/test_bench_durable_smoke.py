"""Smoke test: bench/bench_durable.py runs end to end at tiny sizes and writes valid JSON."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import REPO

_BENCH = os.path.join(REPO, "bench", "bench_durable.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_durable_smoke", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flush_part_runs_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    assert _load_bench().main(["--quick", "--skip-train", "--dir", str(tmp_path / "w"), "--json", str(out)]) == 0
    fl = json.loads(out.read_text())["flush"]
    assert fl["bytes"] == 2 << 20 and fl["file_bytes"] > fl["bytes"]  # torch.save adds its headers
    assert fl["flush_s"] > 0 and fl["plain_write_s"] > 0 and fl["capture_reused_s"] > 0
    assert fl["flush_over_plain"] == pytest.approx(fl["flush_s"] / fl["plain_write_s"])


@pytest.mark.slow  # two daemons and two short training runs
def test_training_part_runs(tmp_path):
    out = tmp_path / "b.json"
    assert _load_bench().main(["--quick", "--dir", str(tmp_path / "w"), "--json", str(out)]) == 0
    tr = json.loads(out.read_text())["train"]
    assert tr["flushed_versions"] and tr["off"]["steps"] == tr["on"]["steps"] == 4
    assert tr["on"]["daemon_cpu_per_step_s"] > 0 and tr["cpu_ratio"] == pytest.approx(
        tr["on"]["cpu_per_step_s"] / tr["off"]["cpu_per_step_s"])
