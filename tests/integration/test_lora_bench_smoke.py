"""Smoke test: the LoRA incremental-snapshot benchmark (bench/bench_lora.py) runs end to
end at tiny sizes on a real 3-node cluster, with incremental snapshots off and on."""

import json

import pytest

from bench import bench_lora


@pytest.mark.timeout(300)
def test_bench_lora_quick(tmp_path):
    out = tmp_path / "r.json"
    assert bench_lora.main(["--quick", "--json", str(out)]) == 0  # 1: a restore differed
    r = json.loads(out.read_text())
    off, on = r["modes"]["off"], r["modes"]["on"]
    assert off["restore_bit_exact"] and on["restore_bit_exact"]
    D = on["state_bytes"]
    assert all(s["copied"] >= 0.95 * D for s in off["saves"])  # off: every save copies all
    warm = on["saves"][3:]
    assert any(s["copied"] < 0.3 * D and s["hashed"] < 0.3 * D for s in warm), warm
    assert on["median_after_warmup"]["net_per_node"] > 0
