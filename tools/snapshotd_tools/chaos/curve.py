"""The daemons' memory over a whole chaos session, from its report: a summary and a PNG.

``python -m snapshotd_tools.chaos.curve REPORT.json OUT.png`` reads ``meta.memory_curve``
(one sample of every daemon's RSS and held shared memory every few seconds, and one
after each fault, written by ``runner.Harness``) and draws RSS and RSS + shm per node
against time, with the faults marked. It prints the summary quoted in docs/CHAOS.md:
per node, RSS at the first and last sample, its lowest and highest, and the slope of a
least-squares line over the second half of the run (a leak shows as a steady slope).
A replaced daemon is a new process: its RSS starts over, which the curve shows.
"""

from __future__ import annotations

import json
import sys


def summarize(curve: list) -> dict:
    """Per node: first/last/min/max RSS (MiB) and the RSS slope (MiB per hour) over the
    second half of the session."""
    out = {}
    if not curve:
        return out
    t_end = curve[-1][0]
    for node in sorted(curve[0][1]):
        pts = [(t, row[node][0]) for t, row in curve if node in row and row[node][0] > 0]
        if not pts:
            continue
        late = [(t, v) for t, v in pts if t >= t_end / 2] or pts
        n = len(late)
        mt, mv = sum(t for t, _ in late) / n, sum(v for _, v in late) / n
        var = sum((t - mt) ** 2 for t, _ in late)
        slope = sum((t - mt) * (v - mv) for t, v in late) / var * 3600 if var else 0.0
        out[node] = {"rss_first_mib": pts[0][1], "rss_last_mib": pts[-1][1],
                     "rss_min_mib": min(v for _, v in pts), "rss_max_mib": max(v for _, v in pts),
                     "rss_slope_second_half_mib_per_h": round(slope, 2), "samples": len(pts)}
    return out


def plot(doc: dict, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = doc["meta"]["memory_curve"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for node in sorted(curve[0][1]):
        ts = [t / 60 for t, row in curve if node in row]
        rss = [row[node][0] for _, row in curve if node in row]
        tot = [row[node][0] + row[node][1] for _, row in curve if node in row]
        a1.plot(ts, rss, label=node, lw=1)
        a2.plot(ts, tot, label=node, lw=1)
    faults = [s for s in doc["scenarios"] if s.get("params", {}).get("t_s") is not None]
    for s in faults:
        for ax in (a1, a2):
            ax.axvline(s["params"]["t_s"] / 60, color="red" if not s["ok"] else
                       ("purple" if s.get("overlap") else "0.8"), lw=0.5, zorder=0)
    a1.set_ylabel("daemon RSS (MiB)")
    a2.set_ylabel("RSS + held shm (MiB)")
    a2.set_xlabel("minutes since the session started (grey: a fault; purple: with an overlap)")
    a1.legend(loc="upper right", ncol=4, fontsize=8)
    m = doc["meta"]
    a1.set_title(f"snapshotd chaos: daemon memory over the whole session ({len(faults)} faults, "
                 f"{m.get('nodes')} nodes, m={m.get('parity')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m snapshotd_tools.chaos.curve REPORT.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        doc = json.load(f)
    if not doc.get("meta", {}).get("memory_curve"):
        print(f"{argv[0]}: no memory_curve in its meta", file=sys.stderr)
        return 2
    plot(doc, argv[1])
    print(json.dumps(summarize(doc["meta"]["memory_curve"]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
