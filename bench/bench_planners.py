"""The planners at scale: placement, recovery planning and the commit decision, 256 to 16,384 nodes.

For a simulated job of N nodes (failure domains of 8 nodes, groups of --group-size with
--parity parity rows, --blocks data blocks per node) it times, in this one process:

* ``placement``  -- ``spec.form_groups`` over N ``NodeSpec``\\ s, then for every group
  ``place_group`` and, for every node, what the protocol computes from it: its data
  blocks' stripes and the contributions it must receive (``expected_contributions``);
* ``recovery``   -- one node lost in every group (a whole row of racks): ``plan_recovery``
  of every group, as the rebuild would ask it;
* ``commit``     -- the commit decision of a root-group node (the commit tree of
  ``snapshotd.core.protocol``): a ``JobProtocol`` built for the N-node job, fed its
  group's votes and a report from each child group until it commits.

Each figure is the median of --repeats runs in CPU seconds (``time.process_time``), the whole job's work (not per node), so a
planner that is linear in nodes grows 64x from 256 to 16,384 nodes. It also counts
messages and bytes per node per committed version at 64 / 512 / 4096 nodes with the real
protocol (``snapshotd.core.sim.commitcount``; message sizes from proto/peer.proto).

    python -m bench.bench_planners [--nodes 256,1024,4096,16384] [--blocks 64] [--group-size 8]
        [--parity 2] [--repeats 3] [--json out.json] [--png docs/plan/planners.png] [--no-count]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from snapshotd.core.placement import place_group
from snapshotd.core.protocol import JobProtocol
from snapshotd.core.recovery import RecoveryPlan, plan_recovery
from snapshotd.core.sim.commitcount import MessageSizes, count_commit
from snapshotd.core.spec import NodeSpec, form_groups


def _timed(fn) -> float:
    # CPU seconds of this process: the planners are single-threaded pure Python, and on a
    # shared machine the wall clock mostly measures the neighbours.
    t = time.process_time()
    fn()
    return time.process_time() - t


def placement(nodes: int, n: int, m: int, blocks: int) -> tuple:
    specs = [NodeSpec(f"n{i}", f"h{i}", 7000, 7100, f"rack-{i // 8}") for i in range(nodes)]
    groups = form_groups(specs, n)
    layouts = []
    for _ in groups:
        lay = place_group(n, m, [blocks] * n)
        for i in range(n):
            lay.data_blocks(i)
            lay.expected_contributions(i)
        layouts.append(lay)
    return groups, layouts


def recovery(layouts, n: int) -> None:
    for g, lay in enumerate(layouts):
        lost = g % n
        plan = plan_recovery(lay, [i for i in range(n) if i != lost], [lost], version=1, group=g)
        assert isinstance(plan, RecoveryPlan)


def commit(nodes: int, n: int, m: int) -> None:
    ids = tuple(f"n{i}" for i in range(nodes))
    groups = tuple(ids[g:g + n] for g in range(0, nodes, n))
    p = JobProtocol("job", ids[0], groups[0], ids, m, groups=groups)
    r = p.round(1)
    r.local_data = r.parity_done = r.contributions_sent = r.voted = True  # step 3 done here
    for nid in groups[0]:
        p.vote_received(1, nid, (int(nid[1:]),))
    for c in p.child_groups:
        p.report_received(1, groups[c][0])
    assert p.committed_version == 1


def real_sizes() -> MessageSizes:
    from snapshotd.core.protocol import Announce
    from snapshotd.node.cluster import peer_ops

    ann, _ = peer_ops.announce("job-0", 1000, Announce("node-0001", 12, (0,), (b"m" * 200,)))
    return MessageSizes(ann.ByteSize(), peer_ops.contrib("job-0", 1000, 123, 1, 3, [12] * 8).ByteSize(),
                        peer_ops.vote("job-0", 1000, [4095]).ByteSize(),
                        report=peer_ops.vote("job-0", 1000, [], "report").ByteSize(),
                        word=peer_ops.vote("job-0", 1000, [], "word").ByteSize())


def run(sizes_n: list[int], blocks: int, n: int, m: int, repeats: int, count: bool) -> dict:
    rows = []
    for nodes in sizes_n:
        tp, tr, tc = [], [], []
        for _ in range(repeats):
            holder = {}
            tp.append(_timed(lambda: holder.setdefault("x", placement(nodes, n, m, blocks))))
            _, layouts = holder["x"]
            tr.append(_timed(lambda: recovery(layouts, n)))
            tc.append(_timed(lambda: commit(nodes, n, m)))
        row = {"nodes": nodes, "placement_s": statistics.median(tp), "recovery_s": statistics.median(tr),
               "commit_s": statistics.median(tc)}
        rows.append(row)
        print(f"{nodes:>6} nodes  placement {row['placement_s']:7.3f} s  recovery {row['recovery_s']:7.3f} s  "
              f"commit {row['commit_s']:7.3f} s", flush=True)
    out = {"blocks_per_node": blocks, "group_size": n, "parity": m, "rows": rows, "messages": []}
    if count:
        sz = real_sizes()
        print(f"\nper node per committed version (n={n}, m={m}, 12 blocks of 4 MiB; sizes {sz}):")
        for nodes in (64, 512, 4096):
            t = time.perf_counter()
            c = count_commit(nodes, n, m, 12, sz)
            out["messages"].append({"nodes": nodes, "sent": c.sent, "messages": c.messages_per_node,
                                    "control_bytes": c.control_bytes_per_node, "bytes": c.bytes_per_node,
                                    "heartbeats_per_s": c.heartbeats_per_node_s, "committed": c.committed})
            print(f"{nodes:>6} nodes  messages {c.messages_per_node:8.0f} (announce {c.sent['announce']:.0f}, "
                  f"contrib {c.sent['contrib']:.0f}, vote {c.sent['vote']:.0f}, report {c.sent['report']:.1f}, "
                  f"word {c.sent['word']:.1f})  control bytes "
                  f"{c.control_bytes_per_node:9.0f}  heartbeats/s {c.heartbeats_per_node_s:6.0f}  "
                  f"[{time.perf_counter() - t:.1f} s]", flush=True)
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["nodes"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("placement_s", "placement (groups, layouts, every node's contributions)"),
                       ("recovery_s", "recovery (one node lost in every group)"),
                       ("commit_s", "commit decision (one node, all votes)")):
        ax.plot(xs, [r[key] for r in res["rows"]], marker="o", label=label)
    lin = [res["rows"][-1]["placement_s"] * x / xs[-1] for x in xs]
    ax.plot(xs, lin, ls=":", color="grey", label="linear")
    ax.axhline(1.0, color="red", lw=0.8, ls="--", label="1 s")
    ax.axvline(4096, color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes in the job")
    ax.set_ylabel("CPU seconds (whole job, one process)")
    ax.set_title(f"snapshotd planners at scale (n={res['group_size']}, m={res['parity']}, "
                 f"{res['blocks_per_node']} blocks/node)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="256,1024,4096,16384")
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--parity", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--no-count", action="store_true", help="skip the message counts")
    a = ap.parse_args(argv)
    res = run([int(x) for x in a.nodes.split(",")], a.blocks, a.group_size, a.parity, a.repeats, not a.no_count)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    if a.png:
        plot(res, a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
