"""Kernels and transports against ../shared/ANCHORS.md, by rerunning the existing
benchmarks (their ``main(argv)`` with ``--json``) and reading back their figures:

  * erasure encode / decode of m losses, k=4 m=2 (``bench.bench_erasure``, in process);
  * peer plane over loopback TCP vs raw pyzmq (``bench.bench_peer``, as a subprocess:
    it tunes glibc malloc for good, which must not leak into the other measurements);
  * memory copy and same-host ingest come from the snapshot section of the same run
    (one warm copy of the state; snapshotd m=0 time until the daemon holds it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# Anchor figures (GB/s, 1 GB = 1e9 bytes) from ../shared/ANCHORS.md, same kind of machine.
ANCHORS = {
    "memory copy (warm, 1 thread)": 13.0,       # 12-14
    "erasure encode k=4 m=2 (ISA-L)": 17.9,
    "erasure decode 2 losses (ISA-L)": 16.5,
    "loopback TCP (pyzmq PUSH/PULL)": 4.6,
    "shared memory end to end": 6.1,
    "H100 device -> pinned host": 54.8,
}


def erasure(size_mib: float, repeats: int, quick: bool) -> dict:
    from bench import bench_erasure

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "e.json")
        argv = ["--size-mib", str(size_mib), "--repeats", str(repeats), "--json", out]
        if quick:
            argv += ["--quick", "--reedsolo-kib", "0.5"]
        bench_erasure.main(argv)
        with open(out) as f:
            return json.load(f)


def peer(size_mib: float, block_mib: float, repeats: int, timeout_s: float = 300) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "p.json")
        cmd = [sys.executable, "-m", "bench.bench_peer", "--size-mib", str(size_mib),
               "--block-mib", str(block_mib), "--repeats", str(repeats), "--malloc", "tuned",
               "--json", out]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root)
        if r.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"bench_peer failed ({r.returncode}): {r.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def summarize(er: dict, pr: dict, warm_copy_gbps: float | None, ingest_gbps: float | None) -> list[dict]:
    """Rows: what, measured GB/s, anchor GB/s, ratio."""
    rows = []

    def add(what, gbps, anchor_key, source):
        anchor = ANCHORS.get(anchor_key)
        rows.append({"what": what, "gbps": gbps, "anchor_gbps": anchor, "anchor": anchor_key,
                     "vs_anchor": (gbps / anchor) if (gbps and anchor) else None, "source": source})

    if warm_copy_gbps:
        add("warm copy of the state (torch copy_)", warm_copy_gbps, "memory copy (warm, 1 thread)",
            "snapshot section")
    for r in er.get("results", []):
        if r["library"] == "snapshotd isal":
            add("erasure encode k=4 m=2, snapshotd isal", r["encode_gbps"], "erasure encode k=4 m=2 (ISA-L)",
                "bench_erasure")
            add("erasure decode 2 losses, snapshotd isal", r["decode_gbps"], "erasure decode 2 losses (ISA-L)",
                "bench_erasure")
        elif r["library"] == "snapshotd numpy":
            add("erasure encode, snapshotd numpy fallback", r["encode_gbps"], "erasure encode k=4 m=2 (ISA-L)",
                "bench_erasure")
    raw = [r for r in pr.get("results", []) if r["transport"].startswith("raw")]
    ours = [r for r in pr.get("results", []) if not r["transport"].startswith("raw")]
    if raw:
        add("raw pyzmq PUSH/PULL, same run", raw[0]["gbps"], "loopback TCP (pyzmq PUSH/PULL)", "bench_peer")
    for r in ours:
        if r["key"]:
            add(f"peer plane {r['direction']} (HMAC)", r["gbps"], "loopback TCP (pyzmq PUSH/PULL)", "bench_peer")
    if ingest_gbps:
        add("same-host ingest (save until the daemon holds it)", ingest_gbps, "shared memory end to end",
            "snapshot section")
    return rows
