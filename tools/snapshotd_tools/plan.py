"""``snapshotd plan``: size a snapshotd deployment from the failure simulator.

Given the job (nodes, GPUs per node, state bytes per node, NIC bandwidth, host memory
per node, step time, nodes per failure domain, shared storage bandwidth per node) and a
failure profile (``llama3``, ``rsc``, or ``custom`` with your own per-GPU MTBF), it runs
``snapshotd.core.sim.analysis.recommend``: every group size that divides the job, parity
0..3, a few snapshot intervals, all on one seeded fault trace, and prints

* the recommendation: group size n, parity m (and whether it survives a whole failure
  domain), snapshot and durable intervals, the memory each node needs, the spec lines;
* the expected goodput (ETTR), lost work per fault and lost committed versions of the
  recommendation and of the alternatives (disk checkpoints at the Young-Daly interval,
  2x replication, the same groups without parity, CheckFree with --pipeline-stages),
  on the same faults;
* with ``--plot F``: ETTR against the snapshot (checkpoint) interval for each strategy.

Example (Llama 3 405B's cluster)::

    snapshotd plan --nodes 2048 --gpus-per-node 8 --state-per-node 3.2GB \\
        --nic-gbps 400 --memory-per-node 64GiB --step-s 10 --profile llama3

Pure simulation: nothing is contacted; the same arguments and --seed print the same.
"""

from __future__ import annotations

import argparse
import json
import sys

from snapshotd.core.sim.analysis import Option, Recommendation, domain_members, geometric, recommend, sweep
from snapshotd.core.sim.model import CheckFree, DiskCheckpoint, Job, Replication, Snapshotd, costs
from snapshotd.core.sim.profiles import PROFILES, custom, profile
from snapshotd.wire.config import parse_size
from snapshotd.wire.errors import InvalidRequestError


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="recommend group size, parity, intervals and memory from a failure model",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--nodes", type=int, required=True, help="nodes in the job")
    p.add_argument("--gpus-per-node", type=int, default=8, help="(default 8)")
    p.add_argument("--state-per-node", required=True,
                   help="training state (weights + optimizer) each node snapshots, e.g. 3.2GB, 40GiB")
    p.add_argument("--nic-gbps", type=float, default=400.0,
                   help="NIC bandwidth per node the peer plane may use, Gbit/s (default 400)")
    p.add_argument("--memory-per-node", default="0",
                   help="host memory snapshotd may use per node, e.g. 64GiB (default 0: no limit)")
    p.add_argument("--step-s", type=float, default=10.0, help="seconds per training step (default 10)")
    p.add_argument("--nodes-per-domain", type=int, default=8,
                   help="nodes behind one switch / in one rack: a failure domain (default 8)")
    p.add_argument("--disk-per-node", default="1GB",
                   help="shared storage write bandwidth per node, bytes/s (default 1GB)")
    p.add_argument("--host-copy", default="50GB", help="device-to-host copy bandwidth per node, bytes/s (default 50GB)")
    p.add_argument("--profile", default="llama3", choices=sorted(PROFILES) + ["custom"],
                   help="failure profile (default llama3)")
    p.add_argument("--gpu-mtbf-h", type=float, default=None,
                   help="custom profile: mean time between failures of one GPU, hours")
    p.add_argument("--domain-share", type=float, default=0.084,
                   help="custom profile: share of failures that take a whole domain (default 0.084)")
    p.add_argument("--restart-share", type=float, default=0.75,
                   help="custom profile: share of failures a process restart fixes (default 0.75)")
    p.add_argument("--restart-s", type=float, default=None,
                   help="job restart time after a fault, s (default: the profile's, 600)")
    p.add_argument("--group-sizes", default="4,6,8",
                   help="group sizes n to consider, comma-separated (default 4,6,8: see docs/OPERATIONS.md)")
    p.add_argument("--pipeline-stages", type=int, default=0, help="also compare CheckFree with this many stages")
    p.add_argument("--days", type=float, default=60.0, help="simulated days (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, metavar="F", help="write ETTR vs snapshot interval to this PNG")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB"


def _row(o: Option) -> dict:
    s = o.strategy
    r = o.result
    return {"strategy": s.name, "interval_s": round(getattr(s, "interval_s", getattr(s, "durable_interval_s", 0)), 1),
            "ettr": round(r.ettr, 5), "lost_per_fault_s": round(r.lost_per_fault_s, 1), "faults": r.faults,
            "memory_losses": r.memory_losses, "memory_bytes_per_node": round(o.memory_bytes),
            "versions_lost_per_year_independent": o.loss_per_year,
            "survives_domain": o.survives_domain}


def build(a) -> tuple[Job, object]:
    """(job, profile) from the parsed arguments; InvalidRequestError/ValueError on bad input."""
    job = Job(nodes=a.nodes, state_bytes_per_node=float(parse_size(a.state_per_node)), gpus_per_node=a.gpus_per_node,
              nic_bytes_per_s=a.nic_gbps * 1e9 / 8, step_s=a.step_s, nodes_per_domain=a.nodes_per_domain,
              host_copy_bytes_per_s=float(parse_size(a.host_copy)), disk_bytes_per_s=float(parse_size(a.disk_per_node)),
              memory_bytes_per_node=float(parse_size(a.memory_per_node)))
    if a.profile == "custom":
        if a.gpu_mtbf_h is None:
            raise InvalidRequestError("--profile custom needs --gpu-mtbf-h (hours between failures of one GPU)")
        prof = custom(a.gpu_mtbf_h, domain_share=a.domain_share, process_share=a.restart_share,
                      restart_s=600.0 if a.restart_s is None else a.restart_s)
    else:
        prof = profile(a.profile)
        if a.restart_s is not None:
            from dataclasses import replace

            prof = replace(prof, restart_s=a.restart_s)
    return job, prof


def report(job: Job, prof, rec: Recommendation, days: float) -> str:
    b = rec.best
    s: Snapshotd = b.strategy
    c = costs(job, s)
    k = s.group_size - s.parity
    dm = domain_members(job, s.group_size)
    mem = job.memory_bytes_per_node
    lines = [
        f"snapshotd plan: {job.nodes} nodes x {job.gpus_per_node} GPUs, {_gb(job.state_bytes_per_node)} of state "
        f"per node, NIC {job.nic_bytes_per_s * 8 / 1e9:g} Gb/s, step {job.step_s:g} s",
        f"failure profile {prof.name}: job MTBF {rec.job_mtbf_s / 3600:.2f} h at {job.gpus} GPUs, "
        f"{prof.restart_fraction:.0%} need only a process restart, restart {prof.restart_s:g} s",
        f"failure domains of {job.nodes_per_domain} nodes; groups of {s.group_size} hold at most {dm} "
        f"node(s) of one domain",
        "",
        "recommended:",
        f"  group_size (n)     {s.group_size}",
        f"  parity (m)         {s.parity}    "
        + (f"survives {s.parity} lost nodes per group, and a whole failure domain" if b.survives_domain
           else f"survives {s.parity} lost nodes per group; NOT a whole failure domain (needs m >= {dm})"),
        f"  snapshot interval  {s.interval_s:g} s   (parity traffic {_gb(c.traffic_bytes)} per node per "
        f"snapshot = {c.commit_s:.2f} s of NIC)",
        f"  durable interval   {s.durable_interval_s:g} s   (background write {c.durable_write_s:.1f} s per copy)",
        f"  memory per node    {_gb(c.memory_bytes)}   (budget 2 x state x (1 + m/k), m/k = {s.parity}/{k}; "
        f"daemon limit: + 2 GiB)"
        + (f"; budget {_gb(mem)}: {'fits' if c.memory_bytes <= mem else 'DOES NOT FIT'}" if mem else ""),
        f"  lost versions      {b.loss_per_year:.2g} per year from more than m faults in one group "
        f"(independent failures; window = restart {prof.restart_s:g} s + rebuild {c.restore_peer_s:.1f} s)",
        f"  spec:              group_size: {s.group_size}, parity: {s.parity}; "
        f"snapshot every {max(1, round(s.interval_s / job.step_s))} steps",
        "",
        f"expected over {days:g} days ({b.result.faults} faults, the same ones for every row):",
        f"  {'strategy':34} {'interval':>9} {'ETTR':>7} {'lost/fault':>11} {'versions lost':>14} {'memory/node':>12}",
    ]
    for o in (b,) + rec.alternatives:
        r = _row(o)
        tag = " <- recommended" if o is b else ""
        lines.append(f"  {r['strategy']:34} {r['interval_s']:>8g}s {o.result.ettr:>7.2%} "
                     f"{r['lost_per_fault_s']:>10.0f}s {r['memory_losses']:>14} {_gb(o.memory_bytes):>12}{tag}")
    for n in rec.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def plot(job: Job, prof, rec: Recommendation, days: float, seed: int, path: str, stages: int = 0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = days * 86400
    best: Snapshotd = rec.best.strategy
    ivs = geometric(max(job.step_s, 10.0), 4 * 3600.0, 14)
    dur = best.durable_interval_s
    series = [
        (f"snapshotd n={best.group_size} m={best.parity}", lambda iv: Snapshotd(best.group_size, best.parity, iv, dur)),
        (f"snapshotd n={best.group_size} m=0", lambda iv: Snapshotd(best.group_size, 0, iv, dur)),
        ("replication x2", lambda iv: Replication(1, iv, dur)),
        ("disk checkpoint", DiskCheckpoint),
    ]
    if stages:
        series.append((f"CheckFree ({stages} stages, durable every interval)", lambda iv: CheckFree(stages, iv)))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, make in series:
        try:
            res = sweep(job, make, prof, ivs, h, seed)
        except InvalidRequestError:
            continue
        dashed = label.startswith("replication")  # often on top of snapshotd's line: keep both visible
        ax.plot([iv / 60 for iv, _ in res], [100 * r.ettr for _, r in res], marker="o", ms=3, label=label,
                ls="--" if dashed else "-", lw=1 if dashed else 1.6)
    ax.axvline(rec.disk_interval_s / 60, color="grey", ls=":", lw=0.8, label="Young-Daly (disk)")
    ax.set_xscale("log")
    ax.set_xlabel("snapshot / checkpoint interval (minutes)")
    ax.set_ylabel("effective training time (%)")
    ax.set_title(f"{job.nodes} nodes x {job.gpus_per_node} GPUs, {prof.name} profile, {days:g} days")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(a) -> int:
    try:
        job, prof = build(a)
        sizes = tuple(int(x) for x in a.group_sizes.split(","))
        rec = recommend(job, prof, horizon_s=a.days * 86400, seed=a.seed, group_sizes=sizes,
                        pipeline_stages=a.pipeline_stages)
    except (InvalidRequestError, ValueError) as exc:
        print(f"snapshotd plan: {exc}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({"recommended": _row(rec.best), "group_size": rec.best.strategy.group_size,
                          "parity": rec.best.strategy.parity, "snapshot_interval_s": rec.best.strategy.interval_s,
                          "durable_interval_s": rec.best.strategy.durable_interval_s,
                          "alternatives": [_row(o) for o in rec.alternatives], "job_mtbf_s": rec.job_mtbf_s,
                          "notes": list(rec.notes)}, indent=2))
    else:
        print(report(job, prof, rec, a.days))
    if a.plot:
        print(f"plot: {plot(job, prof, rec, a.days, a.seed, a.plot, a.pipeline_stages)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m snapshotd_tools.plan ...`` (the same as ``snapshotd plan ...``)."""
    ap = argparse.ArgumentParser(prog="snapshotd")
    add_parser(ap.add_subparsers(dest="command", required=True))
    return run(ap.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
