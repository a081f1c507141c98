"""Smoke test: bench/bench_checkfree.py runs end to end at tiny sizes, through the real
CheckFree planner and restore code, and writes valid JSON and a plot."""

from __future__ import annotations

from conftest import REPO
import importlib.util
import json
import os

import pytest

_BENCH = os.path.join(REPO, "bench", "bench_checkfree.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_checkfree_smoke", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_quick_runs_and_writes_json_and_png(tmp_path, capsys):
    bench = _load_bench()
    out, png = tmp_path / "cf.json", tmp_path / "cf.png"
    assert bench.main(["--quick", "--steps", "30", "--fail-at", "15", "--json", str(out), "--png", str(png)]) == 0
    doc = json.loads(out.read_text())
    strategies = ["CheckFree (stage 1 lost)", "CheckFree+ (stage 0 lost)", "random re-init (stage 1 lost)",
                  "restart from 5 steps older"]
    assert list(doc["summary"]) == strategies
    (run,) = doc["runs"]
    assert set(run["losses"]) == {bench.BASE, bench.NATURAL, *strategies}
    base = run["losses"][bench.BASE]
    for name, ls in run["losses"].items():
        assert len(ls) == 30 and all(0 < x < 10 for x in ls), name
        if name != bench.NATURAL:
            assert ls[:15] == base[:15], name  # one shared run up to the failure
    for name in strategies[:3]:  # a rebuilt or re-initialised stage changes the losses after it
        assert run["losses"][name][15:] != base[15:], name
    for s in doc["summary"].values():
        assert all(x is None or 0 <= x < 15 for x in s["steps_to_5pct"] + s["eval_steps_to_5pct"])
    assert "copy of stage 1 (CheckFree+)" in doc["notes"]["CheckFree+ (stage 0 lost)"]
    assert "(CheckFree, grad norms" in doc["notes"]["CheckFree (stage 1 lost)"]
    assert doc["simulated_in_one_process"] is True and "trailing mean" in doc["smoothing"]
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "back within 5%" in capsys.readouterr().out


def test_bench_rejects_bad_arguments():
    bench = _load_bench()
    for bad in (["--stages", "2"], ["--fail-at", "600"], ["--older", "0"], ["--lr-scale", "3"]):
        with pytest.raises(SystemExit):
            bench.main(bad)
