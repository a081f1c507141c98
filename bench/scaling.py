"""Scaling with the number of nodes: ``bench.bench_cluster`` at 2..8 local nodes.

Each node's rank stores the same ``per_node_mib`` (weak scaling: what a real job sees
when it adds nodes with their own ranks); m = 1 below 4 nodes, else 2. All daemons and
the one process playing every rank share this machine's cores, so the time of a
snapshot grows with n here, while on real nodes each daemon has its own: the daemon
CPU-seconds per node (measured from /proc) is the figure that carries over, and
``gbps_per_node_per_core`` is the rate a node would reach with one core for its daemon;
``one_active_gbps`` is bench_cluster's run where only node 0 snapshots its full state (the
others a few bytes), i.e. one node's pipeline with the machine's cores to itself.
Scaling with state size comes from the snapshot section's sweep over sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from bench import common as cm


def parity_for(nodes: int) -> int:
    return 1 if nodes < 4 else 2


def run(node_counts: list[int], per_node_mib: int, block_size: str, repeats: int,
        timeout_s: float = 600) -> list[dict]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for n in node_counts:
        m = parity_for(n)
        cm.say(f"scaling: {n} nodes, m={m}, {per_node_mib} MiB per node")
        with tempfile.TemporaryDirectory(prefix="bench-suite-scale-") as d:
            out = os.path.join(d, "r.json")
            cmd = [sys.executable, "-m", "bench.bench_cluster", "--nodes", str(n), "--parity", str(m),
                   "--size-mib", str(per_node_mib), "--block-size", block_size,
                   "--repeats", str(repeats), "--json", out]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root)
            if r.returncode != 0 or not os.path.exists(out):
                rows.append({"nodes": n, "parity": m, "error": r.stderr[-1500:]})
                cm.say(f"  {n} nodes failed: {r.stderr[-300:]}")
                continue
            with open(out) as f:
                res = json.load(f)
        keep = ("nodes", "parity", "k", "state_bytes_per_node", "pipeline_s", "pipeline_gbps_per_node",
                "daemon_cpu_s_per_node", "gbps_per_node_per_core", "save_blocking_ms_median",
                "rebuild_s", "rebuild_gbps", "rebuild_bytes", "rebuild_fetched_bytes",
                "one_active_pipeline_s", "one_active_gbps")
        rows.append({k: res.get(k) for k in keep})
    return rows
