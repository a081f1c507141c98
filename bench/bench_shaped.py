"""Coexisting with training traffic: step time of DDP on shaped links while the daemons
send parity over the same links (issue 16).

Layout (root, ``ip`` and ``tc`` needed; everything stays on this machine)::

    bridge c<tag>b
      |-- veth  <->  namespace <tag>-n0: rank 0 (gloo on its veth) + daemon n0 of each cluster
      |-- veth  <->  namespace <tag>-n1: rank 1                     + daemon n1 of each cluster
      ...

Both ends of every veth are shaped with ``tc`` like a NIC port and its switch port with
QoS: HTB at ``--rate-mbit`` with a default class and a low-priority class for DSCP CS1
(served after the default class, a 2 % guaranteed rate, borrowing the whole link when
the default class is idle), each class a queue of ``--queue-ms`` of line rate (netem
``--delay-ms`` where the kernel has sch_netem; this VM's kernel does not). The
namespaces, bridge and veths are built by the chaos harness's
:class:`snapshotd_tools.chaos.netns.Network`, the daemons started in them as the chaos
harness does (``setns`` around the fork, :func:`snapshotd_tools.localcluster.start_node`).
One daemon cluster per snapshot configuration runs side by side in the same namespaces:

  ``local``   a one-node cluster per namespace (m = 0): the same saves, no peer
              traffic -- the cost of a snapshot without the network;
  ``snap``    no traffic control;
  ``paced``   ``--peer-rate`` (``--peer-rate-share`` of the link): the daemon's token
              bucket on its bulk peer bytes;
  ``marked``  ``--peer-dscp 8``: the daemon's peer connections carry CS1, so the link
              serves the job's all-reduce first and the parity in its gaps.
  ``adaptive`` ``marked``, and the trainer's Snapshotter with ``when_busy="skip"``: a
              save finding every staging slot held by a version still waiting for its
              parity skips that step's snapshot instead of waiting, so the snapshot
              interval stretches to what the link's gaps can carry (the share of steps
              snapshotted is reported).

The trainers (:mod:`bench.shaped_trainer`) hold a Snapshotter for each and interleave
the configurations and ``none`` (no snapshots) in rounds (a snapshot after every
optimizer step). Reported per configuration: step time (median, p90, mean) of rank 0,
the slowdown against ``none`` (ratio of medians and of means, measured in the same
run), save() blocking, the bytes each node put on its link per step (veth counters)
and what the daemons added to it; where the CPU went (per CPU of the machine: user,
system, softirq, idle per step; rank 0's training thread and its other threads), which
tells a slowdown from the link apart from one from CPU (the kernel's packet work for the
parity shows as softirq on whichever CPU moved the packets: ``--steer`` puts it on the
daemons' CPUs).

    sudo nice -n 10 .venv/bin/python -m bench.bench_shaped --nodes 2 --rate-mbit 1000 [--pin [--steer]] \\
        --json docs/shaped/result.json --plot docs/shaped/step_time.png

Every namespace, veth, bridge and qdisc it made is removed at exit, also on failure or
SIGTERM (deleting a namespace deletes its veth and the veth's qdiscs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
CONFIGS = ("none", "local", "snap", "paced", "marked", "adaptive")
LOW_DSCP = 8      # CS1, what the "marked" daemons set (--peer-dscp)
LOW_SHARE = 0.02  # the low class's guaranteed share of the link
_HZ = os.sysconf("SC_CLK_TCK")  # /proc/stat's ticks per second


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def fmt_bytes(n: float) -> str:  # bench.common's, without importing torch here
    from bench.common import fmt_bytes as f

    return f(n)


def unavailable() -> str | None:
    """Why the experiment cannot run here (not root, no ip, no tc, no netns), or None."""
    from snapshotd_tools.chaos import netns

    why = netns.unavailable()
    if why:
        return why
    if shutil.which("tc") is None or subprocess.run(["tc", "-V"], capture_output=True).returncode:
        return "the tc command (iproute2) is missing"
    return None


def _run(*cmd: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class ShapedNetwork:
    """A chaos-harness :class:`Network` whose veth ends are all shaped (HTB, two classes)."""

    def __init__(self, nodes: int, rate_mbit: float, delay_ms: float, queue_ms: float):
        from snapshotd_tools.chaos.netns import Network

        self.net = Network(os.urandom(3).hex(), nodes)
        self.rate_mbit, self.delay_ms, self.queue_ms = rate_mbit, delay_ms, queue_ms
        self.netem: bool | None = None  # False: this kernel has no sch_netem (no added delay)

    def peer_link(self, i: int) -> str:  # the namespace's end (netns.Network names it so)
        return f"c{self.net.tag}p{i}"

    def create(self) -> None:
        self.net.create()
        for i in range(self.net.n):
            self._shape((), self.net.host_link(i))
            self._shape(("-n", self.net.ns(i)), self.peer_link(i))

    def _shape(self, pre: tuple, dev: str) -> None:
        """HTB at the link rate with two classes, as a switch port with QoS: 1:10 (the
        default: the job's traffic, unmarked daemons) and 1:20 (what carries DSCP
        ``LOW_DSCP``: served after 1:10, with a small guaranteed rate so it never starves,
        borrowing the whole link when 1:10 is idle). Each class's queue is
        ``--queue-ms`` of line rate (netem with ``--delay-ms`` where the kernel has it)."""
        rate = self.rate_mbit
        rate_bps = rate * 1e6 / 8
        burst = str(max(64 << 10, int(rate_bps * 0.001)))  # 1 ms of line rate, >= a GSO packet
        limit = max(2 * int(burst), int(rate_bps * self.queue_ms / 1000))
        tc = ("tc", *pre)
        _run(*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        _run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
             "rate", f"{rate}mbit", "ceil", f"{rate}mbit", "burst", burst, "cburst", burst)
        for cls, share, prio in (("10", 1 - LOW_SHARE, "0"), ("20", LOW_SHARE, "1")):
            _run(*tc, "class", "add", "dev", dev, "parent", "1:1", "classid", f"1:{cls}", "htb",
                 "rate", f"{rate * share}mbit", "ceil", f"{rate}mbit", "prio", prio,
                 "burst", burst, "cburst", burst)
            leaf = ("bfifo", "limit", str(limit))
            if self.delay_ms > 0 and self.netem is not False:
                r = subprocess.run([*tc, "qdisc", "add", "dev", dev, "parent", f"1:{cls}", "handle",
                                    f"{cls}:", "netem", "delay", f"{self.delay_ms}ms", "limit",
                                    str(max(100, limit // 1500))], capture_output=True, text=True)
                self.netem = r.returncode == 0
                if r.returncode == 0:
                    continue
                if "unknown" not in r.stderr:
                    raise RuntimeError(f"tc netem on {dev}: {r.stderr.strip()}")
            _run(*tc, "qdisc", "add", "dev", dev, "parent", f"1:{cls}", "handle", f"{cls}:", *leaf)
        _run(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "tos", hex(LOW_DSCP << 2), "0xfc", "flowid", "1:20")

    def steer(self, cpus: list[int]) -> dict[str, str]:
        """Receive packet steering of every veth end (both sides) to ``cpus``: the kernel's
        receive work for the links' packets (the bridge's forwarding and the far end's
        HTB included) runs there instead of on whichever CPU sent them. With ``--pin``, a
        node whose NIC interrupts go to its housekeeping cores rather than the trainers'.
        Returns each veth's mask as read back."""
        mask = format(sum(1 << c for c in cpus), "x")
        got = {}
        for i in range(self.net.n):
            h, p = self.net.host_link(i), self.peer_link(i)
            with open(f"/sys/class/net/{h}/queues/rx-0/rps_cpus", "w") as f:
                f.write(mask)
            with open(f"/sys/class/net/{h}/queues/rx-0/rps_cpus") as f:
                got[h] = f.read().strip()
            r = subprocess.run(["ip", "netns", "exec", self.net.ns(i), "sh", "-c",
                                f"echo {mask} > /sys/class/net/{p}/queues/rx-0/rps_cpus && "
                                f"cat /sys/class/net/{p}/queues/rx-0/rps_cpus"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"RPS on {p}: {r.stderr.strip()}")
            got[p] = r.stdout.strip()
        return got

    def class_bytes(self, i: int) -> dict[str, int]:
        """Bytes sent so far by each HTB class of node ``i``'s egress (its veth end):
        {"1:10": default, "1:20": low priority, ...}."""
        r = subprocess.run(["tc", "-n", self.net.ns(i), "-s", "class", "show", "dev", self.peer_link(i)],
                           capture_output=True, text=True, check=True)
        out, cls = {}, None
        for line in r.stdout.splitlines():
            words = line.split()
            if words[:2] == ["class", "htb"]:
                cls = words[2]
            elif words[:1] == ["Sent"] and cls is not None:
                out[cls] = int(words[1])
                cls = None
        return out

    def destroy(self) -> list[str]:
        return self.net.destroy()


def _start_cluster(d: str, sn: ShapedNetwork, members: list[int], parity: int, block_size: str,
                   budget: str, extra: list[str], taken: set) -> dict:
    """Start a cluster with a daemon in each namespace of ``members`` (its node j in
    namespace ``members[j]``; ports distinct from ``taken``); its processes are in
    ``info["procs"]`` (wait for them with ``localcluster.wait_ready``)."""
    import yaml

    from snapshotd_tools import localcluster as lc
    from snapshotd_tools.chaos.netns import entered

    os.makedirs(d, exist_ok=True)
    spec = os.path.join(d, "spec.yaml")
    for _ in range(50):
        ids = lc.write_spec(spec, len(members), parity, block_size, os.urandom(16).hex())
        with open(spec) as f:
            doc = yaml.safe_load(f)
        ports = {p for nd in doc["nodes"] for p in (nd["port"], nd["peer_port"])}
        if not ports & taken:
            break
    else:
        raise RuntimeError("no free ports for a second cluster")
    taken |= ports
    for j, nd in enumerate(doc["nodes"]):
        nd["host"] = sn.net.addr(members[j])
    with open(spec, "w") as f:
        yaml.safe_dump(doc, f)
    info = {"dir": d, "spec": spec, "daemon_args": list(extra), "nodes": {
        n: {"pid": 0, "socket": os.path.join(d, f"{n}.sock"), "log": os.path.join(d, f"{n}.log")}
        for n in ids}}
    with open(os.path.join(d, "cluster.json"), "w") as f:  # first, so 'down' finds them
        json.dump(info, f, indent=2)
    procs = {}
    for j, n in enumerate(ids):
        with entered(sn.net.ns(members[j])):
            procs[n] = lc.start_node(d, n, budget, extra)
        lc.set_pid(d, n, procs[n].pid)
        info["nodes"][n]["pid"] = procs[n].pid
    info["procs"] = procs  # the caller waits for them (clusters start side by side)
    return info


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def _cpus(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def _pin_process(pid: int, cpus: list[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (sched_setaffinity takes one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            continue  # the thread exited meanwhile


def summarize(ranks: list[dict], nodes: int) -> dict:
    """Per configuration: step-time figures of rank 0, slowdowns against ``none``, bytes
    per node and step on the links, and what the daemons added (over ``none``)."""
    r0 = next(r for r in ranks if r["rank"] == 0)
    out = {}
    for c, v in r0["configs"].items():
        steps = v["steps"]
        tx = sum(r["configs"][c]["tx_bytes"] for r in ranks)
        out[c] = {"steps": steps, "median_s": statistics.median(v["step_s"]),
                  "p90_s": _pct(v["step_s"], 0.9), "mean_s": statistics.fmean(v["step_s"]),
                  "link_bytes_per_node_step": tx / max(steps, 1) / nodes,
                  "blocking_median_s": statistics.median(v["blocking_s"]) if v["blocking_s"] else 0.0,
                  "drain_median_s": statistics.median(v["drain_s"]) if v["drain_s"] else 0.0,
                  "saved": v["saved"], "skipped": v["skipped"],
                  "last_saved": v["last_saved"], "last_committed": v["last_committed"],
                  "step_s": v["step_s"],
                  "block_s": v.get("block_s", 0.0),  # wall time of its blocks, drains included
                  # rank 0's process over the steps, ms per step: [training thread, the rest]
                  "rank0_cpu_ms_per_step": [x * 1e3 / max(steps, 1) for x in v.get("proc_cpu_s", (0, 0))],
                  # per CPU of the machine, ms per recorded step: user, system, softirq, idle
                  "cpu_ms_per_step": {cpu: [t * 1e3 / _HZ / max(steps, 1) for t in ticks]
                                      for cpu, ticks in sorted(v.get("cpu_ticks", {}).items())}}
    base = out["none"]
    for c, v in out.items():
        v["slowdown_median"] = v["median_s"] / base["median_s"]
        v["slowdown_mean"] = v["mean_s"] / base["mean_s"]
        v["daemon_bytes_per_node_step"] = max(
            0.0, v["link_bytes_per_node_step"] - base["link_bytes_per_node_step"])
    return out


def add_paired(res: dict) -> dict:
    """``slowdown_paired``: per round, the mean step of a configuration's block over the
    mean step of the same round's ``none`` block; the median over rounds. Blocks of one
    round run back to back, so a load that drifts over the run (other work on the
    machine) cancels out of these ratios better than out of whole-run medians."""
    n = res["steps_per_block"]
    base = res["configs"]["none"]["step_s"]
    rounds = len(base) // n
    for c in res["configs"].values():
        xs = c["step_s"]
        ratios = [statistics.fmean(xs[r * n:(r + 1) * n]) / statistics.fmean(base[r * n:(r + 1) * n])
                  for r in range(rounds)]
        c["round_ratios"] = ratios
        c["slowdown_paired"] = statistics.median(ratios)
    return res


def run(a) -> dict:
    from snapshotd_tools import localcluster as lc

    why = unavailable()
    if why:
        raise RuntimeError(f"cannot run the shaped-link experiment: {why}")
    cpus = sorted(os.sched_getaffinity(0))
    if a.pin and len(cpus) < 2:
        raise RuntimeError("--pin needs at least 2 CPUs (trainers on the first, daemons on the rest)")
    trainer_cpus, daemon_cpus = cpus[:max(1, len(cpus) // 2)], cpus[max(1, len(cpus) // 2):]
    link_bytes_s = a.rate_mbit * 1e6 / 8
    peer_rate = int(a.peer_rate_share * link_bytes_s)
    work = tempfile.mkdtemp(prefix="bench-shaped-")
    sn = ShapedNetwork(a.nodes, a.rate_mbit, a.delay_ms, a.queue_ms)
    clusters: dict[str, dict] = {}
    trainers: list[subprocess.Popen] = []
    try:
        sn.create()
        steered = sn.steer(daemon_cpus) if a.steer else None
        taken: set = set()
        extra = {"snap": [], "paced": ["--peer-rate", str(peer_rate), "--peer-burst", str(a.peer_burst)],
                 "marked": ["--peer-dscp", str(LOW_DSCP)], "adaptive": ["--peer-dscp", str(LOW_DSCP)]}
        daemons: dict[str, list[tuple[dict, str]]] = {}  # config -> per rank: (cluster, node id)
        for c in [c for c in a.configs if c != "none"]:
            if c == "local":  # a one-node cluster per namespace: no parity, no peer traffic
                daemons[c] = []
                for i in range(a.nodes):
                    info = _start_cluster(os.path.join(work, f"local{i}"), sn, [i], 0, a.block_size,
                                          a.budget, [], taken)
                    clusters[f"local{i}"] = info
                    daemons[c].append((info, "n0"))
                continue
            info = clusters[c] = _start_cluster(os.path.join(work, c), sn, list(range(a.nodes)),
                                                a.parity, a.block_size, a.budget, extra[c], taken)
            daemons[c] = [(info, f"n{i}") for i in range(a.nodes)]
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 40000
        outs, job = [], "shaped" + os.urandom(2).hex()
        for i in range(a.nodes):  # while the daemons start (importing torch takes a while)
            out = os.path.join(work, f"rank{i}.json")
            outs.append(out)
            pin = ["taskset", "-c", _cpus(trainer_cpus)] if a.pin else []
            cmd = ["ip", "netns", "exec", sn.net.ns(i), *pin, sys.executable, "-m", "bench.shaped_trainer",
                   "--rank", str(i), "--world", str(a.nodes), "--master", f"{sn.net.addr(0)}:{port}",
                   "--ifname", sn.peer_link(i), "--param-mib", str(a.param_mib),
                   "--width", str(a.width), "--batch", str(a.batch), "--warmup", str(a.warmup),
                   "--rounds", str(a.rounds), "--steps", str(a.steps), "--threads", str(a.threads),
                   "--out", out, "--job", job, *(["--shard-replicated"] if a.shard_replicated else [])]
            for c, per_rank in daemons.items():
                info, node = per_rank[i]
                cmd += ["--daemon", f"{c}={info['nodes'][node]['socket']}",
                        "--ready-file", os.path.join(info["dir"], f"{node}.ready")]
            log = open(os.path.join(work, f"rank{i}.log"), "wb")
            trainers.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        for info in clusters.values():
            for n, proc in info.pop("procs").items():
                lc.wait_ready(info["dir"], n, proc)
                if a.pin:  # every thread it has now; later ones inherit the mask
                    _pin_process(proc.pid, daemon_cpus)
        if sn.netem is False:
            say("this kernel has no netem qdisc: links shaped by HTB only, no added delay")
        say(f"{a.nodes} namespaces, links {a.rate_mbit:g} Mbit/s + {a.delay_ms if sn.netem else 0:g} ms, "
            f"clusters up (paced at {peer_rate / MIB:.1f} MiB/s)")
        t0 = time.monotonic()
        for i, p in enumerate(trainers):
            left = a.timeout_s - (time.monotonic() - t0)
            try:
                rc = p.wait(max(1.0, left))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"rank {i} did not finish in {a.timeout_s} s; "
                                   f"see {work}/rank{i}.log") from None
            if rc != 0:
                with open(os.path.join(work, f"rank{i}.log"), errors="replace") as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"rank {i} exited {rc}:\n{tail}")
        ranks = []
        for out in outs:
            with open(out) as f:
                ranks.append(json.load(f))
        classes = [sn.class_bytes(i) for i in range(a.nodes)]
        from bench.common import machine  # imports torch: after the ranks are done

        res = {"machine": machine(), "nodes": a.nodes, "parity": a.parity,
               "netns": [sn.net.ns(i) for i in range(a.nodes)],
               # per node, the whole run: what its egress sent in each class (1:20 = DSCP CS1)
               "egress_class_bytes": classes,
               "pinned": {"trainers": trainer_cpus, "daemons": daemon_cpus} if a.pin else None,
               "rps_cpus": daemon_cpus if a.steer else None,
               "shard_replicated": a.shard_replicated,
               "rps_masks": steered,  # as read back from each veth
               "trainer_cpus": [r.get("cpus") for r in ranks],  # as each rank saw its mask
               "rate_mbit": a.rate_mbit, "delay_ms": a.delay_ms if sn.netem else 0.0,
               "delay_note": None if sn.netem or a.delay_ms <= 0 else "kernel without sch_netem: no delay added",
               "queue_ms": a.queue_ms,
               "peer_rate_bytes_s": peer_rate, "peer_burst_bytes": a.peer_burst,
               "state_bytes_per_rank": ranks[0]["state_bytes"], "params": ranks[0]["params"],
               "batch": a.batch, "rounds": a.rounds, "steps_per_block": a.steps,
               "configs": summarize(ranks, a.nodes)}
        return add_paired(res)
    finally:
        for p in trainers:
            if p.poll() is None:
                p.kill()
                p.wait()
        for info in clusters.values():  # all at once: each takes a moment to shut down
            for n in info["nodes"].values():
                if n["pid"]:
                    try:
                        os.kill(n["pid"], signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        for c, info in clusters.items():
            if os.path.exists(os.path.join(info["dir"], "cluster.json")):
                lc.down(info["dir"])
        left = sn.destroy()
        if left:
            print(f"[bench] could not remove: {left}", file=sys.stderr)
        if a.keep_dir:
            say(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def plot(res: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = res["configs"]
    names = [c for c in CONFIGS if c in cs]
    labels = {"none": "no snapshots", "local": "every step, m=0\n(no peer traffic)",
              "snap": "every step, m=1",
              "paced": f"m=1, --peer-rate\n{fmt_bytes(res['peer_rate_bytes_s'])}/s",
              "marked": f"m=1, --peer-dscp {LOW_DSCP}",
              "adaptive": f"m=1, --peer-dscp {LOW_DSCP}\n+ when_busy=skip"}
    fig, ax = plt.subplots(figsize=(9, 4.6))
    data = [[s * 1000 for s in cs[c]["step_s"]] for c in names]
    ax.boxplot(data, whis=(10, 90), showfliers=True, widths=0.5)
    ax.set_xticks(range(1, len(names) + 1),
                  [f"{labels[c]}\nx{cs[c]['slowdown_median']:.3f} median\n"
                   f"x{cs[c]['slowdown_paired']:.3f} paired" for c in names], fontsize=8)
    ax.set_ylabel("step time (ms), rank 0")
    ax.set_title(f"DDP (gloo) on {res['nodes']} nodes, links {res['rate_mbit']:g} Mbit/s "
                 f"+ {res['delay_ms']:g} ms, m={res['parity']}, "
                 f"{fmt_bytes(res['state_bytes_per_rank'])} state/rank"
                 + (f"; trainers on CPU {_cpus(res['pinned']['trainers'])}, daemons on "
                    f"{_cpus(res['pinned']['daemons'])}" if res.get("pinned") else "")
                 + (" (+ the veths' RPS)" if res.get("rps_cpus") else "")
                 + ("; shard_replicated" if res.get("shard_replicated") else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    m = res["machine"]
    fig.text(0.01, 0.01, f"{m['cpu']}, {m['cores']} cores, load {m['loadavg_at_start']}, "
             f"{m['date_utc']}; whiskers p10-p90", fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(res: dict) -> str:
    lines = [f"{'config':<8} {'median ms':>10} {'p90 ms':>8} {'mean ms':>8} {'x median':>9} "
             f"{'x mean':>7} {'x paired':>9} {'save ms':>8} {'saved':>6} {'link MiB/step':>14} {'daemon MiB/step':>16}"]
    for c, v in res["configs"].items():
        lines.append(f"{c:<8} {v['median_s'] * 1e3:>10.1f} {v['p90_s'] * 1e3:>8.1f} "
                     f"{v['mean_s'] * 1e3:>8.1f} {v['slowdown_median']:>9.3f} {v['slowdown_mean']:>7.3f} "
                     f"{v['slowdown_paired']:>9.3f} "
                     f"{v['blocking_median_s'] * 1e3:>8.1f} "
                     f"{(v['saved'] / v['steps'] if c != 'none' and v['steps'] else 0):>6.0%} "
                     f"{v['link_bytes_per_node_step'] / MIB:>14.2f} "
                     f"{v['daemon_bytes_per_node_step'] / MIB:>16.2f}")
    cpus = sorted({c for v in res["configs"].values() for c in v.get("cpu_ms_per_step", {})},
                  key=lambda c: int(c[3:]))
    if cpus:  # where the time went: the kernel's packet work shows as softirq
        pin = res.get("pinned") or {}
        role = {f"cpu{i}": r for r in ("trainers", "daemons") for i in pin.get(r, [])}
        lines.append("rank 0's CPU ms per step (the steps only): training thread, other threads: "
                     + "; ".join(f"{c} {v['rank0_cpu_ms_per_step'][0]:.1f} + "
                                 f"{v['rank0_cpu_ms_per_step'][1]:.1f}"
                                 for c, v in res["configs"].items() if "rank0_cpu_ms_per_step" in v))
        lines.append("CPU ms per step (the machine's /proc/stat during each configuration's blocks, "
                     "drain included): user / system / softirq / idle")
        lines.append(f"{'config':<8} " + " ".join(
            f"{c + (' ' + role[c] if c in role else ''):>26}" for c in cpus))
        for c, v in res["configs"].items():
            per = v.get("cpu_ms_per_step", {})
            lines.append(f"{c:<8} " + " ".join(
                f"{'/'.join(f'{x:.1f}' for x in per[cpu]):>26}" if cpu in per else f"{'-':>26}"
                for cpu in cpus))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--parity", type=int, default=1)
    p.add_argument("--rate-mbit", type=float, default=1000.0, help="each link's rate (default 1000)")
    p.add_argument("--delay-ms", type=float, default=0.5, help="one-way delay per link end (default 0.5)")
    p.add_argument("--queue-ms", type=float, default=5.0, help="tbf queue, in ms of line rate (default 5)")
    p.add_argument("--pin", action="store_true",
                   help="trainers on the first half of the CPUs, every daemon thread on the other "
                        "half (a node whose daemon has cores of its own: isolates the link's "
                        "effect from the daemons' CPU on a machine with few cores)")
    p.add_argument("--steer", action="store_true",
                   help="with --pin: the veths' receive processing (RPS) on the daemons' CPUs too, "
                        "as a node whose NIC interrupts go to its housekeeping cores")
    p.add_argument("--shard-replicated", action="store_true",
                   help="the trainers' shard_replicated=True: each rank stores its 1/W slice of "
                        "the replicated DDP state (REFT), so each node copies and sends D/W")
    p.add_argument("--peer-rate-share", type=float, default=0.5,
                   help="the paced cluster's --peer-rate as a share of the link rate (default 0.5)")
    p.add_argument("--peer-burst", type=int, default=1 * MIB)
    p.add_argument("--param-mib", type=float, default=8.0, help="model parameters per rank, MiB")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--block-size", default="1MiB")
    p.add_argument("--budget", default="1GiB")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="which of none, local, snap, paced, marked, adaptive to run (default all; 'none' "
                        "always runs)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of step time per configuration")
    p.add_argument("--keep-dir", action="store_true", help="keep the logs (daemons, ranks)")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="no run: read a result written by --json, print its table, write --plot")
    a = p.parse_args(argv)
    if a.replot:
        with open(a.replot) as f:
            res = add_paired(json.load(f))
        print(report(res))
        if a.plot:
            say(f"plot: {plot(res, a.plot)}")
        return 0
    asked = [c.strip() for c in a.configs.split(",") if c.strip()]
    if set(asked) - set(CONFIGS):
        p.error(f"--configs: unknown {sorted(set(asked) - set(CONFIGS))}; choose from {', '.join(CONFIGS)}")
    a.configs = ["none", *[c for c in CONFIGS[1:] if c in asked]]
    if a.steer and not a.pin:
        p.error("--steer needs --pin (it moves packet work to the daemons' CPUs)")
    why = unavailable()
    if why:
        print(f"bench_shaped: skipped: {why}", file=sys.stderr)
        return 3
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up in finally
    res = run(a)
    print(report(res))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.plot:
        say(f"plot: {plot(res, a.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
