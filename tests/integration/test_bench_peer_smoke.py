"""Smoke test: bench/bench_peer.py runs end to end at tiny sizes and writes valid JSON."""

from __future__ import annotations

from conftest import REPO
import importlib.util
import json
import os

import pytest

_BENCH = os.path.join(REPO, "bench", "bench_peer.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_peer_smoke", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_quick_runs_and_writes_json(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--size-mib", "1", "--block-mib", "0.125", "--malloc", "default",
                     "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["repeats"] == 2 and doc["blocks"] == 8 and doc["block_bytes"] == 128 * 1024
    rows = {(r["transport"], r["key"], r["direction"]) for r in doc["results"]}
    assert rows == {
        (bench.RAW, False, "one-way"),
        (bench.OURS, False, "upload"), (bench.OURS, False, "download"),
        (bench.OURS, True, "upload"), (bench.OURS, True, "download"),
    }
    raw = next(r for r in doc["results"] if r["transport"] == bench.RAW)
    for r in doc["results"]:
        assert len(r["rates"]) == 2 and r["malloc"] == "default"
        # the figure is a central value of its repeats, and vs_raw is relative to the raw row
        assert min(r["rates"]) <= r["gbps"] <= max(r["rates"]) and r["gbps"] > 0, r
        assert r["vs_raw"] == pytest.approx(r["gbps"] / raw["gbps"], rel=1e-6), r
    text = capsys.readouterr().out
    assert "GB/s" in text and "vs raw" in text and "upload" in text and "download" in text


def test_bench_rejects_bad_arguments():
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--window", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--malloc", "fancy"])
