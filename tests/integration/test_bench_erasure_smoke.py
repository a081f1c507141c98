"""Smoke test: bench/bench_erasure.py runs end to end at tiny sizes and writes valid JSON."""

from __future__ import annotations

from conftest import REPO
import importlib.util
import json
import os

import pytest

_BENCH = os.path.join(REPO, "bench", "bench_erasure.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_erasure_smoke", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("k,m", [(4, 2), (3, 1)])
def test_bench_quick_runs_and_writes_json(tmp_path, capsys, k, m):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--size-mib", "0.0625", "--k", str(k), "--m", str(m),
                     "--reedsolo-kib", "0.5", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["k"] == k and doc["m"] == m and doc["repeats"] <= 2
    libs = {r["library"]: r for r in doc["results"]}
    assert "snapshotd numpy" in libs
    reported = set(libs) | {s["library"] for s in doc["skipped"]}
    assert {"snapshotd isal", "pyeclib isa_l_rs_vand", "zfec", "reedsolo"} <= reported
    # every library coded the same payload (bench_erasure asserts each one round-trips:
    # a failed decode is rc != 0 above), and the ratios are relative to the ISA-L row
    for r in doc["results"]:  # reedsolo is pure Python: it gets --reedsolo-kib; sizes round down to k
        want = 512 if r["library"] == "reedsolo" else 64 * 1024
        assert want - k < r["size_bytes"] <= want, r
    base = libs.get("snapshotd isal")
    for r in doc["results"]:
        assert r["encode_gbps"] > 0 and r["decode_gbps"] > 0
        if base:
            assert r["encode_vs_isal"] == pytest.approx(r["encode_gbps"] / base["encode_gbps"], rel=1e-6)
            assert r["decode_vs_isal"] == pytest.approx(r["decode_gbps"] / base["decode_gbps"], rel=1e-6)
    text = capsys.readouterr().out
    assert "encode GB/s" in text and "decode GB/s" in text


def test_bench_rejects_bad_arguments():
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--k", "0"])
