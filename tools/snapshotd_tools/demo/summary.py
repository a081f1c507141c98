"""The figures ``snapshotd demo`` prints at the end, and its loss plot (DIR/loss.png).

Pure reporting: it reads the status rows of the cluster (``localcluster.collect_status``),
the reference run's JSON and the step printers, and prints; nothing here touches a
process.
"""

from __future__ import annotations

from snapshotd_tools.demo.console import mb, say
from snapshotd_tools.demo.trainer_group import JOB


def committed_version(row: dict) -> int:
    """The demo job's latest committed version in one node's status row (0: none)."""
    for j in row.get("jobs", []):
        if j.get("job_id") == JOB:
            return int(j.get("latest_committed_version", 0))
    return 0


def plot_losses(path: str, ref: list[float], before: dict[int, float], after: dict[int, float],
                kill_step: int, restored: int, lost_node: str) -> str | None:
    """Both loss curves (reference; failure run before and after the restore) into
    ``path``; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(range(1, len(ref) + 1), ref, color="0.55", lw=4, alpha=0.6, label="reference (no failure)")
    xs = sorted(before)
    ax.plot(xs, [before[s] for s in xs], "o-", color="tab:blue", ms=3, lw=1.2,
            label="failure run, until the failure")
    xs = sorted(after)
    if xs:
        ys = [after[s] for s in xs]
        if restored in before:  # join the curve at the restored step
            xs, ys = [restored] + xs, [before[restored]] + ys
        ax.plot(xs, ys, "o-", color="tab:green", ms=3, lw=1.2,
                label="failure run, resumed from the snapshot")
    ax.axvline(kill_step, color="tab:red", ls="--", lw=1)
    ax.annotate(f"node {lost_node} SIGKILLed\n(after step {kill_step})", (kill_step, 0.97),
                xycoords=("data", "axes fraction"), ha="right", va="top", color="tab:red",
                fontsize=8, xytext=(-4, 0), textcoords="offset points")
    ax.axvline(restored, color="tab:green", ls=":", lw=1)
    ax.annotate(f"restored step {restored}", (restored, 0.03), xycoords=("data", "axes fraction"),
                ha="left", va="bottom", color="tab:green", fontsize=8, xytext=(4, 0),
                textcoords="offset points")
    ax.set_xlabel("step")
    ax.set_ylabel("mean loss over ranks")
    ax.set_title("snapshotd demo: data-parallel training, a node lost and rebuilt")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def print_summary(d, rows, ref, run_pr, res_pr, nodes, parity, k, sharded, rebuilt_s, lr,
                  kill_step, restored_step, last, victim, elapsed, block_size: str) -> None:
    """The demo's closing figures: blocking time, bytes per node, parity overhead,
    rebuild time and lost steps (``block_size``: the cluster's, e.g. "16KiB")."""
    import numpy as np

    blocking = run_pr.blocking + res_pr.blocking
    state = ref["state_bytes"]
    say("summary")
    if blocking:
        say(f"    blocking per snapshot: median {np.median(blocking):.2f} ms, "
             f"p95 {np.percentile(blocking, 95):.2f} ms ({len(blocking)} snapshots over {nodes} ranks)")
    snap_bytes = {**run_pr.snapshot_bytes, **res_pr.snapshot_bytes}
    if snap_bytes:
        say("    snapshot payload per rank: " +
             ", ".join(f"r{r} {b / 1e3:.1f} kB" for r, b in sorted(snap_bytes.items())) +
             f" (model + optimizer state: {state / 1e3:.1f} kB)")
    from snapshotd.wire.config import parse_size

    bs = parse_size(block_size)
    tot_data = tot_par = tot_res = data_blocks = par_blocks = 0
    say(f"    bytes per node at v{max(committed_version(r) for r in rows)}:   {'data MB':>9} {'parity MB':>9} "
         f"{'reserved MB':>11}")
    for r in rows:
        if not r.get("alive"):
            say(f"      {r['node_id']:6} unreachable")
            continue
        data = int(r.get("bytes_committed", 0))
        par = sum(r.get("cluster", {}).get("parity_bytes", {}).values())
        res = int(r.get("bytes_reserved", 0))
        tot_data, tot_par, tot_res = tot_data + data, tot_par + par, tot_res + res
        data_blocks += -(-data // bs)  # one rank per node: its payload, cut into blocks
        par_blocks += par // bs
        say(f"      {r['node_id']:20} {data / 1e6:9.2f} {par / 1e6:9.2f} {res / 1e6:11.2f}")
    say(f"      {'total':20} {tot_data / 1e6:9.2f} {tot_par / 1e6:9.2f} {tot_res / 1e6:11.2f}"
         f"   (data: committed payload; reserved: + staging slots)")
    if tot_data:
        say(f"    parity overhead: {tot_par / tot_data:.2f} x the data bytes (ideal m/k = {parity}/{k} = "
             f"{parity / k:.2f}); in {block_size} blocks: {par_blocks} parity for {data_blocks} data = "
             f"{par_blocks / max(1, data_blocks):.2f} x")
        if abs(par_blocks / max(1, data_blocks) - parity / k) > 0.1 * parity / k:
            say(f"      (a tiny state: each node's data fits in {-(-data_blocks // nodes)} block(s), parity is "
                 f"kept in whole blocks and stripes rotate over the nodes; it is exactly m/k when "
                 f"every node holds a multiple of k = {k} blocks)")
    ideal = state * (1 + parity / k)
    say(f"    cluster-wide held: {mb(tot_data + tot_par)} (data + parity) = {(tot_data + tot_par) / ideal:.2f} x "
         f"the (1 + m/k) x state ideal of {mb(ideal)}; the data alone is {tot_data / max(1, state):.2f} x "
         f"the state " + ("(one sliced copy + each rank's RNG and data-stream state)" if sharded else
                          f"(every rank stores the full replicated state: {nodes} copies)"))
    if rebuilt_s is not None:
        say(f"    rebuild of {victim}: {rebuilt_s:.1f} s from replacement start to v{last} held"
             + (f" ({lr.get('seconds', 0):.2f} s of actual rebuild)" if lr else ""))
    say(f"    lost steps: {kill_step - restored_step} (killed after step {kill_step}, "
         f"restored step {restored_step}); demo time so far {elapsed:.1f} s")
