"""PNG plots of a suite result (the JSON written by ``python -m bench``).

Each function takes the result dict and an output folder and returns the file name
it wrote, or None when its section has nothing to draw. matplotlib's Agg backend is
used, so no display is needed.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARK = "os^vD<>p*h"
# One colour and marker per contender, the same in every plot.
STYLE = {
    "one warm copy (floor)": ("black", "."),
    "snapshotd m=0": ("tab:red", "o"), "snapshotd m=1": ("tab:orange", "s"),
    "snapshotd m=2": ("tab:brown", "D"), "snapshotd (local daemon)": ("tab:red", "o"),
    "torch.save /dev/shm": ("tab:blue", "^"), "torch.load /dev/shm": ("tab:blue", "^"),
    "torch.load mmap /dev/shm": ("tab:gray", "x"),
    "torch.save disk (fsync)": ("tab:cyan", "v"), "torch.load disk": ("tab:cyan", "v"),
    "DCP save disk": ("tab:green", "<"), "DCP load disk": ("tab:green", "<"),
    "DCP async_save disk": ("tab:olive", ">"),
}


def _style(name: str, i: int) -> dict:
    c, m = STYLE.get(name, (f"C{i % 10}", MARK[i % len(MARK)]))
    if name.startswith("snapshotd rebuild"):
        c, m = "tab:purple", "*"
    return {"color": c, "marker": m}


def _size_ticks(ax, xs_gib: list[float]) -> None:
    from bench.common import fmt_bytes

    xs = sorted(set(xs_gib))
    if xs:
        ax.set_xticks(xs, [fmt_bytes(x * 2**30) for x in xs])
        ax.minorticks_off()


def _by_contender(sizes: list[dict], key: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list, list]] = {}
    for s in sizes:
        x = s["state_bytes"] / 2**30
        for r in s.get("rows", []):
            if r.get(key) is None:
                continue
            xs, ys = out.setdefault(r["contender"], ([], []))
            xs.append(x)
            ys.append(r[key])
    return out


def _lines(ax, series, ylabel, title):
    for i, (name, (xs, ys)) in enumerate(sorted(series.items())):
        ax.plot(xs, [y * 1e3 for y in ys], label=name, **_style(name, i))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _size_ticks(ax, [x for xs, _ in series.values() for x in xs])
    ax.set_xlabel("state size (parameters + AdamW moments)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, out_dir: str, name: str, footer: str) -> str:
    fig.text(0.01, 0.005, footer, fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def _footer(res: dict) -> str:
    m = res.get("machine", {})
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
            f"{m.get('ram_bytes', 0) / 2**30:.0f} GiB, torch {m.get('torch', '?')}, {m.get('date_utc', '')}")


def snapshot(res: dict, out_dir: str) -> str | None:
    sizes = res.get("snapshot", {}).get("sizes", [])
    if not sizes:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    blocked = _by_contender(sizes, "blocked_s")
    blocked["one warm copy (floor)"] = ([s["state_bytes"] / 2**30 for s in sizes if s.get("warm_copy_s")],
                                        [s["warm_copy_s"] for s in sizes if s.get("warm_copy_s")])
    _lines(axes[0], blocked, "ms (log)", "training loop blocked per snapshot")
    _lines(axes[1], _by_contender(sizes, "safe_s"), "ms (log)", "time until the snapshot is safe")
    axes[1].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    return _save(fig, out_dir, "snapshot.png", _footer(res))


def restore(res: dict, out_dir: str) -> str | None:
    sizes = res.get("restore", {}).get("sizes", [])
    if not sizes:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    series = _by_contender(sizes, "restore_s")
    nl = res.get("restore", {}).get("node_loss", [])
    if nl:
        series["snapshotd rebuild of a lost node (m=2, of its S/4)"] = (
            [r["state_bytes_total"] / 2**30 for r in nl if "rebuild_s" in r],
            [r["rebuild_s"] for r in nl if "rebuild_s" in r])
    _lines(ax, series, "ms (log)", "restore after a crash (fresh process)")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "restore.png", _footer(res))


def train_overhead(res: dict, out_dir: str) -> str | None:
    rows = res.get("train_overhead", {}).get("rows", [])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["config"] for r in rows]
    ax.barh(names, [r["mean_step_s"] * 1e3 for r in rows], color="tab:blue", alpha=0.8)
    for i, r in enumerate(rows):
        ax.text(r["mean_step_s"] * 1e3, i, f"  {r['mean_step_s'] * 1e3:.1f} ms ({r['overhead_pct']:+.1f}%)",
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(r["mean_step_s"] for r in rows) * 1e3 * 1.45)
    ax.set_xlabel("mean step time (ms)")
    ax.set_title(f"training step time: {res['train_overhead'].get('model', '')}", fontsize=9)
    return _save(fig, out_dir, "train_overhead.png", _footer(res))


def memory(res: dict, out_dir: str) -> str | None:
    sizes = res.get("memory", {}).get("sizes", [])
    if not sizes:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    names = sorted({r["contender"] for s in sizes for r in s["rows"]})
    xs_all = []
    for i, name in enumerate(names):
        st = _style(name, i)
        pts = [(s["state_bytes"] / 2**30, r) for s in sizes for r in s["rows"] if r["contender"] == name]
        xs = [x for x, _ in pts]
        xs_all += xs
        for key, ls, label in (("committed_over_state", "-", "committed data + parity"),
                               ("shm_over_state", "--", "/dev/shm held (all slots)"),
                               ("held_over_state", ":", "/dev/shm + private heap")):
            ax.plot(xs, [r.get(key, 0) for _, r in pts], ls=ls, color=st["color"], marker=st["marker"],
                    label=f"{name}: {label}")
        ideal = pts[0][1]["ideal_factor"]
        ax.axhline(ideal, ls=(0, (1, 4)), lw=1.2, color=st["color"])
        ax.text(min(xs), ideal, f"ideal {ideal:.2f}x", fontsize=7, va="bottom", color=st["color"])
    ax.set_xscale("log", base=2)
    _size_ticks(ax, xs_all)
    ax.set_xlabel("state size")
    ax.set_ylabel("bytes held by the daemons / state size")
    ax.set_title("daemon memory against the (1 + m/k) ideal (peak over the run)")
    ax.legend(fontsize=7, ncol=1)
    ax.grid(True, alpha=0.3)
    return _save(fig, out_dir, "memory.png", _footer(res))


def scaling(res: dict, out_dir: str) -> str | None:
    rows = [r for r in res.get("scaling", {}).get("nodes", []) if "pipeline_s" in r]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    n = [r["nodes"] for r in rows]
    axes[0].plot(n, [r["pipeline_s"] * 1e3 for r in rows], marker="o", label="snapshot until committed")
    axes[0].plot(n, [r["rebuild_s"] * 1e3 for r in rows], marker="s", label="rebuild of a lost node")
    axes[0].set_xlabel("local nodes (all on this machine's cores)")
    axes[0].set_ylabel("ms")
    axes[0].set_title(f"{rows[0]['state_bytes_per_node'] / 2**20:.0f} MiB per node; m=1 below 4 nodes, else 2")
    axes[0].legend(fontsize=8)
    axes[1].plot(n, [r["pipeline_gbps_per_node"] for r in rows], marker="o", label="GB/s per node (shared cores)")
    axes[1].plot(n, [r["gbps_per_node_per_core"] for r in rows], marker="^",
                 label="GB/s per node per daemon CPU-second")
    if all(r.get("one_active_gbps") for r in rows):
        axes[1].plot(n, [r["one_active_gbps"] for r in rows], marker="s",
                     label="GB/s, only node 0 snapshotting (cores to itself)")
    axes[1].set_xlabel("local nodes")
    axes[1].set_ylabel("GB/s")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return _save(fig, out_dir, "scaling_nodes.png", _footer(res))


def kernels(res: dict, out_dir: str) -> str | None:
    rows = [r for r in res.get("kernels", {}).get("rows", []) if r.get("gbps")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["gbps"] for r in rows], height=0.4, label="measured")
    ax.barh([i - 0.2 for i in y], [r["anchor_gbps"] or 0 for r in rows], height=0.4, label="anchor",
            color="lightgray")
    ax.set_yticks(list(y), [r["what"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (1e9 bytes)")
    ax.set_title("kernels and transports against ../shared/ANCHORS.md")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "kernels.png", _footer(res))


def all_plots(res: dict, out_dir: str) -> list[str]:
    out = []
    for fn in (snapshot, restore, train_overhead, memory, scaling, kernels):
        try:
            name = fn(res, out_dir)
        except Exception as exc:  # a plot must never lose the numbers
            print(f"[bench] plot {fn.__name__} failed: {exc}", flush=True)
            name = None
        if name:
            out.append(name)
    return out
