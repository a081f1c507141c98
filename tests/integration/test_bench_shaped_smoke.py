"""Smoke test: the shaped-link benchmark runs end to end at a tiny size and what it
reports adds up (not timing): real namespaces, tc-shaped veths, daemons with and
without --peer-rate, two gloo DDP ranks snapshotting every step.

Skipped with the reason when this is not root or ip/tc are missing; under CI (``$CI``
set) a machine that has root and the tools but cannot run it is a failure.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from bench import bench_shaped

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _skip_or_fail() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces and tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs the {tool} command (iproute2)")
    why = bench_shaped.unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"root, ip and tc are here but the experiment cannot run: {why}")
        pytest.skip(why)


def test_cpu_ticks_reads_proc_stat():
    from bench.shaped_trainer import cpu_ticks

    stat = ("cpu  10 1 20 300 4 5 6 7 0 0\n"
            "cpu0 1 2 3 4 5 6 7 8 0 0\n"
            "cpu1 100 0 50 1000 30 2 40 0 0 0\n"
            "intr 12345 0 0\nctxt 99\ncpufreq 1\n")
    assert cpu_ticks(stat) == {"cpu0": [3, 3, 13, 9], "cpu1": [100, 50, 42, 1030]}
    here = cpu_ticks()  # this machine's: every online CPU, ticks only grow
    assert here and all(len(v) == 4 and min(v) >= 0 for v in here.values())


@pytest.mark.timeout(240)
def test_bench_shaped_tiny(tmp_path):
    _skip_or_fail()
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    steps = 3
    cmd = [sys.executable, "-m", "bench.bench_shaped", "--configs", "none,paced,marked,adaptive",
           "--param-mib", "0.25", "--width", "256", "--batch", "16", "--warmup", "1",
           "--rounds", "1", "--steps", str(steps), "--rate-mbit", "1000",
           "--peer-rate-share", "0.5", "--timeout-s", "150", "--json", str(out), "--plot", str(png)]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        # trainers on the first half of the CPUs, daemons and the veths' packet work on the rest
        cmd += ["--pin", "--steer"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = p.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # the bench removes its namespaces and daemons
        log, _ = p.communicate(timeout=60)
        pytest.fail(f"bench_shaped did not finish:\n{log[-3000:]}")
    assert p.returncode == 0, log[-3000:]
    r = json.loads(out.read_text())
    assert set(r["configs"]) == {"none", "paced", "marked", "adaptive"}
    assert r["peer_rate_bytes_s"] == int(0.5 * 1000e6 / 8)
    if len(cpus) >= 2:
        half = max(1, len(cpus) // 2)
        assert r["pinned"] == {"trainers": cpus[:half], "daemons": cpus[half:]}
        assert r["trainer_cpus"] == [cpus[:half]] * r["nodes"]  # the ranks ran there
        mask = format(sum(1 << c for c in cpus[half:]), "x")
        assert len(r["rps_masks"]) == 2 * r["nodes"]  # both ends of every veth
        assert all(int(m.replace(",", ""), 16) == int(mask, 16) for m in r["rps_masks"].values()), r["rps_masks"]
    with open("/proc/stat") as f:
        online = sorted(w.split()[0] for w in f if w.startswith("cpu") and w[3].isdigit())
    d = r["state_bytes_per_rank"]
    assert d >= 0.25 * (1 << 20)
    for name, c in r["configs"].items():
        assert c["steps"] == steps and len(c["step_s"]) == steps
        assert all(t > 0 for t in c["step_s"])
        assert c["median_s"] <= c["p90_s"] <= max(c["step_s"])
        # where the CPU went: every CPU of the machine accounted for each configuration's
        # blocks (a block lasts at least its steps), and rank 0's training thread ran
        per_cpu = c["cpu_ms_per_step"]
        assert sorted(per_cpu) == online, per_cpu
        for ms in per_cpu.values():  # each CPU's ticks add up to the blocks' wall time
            assert len(ms) == 4 and min(ms) >= 0
            seen = sum(ms) * c["steps"] / 1e3
            # two readings a block, each 1 tick (10 ms) coarse; a VM's steal time not counted
            assert abs(seen - c["block_s"]) <= 0.03 + 0.1 * c["block_s"], (name, ms, c["block_s"])
        assert c["rank0_cpu_ms_per_step"][0] > 0, c["rank0_cpu_ms_per_step"]
        # gloo's all-reduce crossed the shaped link: each rank sends about D per step
        assert c["link_bytes_per_node_step"] >= 0.5 * d, (name, c["link_bytes_per_node_step"], d)
    none = r["configs"]["none"]
    assert none["saved"] == 0 and none["daemon_bytes_per_node_step"] == 0
    assert none["slowdown_median"] == 1.0
    for name in ("paced", "marked"):
        c = r["configs"][name]
        # every step saved, the block's last version committed after the drain
        assert c["saved"] == steps and c["skipped"] == 0, (name, c)
        assert c["last_committed"] == c["last_saved"] > 0, (name, c)
        # the parity (m = 1: each node's data to the other) crossed the link as well
        assert c["daemon_bytes_per_node_step"] >= 0.9 * r["parity"] * d, (name, c)
        assert c["slowdown_median"] == pytest.approx(c["median_s"] / none["median_s"])
    # adaptive (marked + when_busy="skip"): a step is saved or skipped, never waits; what
    # was saved last committed after the drain
    c = r["configs"]["adaptive"]
    assert c["saved"] >= 1 and c["saved"] + c["skipped"] == steps, c
    assert c["last_committed"] == c["last_saved"] > 0, c
    # the marked daemons' parity went through the low-priority class of every link,
    # the job's all-reduce (and the unmarked daemons) through the default one
    marked_bytes = sum(r["configs"][n]["daemon_bytes_per_node_step"]
                       for n in ("marked", "adaptive")) * (steps + 1)  # + warm-up
    for node in r["egress_class_bytes"]:
        assert node["1:20"] >= 0.9 * marked_bytes, (node, marked_bytes)
        assert node["1:10"] >= (steps + 1) * 4 * 0.5 * d  # gloo in all four configurations
    assert png.stat().st_size > 1000
    # nothing left behind: our namespaces (and with them the veths and qdiscs) are gone
    assert len(r["netns"]) == r["nodes"]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not set(r["netns"]) & set(left)
