"""Smoke test: the ingest benchmark runs end to end at tiny sizes."""

import json

from bench import bench_ingest


def test_bench_ingest_quick(tmp_path):
    out = tmp_path / "r.json"
    assert bench_ingest.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["state_bytes"] > 0 and r["blocking_ms"] > 0 and r["ingest_gbps"] > 0
