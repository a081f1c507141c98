"""bench_cluster's two ways of not measuring, each with its reason (issues 16 and 18).

- Before a run: a cluster whose projected memory does not fit what the machine has
  available is refused (exit 2) with what it needs, what is available and what to pass
  instead, and nothing is started.
- During a run: a version that does not commit in time fails the run (exit 1) with each
  node's view of it, read from the daemons.
The projection itself is checked against the real layout of snapshotd.core.placement.
"""

import json

import pytest

from bench import bench_cluster
from bench import memwatch as mw
from snapshotd.core.placement import place_group


def test_projection_sizes_parity_from_the_layout_and_leaves_no_third_slot():
    mib, bs = 1 << 20, 4 << 20
    for n, m, size in ((4, 2, 256 * mib), (3, 1, 64 * mib), (4, 2, 1024 * mib), (6, 2, 100 * mib)):
        blocks = -(-size // bs) + 1
        layout = place_group(n, m, [blocks] * n)
        par = max(len(layout.parity_blocks(i)) for i in range(n)) * bs
        assert mw.parity_per_version(n, m, size, bs) == par
        assert par >= size * m // (n - m)  # at least the ideal m/k of the data
        budget = mw.one_job_budget(n, m, size, bs)
        p = mw.project_cluster(n, m, size, bs, budget)
        assert p["slots"] == 2  # a third staged slot would not fit that budget
        assert p["per_node_shm"] == 2 * size + 2 * par
        assert p["total"] == n * (p["per_node_shm"] + p["per_node_private"]) + p["writer"]
        # a budget with room for it: three slots are projected
        assert mw.project_cluster(n, m, size, bs, budget + size)["slots"] == 3


def test_a_run_that_cannot_fit_is_refused_with_the_reason_and_starts_nothing(tmp_path, monkeypatch):
    from snapshotd_tools import localcluster as lc

    started = []
    monkeypatch.setattr(lc, "up", lambda *a, **k: started.append(a))
    out = tmp_path / "r.json"
    size_mib = (mw.mem_available() >> 20) // 2  # 4 nodes x (4 x this) of shared memory alone: never fits
    assert bench_cluster.main(["--size-mib", str(size_mib), "--json", str(out)]) == 2
    r = json.loads(out.read_text())
    why, fig = r["refused"], r["projected_memory"]
    assert f"4 nodes x {size_mib} MiB" in why and "MemAvailable" in why
    # what it needs is more than there was (the figures it printed, measured once)
    assert fig["total"] + fig["margin"] > fig["mem_available"] or fig["shm"] > fig["shm_free"]
    assert f"would need about {fig['total'] / (1 << 30):.1f} GiB" in why
    smaller = fig["instead_size_mib"]  # and what fits instead
    assert f"Pass --size-mib {smaller}" in why and 0 < smaller < size_mib
    p = mw.project_cluster(4, 2, smaller << 20, 4 << 20, mw.one_job_budget(4, 2, smaller << 20, 4 << 20))
    assert p["total"] + fig["margin"] <= fig["mem_available"] and p["shm"] <= fig["shm_free"]
    p = mw.project_cluster(4, 2, (smaller + 64) << 20, 4 << 20, mw.one_job_budget(4, 2, (smaller + 64) << 20, 4 << 20))
    assert p["total"] + fig["margin"] > fig["mem_available"] or p["shm"] > fig["shm_free"]  # the largest
    assert "committed_versions" not in r and started == []  # no cluster was started


@pytest.mark.timeout(240)
def test_a_version_that_does_not_commit_fails_the_run_with_each_nodes_view(tmp_path, monkeypatch):
    # n1's peer server stalls 30 s on the first contribution it is sent: version 1
    # cannot commit within the 4 s the run gives it.
    from snapshotd.node.peer.server import STALL_ENV

    monkeypatch.setenv(STALL_ENV, "n1:contrib:30:1")
    out = tmp_path / "r.json"
    rc = bench_cluster.main(["--quick", "--phases", "pipeline", "--commit-timeout-s", "4",
                             "--json", str(out)])
    assert rc == 1
    r = json.loads(out.read_text())
    assert r["committed_versions"] == 0
    why = r["failed"]
    assert "job 'bench' version 1 did not commit within 4 s" in why
    lines = [ln.strip() for ln in why.splitlines()[1:]]
    assert sorted(ln.split(":")[0] for ln in lines) == ["n0", "n1", "n2"]  # one line per node
    assert all("committed 1" not in ln for ln in lines)
    assert any("lacks" in ln or "not answering" in ln or "no round" in ln for ln in lines)
    assert "memory_peaks" in r


def test_a_sigtermed_run_takes_its_cluster_down():
    """A bench_cluster stopped by SIGTERM (a wrapper's timeout) once left its daemons
    running with 17 GiB of /dev/shm. Now its finally stops them and frees their segments."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from snapshotd.wire import shm
    from snapshotd_tools import localcluster as lc

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.Popen([sys.executable, "-m", "bench.bench_cluster", "--nodes", "3", "--parity", "1",
                          "--size-mib", "4", "--block-size", "256KiB", "--repeats", "500",
                          "--phases", "pipeline"], cwd=repo, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)

    def daemons():
        out = subprocess.run(["ps", "-ww", "-o", "pid=,ppid=,args=", "-e"], capture_output=True, text=True).stdout
        return [ln.split(None, 2) for ln in out.splitlines() if ln.split(None, 2)[1:2] == [str(p.pid)]
                and "snapshotd.node" in ln and "serve" in ln]

    try:
        deadline, d, prefixes, procs = time.monotonic() + 120, None, [], []
        while not any(shm.list_segments(pf) for pf in prefixes):  # up, and holding segments
            assert p.poll() is None, p.stdout.read()
            assert time.monotonic() < deadline, "the cluster did not come up in 120 s"
            time.sleep(0.2)
            procs = daemons()
            dirs = {os.path.dirname(a) for _pid, _pp, args in procs for a in args.split()
                    if a.endswith("/spec.yaml")}
            if len(procs) == 3 and len(dirs) == 1:
                d = dirs.pop()
                prefixes = [lc.shm_prefix(d, f"n{i}") for i in range(3)]
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, out[-2000:]
    for pid, _ppid, _args in procs:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower(), pid
    assert not [n for pf in prefixes for n in shm.list_segments(pf)]
    assert not os.path.exists(d)
