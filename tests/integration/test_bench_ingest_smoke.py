"""Smoke test: the ingest benchmark runs end to end at tiny sizes."""

import json

import pytest

from bench import bench_ingest


def test_bench_ingest_quick(tmp_path):
    out = tmp_path / "r.json"
    assert bench_ingest.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["state_bytes"] == 8 << 20 and r["tensors"] >= 1  # what --quick asks for
    # the reported rates and ratio are the reported times' (the README quotes them)
    assert r["ingest_gbps"] == pytest.approx(r["state_bytes"] / (r["ingest_ms"] / 1e3) / 1e9, rel=1e-6)
    assert r["warm_copy_gbps"] == pytest.approx(r["state_bytes"] / (r["warm_copy_ms"] / 1e3) / 1e9, rel=1e-6)
    assert r["blocking_over_copy"] == pytest.approx(r["blocking_ms"] / r["warm_copy_ms"], rel=1e-6)
    # a save cannot block for less than the time it takes to ingest the whole state
    assert 0 < r["blocking_ms"] <= r["ingest_ms"]
