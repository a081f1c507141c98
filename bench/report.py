"""The markdown summary (results.md) and the goals of issue 6, from a suite result.

Goals, each evaluated at every measured size (a goal passes when it holds at all of
them; the margin is given per size). A size whose measurement failed (an error, a
version that did not commit) counts as a miss of every goal that needed it; a size that
was skipped (too big for this machine) is listed as skipped and counts for nothing.
  G1  blocking time of snapshotd (m=0) <= 1.2 x one warm copy of the state (CPU): the
      warm copy is the table's "floor" row, the same figure wherever it is quoted;
  G2  snapshot safe with m=2 in less time than DCP async_save needs to reach disk;
  G3  restore from the local daemon faster than torch.load from /dev/shm;
  G4  GPU: time until the device-to-host copy is done <= 1.2 x the raw pinned copy.
"""

from __future__ import annotations

from bench.common import fmt_bytes


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["contender"] == name), None)


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:,.0f}" if x >= 1 else (f"{x * 1e3:.1f}" if x >= 0.001 else f"{x * 1e3:.3f}")


def goals(res: dict) -> list[dict]:
    out = []
    snaps = res.get("snapshot", {}).get("sizes", [])
    rest = {s["state_bytes"]: s for s in res.get("restore", {}).get("sizes", [])}

    def add(gid, text, per):
        per = [p for p in per if p is not None]
        status = "not measured" if not per else ("pass" if all(p["ok"] for p in per) else "miss")
        out.append({"goal": gid, "text": text, "status": status, "per_size": per})

    g1, g2, g3 = [], [], []
    for s in snaps:
        S = s["state_bytes"]
        failed = s.get("failed", {})

        def miss(labels, target):
            """A per-size miss when a measurement this goal needs failed at this size."""
            why = [f"{x}: {failed[x]}" for x in labels if x in failed]
            if not why:
                return None
            return {"state_bytes": S, "value": None, "target": target, "ok": False,
                    "detail": "measurement failed -- " + "; ".join(why)[:300]}

        ours = _row(s["rows"], "snapshotd m=0")
        if ours and s.get("warm_copy_s"):
            ratio = ours["blocked_s"] / s["warm_copy_s"]
            paired = (f"; a copy made just before each save took {_ms(ours['paired_warm_copy_s'])} ms"
                      if ours.get("paired_warm_copy_s") else "")
            g1.append({"state_bytes": S, "value": ratio, "target": 1.2, "ok": ratio <= 1.2,
                       "detail": f"{_ms(ours['blocked_s'])} ms vs one warm copy (the floor row) "
                                 f"{_ms(s['warm_copy_s'])} ms = {ratio:.2f}x (medians){paired}"})
        else:
            g1.append(miss(["snapshotd m=0", "start daemon"], 1.2))
        m2, da = _row(s["rows"], "snapshotd m=2"), _row(s["rows"], "DCP async_save disk")
        if m2 and da:
            ratio = m2["safe_s"] / da["safe_s"]
            g2.append({"state_bytes": S, "value": ratio, "target": 1.0, "ok": ratio < 1.0,
                       "detail": f"{_ms(m2['safe_s'])} ms vs DCP async_save {_ms(da['safe_s'])} ms = {ratio:.2f}x"})
        else:
            g2.append(miss(["snapshotd m=2", "DCP async_save"], 1.0))
        rs = rest.get(S)
        a, b = (_row(rs["rows"], "snapshotd (local daemon)"), _row(rs["rows"], "torch.load /dev/shm")) if rs else (None, None)
        if a and b:
            ratio = a["restore_s"] / b["restore_s"]
            g3.append({"state_bytes": S, "value": ratio, "target": 1.0, "ok": ratio < 1.0,
                       "detail": f"{_ms(a['restore_s'])} ms vs torch.load {_ms(b['restore_s'])} ms = {ratio:.2f}x"})
        else:
            g3.append(miss(["restore", "snapshotd m=0", "start daemon", "torch.save /dev/shm"], 1.0))
    add("G1", "blocking of snapshotd (m=0) <= 1.2x one warm copy of the state (CPU)", g1)
    add("G2", "safe with m=2 sooner than DCP async_save reaches disk", g2)
    add("G3", "restore from the local daemon faster than torch.load from /dev/shm", g3)
    gpu = res.get("gpu", {})
    if gpu and not gpu.get("skipped"):
        r = gpu["copy_done_over_raw"]
        add("G4", "GPU: device-to-host snapshot <= 1.2x the raw pinned copy",
            [{"state_bytes": gpu["state_bytes"], "value": r, "target": 1.2, "ok": r <= 1.2,
              "detail": f"{_ms(gpu['snapshotd']['copy_done_s'])} ms vs raw pinned {_ms(gpu['raw_pinned_copy_s'])} ms"
                        f" = {r:.2f}x on {gpu['device']}"}])
    else:
        out.append({"goal": "G4", "text": "GPU: device-to-host snapshot <= 1.2x the raw pinned copy",
                    "status": "not run", "per_size": [], "reason": gpu.get("reason", "GPU section not run")})
    return out


def comparison_table(res: dict) -> str:
    """The headline table at the largest size that has every contender measured."""
    snaps = res.get("snapshot", {}).get("sizes", [])
    if not snaps:
        return "(no snapshot results)"
    s = max(snaps, key=lambda x: (len(x["rows"]), x["state_bytes"]))
    S = s["state_bytes"]
    rest = next((r for r in res.get("restore", {}).get("sizes", []) if r["state_bytes"] == S), {"rows": []})
    restore_of = {"snapshotd m=0": "snapshotd (local daemon)", "torch.save /dev/shm": "torch.load /dev/shm",
                  "torch.save disk (fsync)": "torch.load disk", "DCP save disk": "DCP load disk"}
    nl = next((r for r in res.get("restore", {}).get("node_loss", []) if r.get("state_bytes_total")
               and abs(r["state_bytes_total"] - S) <= S // 50 and "rebuild_s" in r), None)
    survives = {"snapshotd m=0": "trainer crash", "snapshotd m=1": "crash + any 1 node",
                "snapshotd m=2": "crash + any 2 nodes", "torch.save /dev/shm": "trainer crash",
                "torch.save disk (fsync)": "crash + node (disk)", "DCP save disk": "crash + node (disk)",
                "DCP async_save disk": "crash + node (disk)"}
    lines = [f"State: {fmt_bytes(S)} (parameters + AdamW moments), median of "
             f"{res['config']['repeats']}; times in ms.", "",
             "| contender | blocked | safe | restore after crash | survives |", "|---|---:|---:|---:|---|"]
    if s.get("warm_copy_s"):
        lines.append(f"| one warm copy of the state (floor) | {_ms(s['warm_copy_s'])} | | | |")
    for r in s["rows"]:
        rr = _row(rest["rows"], restore_of.get(r["contender"], "?"))
        restore = _ms(rr["restore_s"]) if rr else "-"
        if r["contender"] == "snapshotd m=2" and nl:
            restore = f"node lost: rebuild {_ms(nl['rebuild_s'])}"
        lines.append(f"| {r['contender']} | {_ms(r['blocked_s'])} | {_ms(r['safe_s'])} | {restore} | "
                     f"{survives.get(r['contender'], '')} |")
    return "\n".join(lines)


def _size_table(sizes: list[dict], key: str) -> list[str]:
    names: list[str] = []
    for s in sizes:
        for r in s["rows"]:
            if r["contender"] not in names:
                names.append(r["contender"])
    hdr = "| contender | " + " | ".join(fmt_bytes(s["state_bytes"]) for s in sizes) + " |"
    out = [hdr, "|---|" + "---:|" * len(sizes)]
    for n in names:
        cells = []
        for s in sizes:
            r = _row(s["rows"], n)
            cells.append(_ms(r.get(key)) if r else "-")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return out


def _merged_note(res: dict) -> list[str]:
    dates = res.get("section_dates") or {}
    if len(set(dates.values())) <= 1:
        return []
    return ["", "Sections measured at different times (merged with --merge): "
            + ", ".join(f"{k} {v}" for k, v in sorted(dates.items())) + "."]


def markdown(res: dict) -> str:
    m = res["machine"]
    L = ["# snapshotd benchmark suite", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, "
         f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
         f"kernel {m['kernel']}; load average at start {m['loadavg_at_start']}. "
         f"Date: {m['date_utc']}. Suite wall time {res.get('wall_s', 0):.0f} s."
         f"{' QUICK MODE (tiny sizes; the numbers mean nothing).' if res['config'].get('quick') else ''}",
         "", "Timings on a shared machine vary by +-20% from run to run: compare the rows of one run.",
         *_merged_note(res),
         "", "## Comparison", "", comparison_table(res), "", "## Goals", ""]
    for g in res.get("goals", []):
        L.append(f"- **{g['goal']} {g['status'].upper()}**: {g['text']}")
        for p in g.get("per_size", []):
            L.append(f"  - {fmt_bytes(p['state_bytes'])}: {p['detail']}"
                     f" ({'pass' if p['ok'] else 'miss'}; target {p['target']}x)")
        if g.get("reason"):
            L.append(f"  - {g['reason']}")
    snaps = res.get("snapshot", {}).get("sizes", [])
    if snaps:
        L += ["", "## Snapshot: training loop blocked (ms)", ""] + _size_table(snaps, "blocked_s")
        L += ["", "## Snapshot: time until safe (ms)", ""] + _size_table(snaps, "safe_s")
        skipped = [f"{fmt_bytes(s['state_bytes'])}: {x}" for s in snaps for x in s.get("skipped", [])]
        if skipped:
            L += ["", "Skipped: " + "; ".join(skipped)]
    rs = res.get("restore", {}).get("sizes", [])
    if rs:
        L += ["", "## Restore after a trainer crash, fresh process (ms)", ""] + _size_table(rs, "restore_s")
    nl = [r for r in res.get("restore", {}).get("node_loss", []) if "rebuild_s" in r]
    if nl:
        L += ["", "## Restore after a node loss: the replacement node rebuilds from its peers "
                  "(the m=2 cluster, 4 nodes)", "",
              "| state (whole job) | per node | rebuild ms | GB/s of rebuilt data+parity | fetched |",
              "|---|---|---:|---:|---:|"]
        for r in nl:
            L.append(f"| {fmt_bytes(r['state_bytes_total'])} | {fmt_bytes(r['state_bytes_per_node'])} | "
                     f"{_ms(r['rebuild_s'])} | {r['rebuild_gbps']:.2f} | {fmt_bytes(r['rebuild_fetched_bytes'])} |")
    tr = res.get("train_overhead", {}).get("rows", [])
    if tr:
        L += ["", f"## Training overhead ({res['train_overhead']['model']}, "
                  f"{fmt_bytes(tr[0]['state_bytes'])} of state, 1 torch thread)", "",
              "| configuration | mean step ms | median | p95 | overhead | in snapshot calls, ms per step "
              "| CPU ms per step (job + daemon, drained rounds) | CPU overhead |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in tr:
            cpu = (f"{r['cpu_s_per_step'] * 1e3:.1f} | {r['cpu_overhead_pct']:+.1f}%" if "cpu_s_per_step" in r
                   else "- | -")
            L.append(f"| {r['config']} | {r['mean_step_s'] * 1e3:.1f} | {r['median_step_s'] * 1e3:.1f} | "
                     f"{r['p95_step_s'] * 1e3:.1f} | {r['overhead_pct']:+.1f}% | "
                     f"{r.get('snapshot_call_s_per_step', 0) * 1e3:.2f} | {cpu} |")
    mem = res.get("memory", {}).get("sizes", [])
    if mem:
        L += ["", "## Memory of the daemons (peak over the run, all daemons summed)", "",
              res["memory"]["what"], "",
              "| state | contender | peak RSS | private heap | /dev/shm held | held / state | "
              "committed data + parity / state | ideal (1 + m/k) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
        for s in mem:
            for r in s["rows"]:
                L.append(f"| {fmt_bytes(s['state_bytes'])} | {r['contender']} | {fmt_bytes(r['peak_rss_bytes'])} | "
                         f"{fmt_bytes(r['rss_anon_bytes'])} | {fmt_bytes(r['shm_bytes'])} | "
                         f"{r['held_over_state']:.2f}x | {r.get('committed_over_state', 0):.2f}x | "
                         f"{r['ideal_factor']:.2f}x |")
    sc = [r for r in res.get("scaling", {}).get("nodes", []) if "pipeline_s" in r]
    if sc:
        L += ["", "## Scaling with the number of nodes (bench_cluster, "
                  f"{fmt_bytes(sc[0]['state_bytes_per_node'])} per node)", "",
              res["scaling"]["what"], "",
              "| nodes | m | snapshot ms | GB/s per node | daemon CPU s per node | GB/s per daemon CPU-s "
              "| one node active GB/s | rebuild ms | rebuild GB/s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sc:
            one = f"{r['one_active_gbps']:.2f}" if r.get("one_active_gbps") else "-"
            L.append(f"| {r['nodes']} | {r['parity']} | {_ms(r['pipeline_s'])} | {r['pipeline_gbps_per_node']:.2f} | "
                     f"{r['daemon_cpu_s_per_node']:.3f} | {r['gbps_per_node_per_core']:.2f} | {one} | "
                     f"{_ms(r['rebuild_s'])} | {r['rebuild_gbps']:.2f} |")
    kr = res.get("kernels", {}).get("rows", [])
    if kr:
        L += ["", "## Kernels and transports against ../shared/ANCHORS.md", "",
              "| what | GB/s | anchor GB/s | vs anchor | from |", "|---|---:|---:|---:|---|"]
        for r in kr:
            va = f"{r['vs_anchor']:.2f}x" if r.get("vs_anchor") else "-"
            L.append(f"| {r['what']} | {r['gbps']:.2f} | {r['anchor_gbps'] or '-'} | {va} | {r['source']} |")
    gpu = res.get("gpu", {})
    L += ["", "## GPU mode", ""]
    if not gpu or gpu.get("skipped"):
        L.append(f"Not run: {gpu.get('reason', 'section not selected')}")
    else:
        sd = gpu["snapshotd"]
        L += [f"{gpu['device']} (torch {gpu['torch']}, CUDA {gpu['cuda_runtime']}), state "
              f"{fmt_bytes(gpu['state_bytes'])} on the device.", "",
              "| what | blocked ms | copy done / safe ms |", "|---|---:|---:|",
              f"| raw pinned device-to-host copy ({gpu['raw_pinned_gbps']:.1f} GB/s) | "
              f"{_ms(gpu['raw_pinned_copy_s'])} | {_ms(gpu['raw_pinned_copy_s'])} |",
              f"| snapshotd save() | {_ms(sd['blocked_s'])} | copy done {_ms(sd['copy_done_s'])}, "
              f"held {_ms(sd['safe_s'])} |",
              f"| torch.save /dev/shm | {_ms(gpu.get('torch_save_shm_s'))} | {_ms(gpu.get('torch_save_shm_s'))} |",
              f"| DCP async_save disk | {_ms(gpu.get('dcp_async', {}).get('blocked_s'))} | "
              f"{_ms(gpu.get('dcp_async', {}).get('safe_s'))} |"]
        L += [f"- error: {e}" for e in gpu.get("errors", [])]
    if res.get("errors"):
        L += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    if res.get("plots"):
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]]
    return "\n".join(L) + "\n"
