"""Smoke test of bench/bench_dcp.py at tiny sizes: its rank workers save (async_save, both
storages) and load resharded (2 -> 1), and every element a load gets is checked against the
saved pattern (``check_state``), so a wrong byte fails the run. Timing is not asserted.
Slow: each step starts its own rank processes (~1 min on a loaded 2-core machine)."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
from test_dcp import daemon_m  # noqa: E402,F401  (shared fixture)


@pytest.mark.slow
def test_bench_dcp_workers_save_and_reshard_load_consistently(daemon_m, tmp_path):
    from bench import bench_dcp

    base = {"size_mib": 2, "tensor_mib": 1, "repeats": 1}
    kinds = {"fs": {"kind": "fs", "dir": str(tmp_path / "fs")},
             "snap": {"kind": "snap", "sockets": [daemon_m.socket], "local_world_size": 2,
                      "job": "bench-smoke"}}
    for cfg in kinds.values():
        saved = bench_dcp.run_ranks({**base, **cfg, "op": "save"}, 2, str(tmp_path))
        assert len(saved["blocking"]) == 1 and 0 < saved["blocking"][0] <= saved["safe"][0]
        loaded = bench_dcp.run_ranks({**base, **cfg, "op": "load"}, 1, str(tmp_path))
        assert len(loaded["load"]) == 1 and loaded["load"][0] > 0


def test_bench_dcp_refuses_a_run_that_does_not_fit_in_memory():
    """The 1 GiB runs share the machine: below the projected peak + margin the bench
    refuses with the figures, before it starts anything."""
    from bench import bench_dcp

    need = bench_dcp.projected_peak_bytes(1024, "all")
    assert need > bench_dcp.projected_peak_bytes(1024, "load") > bench_dcp.projected_peak_bytes(256, "load")
    with pytest.raises(SystemExit, match=r"refusing .*projected peak .* > MemAvailable"):
        bench_dcp.check_memory(1024, "all", available=need + bench_dcp.MARGIN - 1)
    bench_dcp.check_memory(1024, "all", available=need + bench_dcp.MARGIN)  # fits: no error
    with pytest.raises(SystemExit, match="refusing"):  # main checks before any daemon starts
        bench_dcp.main(["--size-mib", str(1 << 40)])
