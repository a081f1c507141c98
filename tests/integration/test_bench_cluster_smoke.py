"""Smoke test: the cluster benchmark runs end to end at tiny sizes."""

import json

import pytest

from bench import bench_cluster


@pytest.mark.timeout(300)
def test_bench_cluster_quick(tmp_path):
    out = tmp_path / "r.json"
    assert bench_cluster.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["pipeline_gbps_per_node"] > 0 and r["rebuild_bytes"] > 0
    assert r["rebuild_fetched_bytes"] >= r["rebuild_bytes"] // 2
