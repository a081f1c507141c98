"""The comparison suite: snapshotd against torch.save, DCP save and DCP async_save.

    python -m bench [--quick] [--sizes 64,256,1024,2048] [--out DIR] [--only SECTION ...]

Sections (all by default; --only picks some):
  snapshot  per state size: blocked and safe time of every contender (compare_snapshot),
            the restore of each in a fresh process (compare_restore), the daemons'
            memory against (1 + m/k), and the rebuild of a lost node (bench_cluster);
            "restore" and "memory" are aliases (they come from the same runs);
  train     step time of the CPU training example with snapshots (train_overhead);
  overhead  the cost of a save: a GPT-style 2-rank DDP loop with and without a save every
            step, and save() blocking against a warm copy (bench_overhead_gpt; not in
            --quick unless named with --only);
  scaling   2..8 local nodes (scaling, via bench_cluster);
  kernels   erasure coding and the peer plane against the anchors (kernels);
  gpu       the client's device-to-host path (gpu); skipped without CUDA.

Writes DIR/results.json, DIR/results.md (also printed) and PNG plots into DIR
(default bench/results/, git-ignored). A section that fails is recorded under
"errors" and the others still run; the exit status is 1 if any failed. Sizes that do
not fit in the available memory (or /dev/shm) are skipped with the reason.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

from bench import common as cm

SECTIONS = ("snapshot", "restore", "memory", "train", "overhead", "scaling", "kernels", "gpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_WHAT = (
    "Counted per daemon process, from /proc/PID/status and /dev/shm: peak RSS = VmHWM (the "
    "most resident memory at any time, including the shared-memory pages the daemon "
    "touched, e.g. while checksumming); private heap = RssAnon at the end (Python, gRPC, "
    "ZeroMQ buffers; not shared memory); /dev/shm held = tmpfs blocks of the daemon's own "
    "segments (staging slots, committed and pending versions, parity), the largest "
    "sample after any commit. held = /dev/shm held + private heap. The ideal is (1 + m/k) "
    "x the state: one copy of the data plus m/k of it in parity; a daemon keeps up to 3 "
    "slots per rank (committed, pending, staging) so that a snapshot never overwrites the "
    "last committed one, hence ~2-3x is by design, not waste. 'committed data + parity' "
    "is what the daemons report holding for the last committed version (bytes_committed "
    "+ parity_bytes of their stats): the figure to hold against the ideal.")
SCALING_WHAT = (
    "All daemons and the process playing every rank share this machine's cores, so the "
    "snapshot time grows with the node count here (each node sends m x its data and "
    "every byte is hashed and accumulated on this one CPU); the daemon CPU-seconds per "
    "node is the figure that carries over to real nodes, each with its own cores.")


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: expected MiB numbers like 64,256,1024, got {text!r}")
    if not sizes or any(not math.isfinite(s) or s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("--sizes: every size must be a positive number of MiB")
    return sorted({int(s * cm.MiB) for s in sizes})


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test, ~30 s)")
    p.add_argument("--sizes", type=_parse_sizes, default=None,
                   help="state sizes in MiB, comma separated (default 64,256,1024,2048; quick 4)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"),
                   help="results folder (default bench/results)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, metavar="SECTION",
                   help=f"run only these sections: {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 3, quick 2)")
    p.add_argument("--disk-dir", default="/tmp", help="where the disk contenders write (default /tmp)")
    p.add_argument("--cluster-max-mib", type=int, default=2048, help="largest size for the m=1, m=2 clusters")
    p.add_argument("--nodes", default=None, help="node counts for scaling (default 2,3,4,6,8; quick 3)")
    p.add_argument("--scaling-mib", type=int, default=None, help="state per node for scaling (default 64)")
    p.add_argument("--train-steps", type=int, default=None, help="timed steps per configuration (default 40)")
    p.add_argument("--gpu-mib", type=int, default=4096, help="state size on the GPU (default 4096)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections of DIR/results.json (rerun only some, e.g. --only scaling)")
    a = p.parse_args(argv)
    q = a.quick
    a.sizes = a.sizes or ([4 * cm.MiB] if q else [s * cm.MiB for s in (64, 256, 1024, 2048)])
    a.repeats = (2 if q else 3) if a.repeats is None else a.repeats
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    try:
        a.nodes = [int(x) for x in (a.nodes or ("3" if q else "2,3,4,6,8")).split(",")]
    except ValueError:
        p.error(f"--nodes: expected counts like 2,4,8, got {a.nodes!r}")
    if any(n < 2 or n > 16 for n in a.nodes):
        p.error("--nodes: each count must be between 2 and 16")
    a.scaling_mib = (1 if q else 64) if a.scaling_mib is None else a.scaling_mib
    a.train_steps = (6 if q else 40) if a.train_steps is None else a.train_steps
    if a.scaling_mib < 1 or a.train_steps < 1 or a.gpu_mib < 1 or a.cluster_max_mib < 0:
        p.error("--scaling-mib, --train-steps and --gpu-mib must be >= 1")
    a.block_size = "256KiB" if q else "4MiB"
    a.warmup = 1 if q else 3
    a.tensor_bytes = (1 * cm.MiB) if q else cm.DEFAULT_TENSOR_BYTES
    only = set(a.only or SECTIONS)
    if q and not a.only:
        only.discard("overhead")  # a minute of 2-rank training: the quick run stays quick
    if only & {"restore", "memory"}:
        only.add("snapshot")
    a.sections = only
    if not os.path.isdir(a.disk_dir):
        p.error(f"--disk-dir {a.disk_dir} is not a directory")
    return a


# -- the per-size section: snapshot, restore, memory, node loss -------------------------------
def _memory_row(name: str, r: dict, state_bytes: int, m: int, k: int) -> dict:
    mem, last = r["memory"], r.get("memory_last", {})
    held = mem["shm_bytes"] + last.get("rss_anon", 0)
    committed = r.get("committed_bytes", 0) + r.get("parity_bytes_held", 0)
    return {"contender": name, "m": m, "k": k, "peak_rss_bytes": mem["peak_rss"],
            "committed_plus_parity_bytes": committed, "committed_over_state": committed / state_bytes,
            "rss_anon_bytes": last.get("rss_anon", 0), "shm_bytes": mem["shm_bytes"],
            "held_bytes": held, "shm_over_state": mem["shm_bytes"] / state_bytes,
            "held_over_state": held / state_bytes, "ideal_factor": 1 + m / k,
            "ideal_bytes": int((1 + m / k) * state_bytes),
            "parity_bytes_held": r.get("parity_bytes_held", 0)}


def _fits(need: int, what: str, skipped: list[str]) -> bool:
    avail, shm = cm.mem_available(), cm.shm_free()
    if need <= 0.9 * avail and need <= 0.9 * shm:
        return True
    msg = (f"{what}: needs ~{cm.fmt_bytes(need)}, only {cm.fmt_bytes(avail)} memory / "
           f"{cm.fmt_bytes(shm)} /dev/shm available")
    cm.say("skipped " + msg)
    skipped.append(msg)
    return False


def run_size(S: int, a, res: dict) -> None:
    from bench import compare_restore as cr
    from bench import compare_snapshot as cs

    snap = {"state_bytes": S, "rows": [], "skipped": [], "failed": {}}
    rest = {"state_bytes": S, "rows": []}
    memo = {"state_bytes": S, "rows": []}
    skipped = snap["skipped"]
    res["snapshot"]["sizes"].append(snap)
    if not _fits(int(5.5 * S), f"{cm.fmt_bytes(S)} single-node contenders", skipped):
        return
    res["restore"]["sizes"].append(rest)
    res["memory"]["sizes"].append(memo)
    cm.say(f"=== state {cm.fmt_bytes(S)}: building parameters + AdamW moments")
    model, opt = cm.build_state(S, a.tensor_bytes)
    nbytes = cm.state_nbytes(model, opt)
    snap["state_bytes"] = rest["state_bytes"] = memo["state_bytes"] = nbytes
    fp = cm.fingerprint(model, opt)
    dst = cm.copy_buffers(cm.state_tensors(model, opt))
    snap["warm_copy_s"] = cm.warm_copy_s(cm.state_tensors(model, opt), a.repeats, dst)
    cm.say(f"one warm copy {snap['warm_copy_s'] * 1e3:.1f} ms")
    sd = cm.state_dict_of(model, opt)
    work = tempfile.mkdtemp(prefix="bench-suite-", dir=a.disk_dir)
    shm_path = os.path.join("/dev/shm", f"bench-suite-{os.getpid()}.pt")
    disk_path = os.path.join(work, "state.pt")
    to_restore: list[dict] = []  # what each contender left behind, restored in one worker

    def step(label, fn):
        try:
            return fn()
        except Exception as exc:
            msg = f"{cm.fmt_bytes(S)} {label}: {type(exc).__name__}: {exc}"
            cm.say("ERROR " + msg)
            res["errors"].append(msg)
            snap["failed"][label] = f"{type(exc).__name__}: {exc}"  # its goals miss at this size
            traceback.print_exc()
            return None

    def report(r, t0):
        if r:
            cm.say(f"{r['contender']:<26} blocked {r['blocked_s'] * 1e3:9.1f} ms   safe "
                   f"{r['safe_s'] * 1e3:9.1f} ms   ({time.perf_counter() - t0:.0f} s)")
            snap["rows"].append(r)
        return r

    daemon = None
    try:
        t0 = time.perf_counter()
        if report(step("torch.save /dev/shm", lambda: cs.torch_save(sd, shm_path, a.repeats, 1, False)), t0):
            to_restore.append({"name": "torch.load /dev/shm", "kind": "torch.load", "target": shm_path})
        t0 = time.perf_counter()
        if report(step("torch.save disk", lambda: cs.torch_save(sd, disk_path, a.repeats, 1, True)), t0):
            to_restore.append({"name": "torch.load disk", "kind": "torch.load", "target": disk_path,
                               "drop_cache": True})
        t0 = time.perf_counter()
        r = report(step("DCP save", lambda: cs.dcp_save(model, opt, work, a.repeats, 1, False)), t0)
        if r:
            to_restore.append({"name": "DCP load disk", "kind": "dcp", "target": r["path"], "drop_cache": True})
        t0 = time.perf_counter()
        r = report(step("DCP async_save", lambda: cs.dcp_save(model, opt, work, a.repeats, 1, True)), t0)
        if r:
            shutil.rmtree(r["path"], ignore_errors=True)
        t0 = time.perf_counter()
        daemon = step("start daemon", lambda: cs.SingleDaemon(work, 4 * S + (256 << 20)))
        if daemon:
            r = report(step("snapshotd m=0", lambda: cs.snapshotd_single(model, opt, daemon, a.repeats,
                                                                          a.warmup, dst)), t0)
            if r:
                memo["rows"].append(_memory_row("snapshotd m=0", r, nbytes, 0, 1))
                to_restore.append({"name": "snapshotd (local daemon)", "kind": "snapshotd",
                                   "target": daemon.socket})
        sd = model = opt = dst = None  # the worker needs the memory; the state is in files and the daemon
        gc.collect()
        if to_restore:
            t0 = time.perf_counter()
            rows = step("restore", lambda: cr.run_worker(to_restore, S, a.tensor_bytes, a.repeats, fp))
            for r in rows or []:
                rest["rows"].append(r)
                cm.say(f"restore {r['contender']:<26} {r['restore_s'] * 1e3:9.1f} ms "
                       f"(first {r['first_s'] * 1e3:.1f} ms)")
            cm.say(f"restores took {time.perf_counter() - t0:.0f} s")
    finally:
        if daemon:
            daemon.stop()
        if os.path.exists(shm_path):
            os.unlink(shm_path)
        shutil.rmtree(work, ignore_errors=True)
        gc.collect()
    for m in (1, 2):
        if S > a.cluster_max_mib * cm.MiB:
            skipped.append(f"snapshotd m={m}: above --cluster-max-mib {a.cluster_max_mib}")
            continue
        if not _fits(int((2 + 3 + 2 * m / 2) * S), f"snapshotd m={m} cluster", skipped):
            continue
        t0 = time.perf_counter()
        r = report(step(f"snapshotd m={m}", lambda: cs.snapshotd_cluster(
            S, m, a.repeats, a.warmup, a.tensor_bytes, a.block_size, rebuild=(m == 2))), t0)
        if r:
            memo["rows"].append(_memory_row(f"snapshotd m={m}", r, nbytes, m, 2))
            if "rebuild" in r:
                rb = r["rebuild"]
                res["restore"]["node_loss"].append({
                    "state_bytes_total": nbytes, "state_bytes_per_node": r["state_bytes_per_node"],
                    "nodes": r["nodes"], "parity": m, "pipeline_s": r["safe_s"], **rb})
                cm.say(f"node loss ({r['nodes']} nodes, m={m}): rebuild {rb['rebuild_s'] * 1e3:.1f} ms "
                       f"({rb['rebuild_gbps']:.2f} GB/s, fetched {cm.fmt_bytes(rb['rebuild_fetched_bytes'])})")
        gc.collect()


# -- the other sections ------------------------------------------------------------------------
def run_train(a, res: dict) -> None:
    from bench import compare_snapshot as cs
    from bench import train_overhead

    work = tempfile.mkdtemp(prefix="bench-suite-trd-")
    daemon = cs.SingleDaemon(work, 1 << 30)
    try:
        res["train_overhead"] = train_overhead.run(a.train_steps, 2 if a.quick else 10, not a.quick,
                                                   daemon.socket, daemon.proc.pid, 1 if a.quick else 6)
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    for r in res["train_overhead"]["rows"]:
        cm.say(f"train {r['config']:<36} {r['mean_step_s'] * 1e3:8.1f} ms/step ({r['overhead_pct']:+.1f}%), "
               f"CPU {r['cpu_s_per_step'] * 1e3:.1f} ms/step ({r['cpu_overhead_pct']:+.1f}%)")


def run_overhead(a, res: dict) -> None:
    from bench import bench_overhead_gpt as bo

    sizes = [s for s in (1 * cm.MiB, 16 * cm.MiB, 256 * cm.MiB) if s <= max(a.sizes)] or [min(a.sizes)]
    res["overhead"] = bo.run(2 if a.quick else 8, 3 if a.quick else 10, sizes, min(a.repeats, 3) if a.quick
                             else max(a.repeats, 5))
    for line in bo.format_text(res["overhead"]).splitlines():
        cm.say(line)


def run_kernels(a, res: dict) -> None:
    from bench import kernels

    if a.quick:
        er = kernels.erasure(0.25, 2, True)
        pr = kernels.peer(2, 0.25, 2)
    else:
        er = kernels.erasure(64, 5, False)
        pr = kernels.peer(256, 4, 3)
    snaps = res.get("snapshot", {}).get("sizes", [])
    big = max((s for s in snaps if s.get("warm_copy_s")), key=lambda s: s["state_bytes"], default=None)
    warm = big["state_bytes"] / big["warm_copy_s"] / 1e9 if big else None
    ours = next((r for r in big["rows"] if r["contender"] == "snapshotd m=0"), None) if big else None
    ingest = big["state_bytes"] / ours["safe_s"] / 1e9 if ours else None
    res["kernels"] = {"erasure": er, "peer": pr, "rows": kernels.summarize(er, pr, warm, ingest),
                      "anchors": kernels.ANCHORS}


def _data_keys(sections: set[str]) -> list[str]:
    keys = {"snapshot": ["snapshot", "restore", "memory"], "train": ["train_overhead"],
            "overhead": ["overhead"],
            "scaling": ["scaling"], "kernels": ["kernels"], "gpu": ["gpu"]}
    return [k for sec in sorted(sections) for k in keys.get(sec, [])]


def _merge_previous(a, res: dict) -> None:
    """--merge: keep the sections of DIR/results.json that this run does not redo (e.g.
    rerun only the cluster figures after a change), each with the date it was measured."""
    path = os.path.join(a.out, "results.json")
    if not os.path.exists(path):
        cm.say(f"--merge: no {path} yet; nothing to merge")
        return
    with open(path) as f:
        old = json.load(f)
    redo = set(_data_keys(a.sections))
    old_dates = old.get("section_dates") or {}
    for key in _data_keys(set(SECTIONS)):
        if key in old and key not in redo:
            res[key] = old[key]
            res["section_dates"][key] = old_dates.get(key, old.get("machine", {}).get("date_utc", "?"))
    cm.say(f"--merge: kept {sorted(set(res['section_dates']) - redo)} from {path}")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds every finally: daemons stopped, files removed


def main(argv=None) -> int:
    a = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    res: dict = {"machine": cm.machine(),
                 "config": {"quick": a.quick, "sizes_bytes": a.sizes, "repeats": a.repeats,
                            "warmup": a.warmup, "sections": sorted(a.sections),
                            "tensor_bytes": a.tensor_bytes, "block_size": a.block_size,
                            "disk_dir": a.disk_dir, "argv": list(argv if argv is not None else sys.argv[1:])},
                 "units": "seconds (*_s), bytes (*_bytes), GB/s with 1 GB = 1e9 bytes (*_gbps)",
                 "errors": []}
    date = res["machine"]["date_utc"]
    res["section_dates"] = {k: date for k in _data_keys(a.sections)}
    if a.merge:
        _merge_previous(a, res)
    m = res["machine"]
    cm.say(f"{m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB, torch {m['torch']}, "
           f"load {m['loadavg_at_start']}; sections {sorted(a.sections)}; results -> {a.out}")

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:
            res["errors"].append(f"section {name}: {type(exc).__name__}: {exc}")
            cm.say(f"ERROR in section {name}: {exc}")
            traceback.print_exc()
        cm.say(f"section {name} took {time.perf_counter() - t0:.0f} s")

    if "snapshot" in a.sections:
        res["snapshot"] = {"sizes": [], "what": __import__("bench.compare_snapshot").compare_snapshot.__doc__}
        res["restore"] = {"sizes": [], "node_loss": []}
        res["memory"] = {"sizes": [], "what": MEMORY_WHAT}

        def sizes():
            for S in a.sizes:
                run_size(S, a, res)
        section("snapshot", sizes)
    if "train" in a.sections:
        section("train", lambda: run_train(a, res))
    if "overhead" in a.sections:
        section("overhead", lambda: run_overhead(a, res))
    if "scaling" in a.sections:
        from bench import scaling

        def sc():
            res["scaling"] = {"nodes": scaling.run(a.nodes, a.scaling_mib, a.block_size, min(a.repeats, 3)),
                              "what": SCALING_WHAT}
            res["errors"].extend(f"scaling {r['nodes']} nodes: {r['error'][-300:]}"
                                 for r in res["scaling"]["nodes"] if "error" in r)
        section("scaling", sc)
    if "kernels" in a.sections:
        section("kernels", lambda: run_kernels(a, res))
    if "gpu" in a.sections:
        from bench import gpu

        def g():
            res["gpu"] = gpu.run(min(a.gpu_mib, 64) if a.quick else a.gpu_mib, a.repeats)
            res["errors"].extend(f"gpu {e}" for e in res["gpu"].get("errors", []))
        section("gpu", g)
    from bench import report

    res["goals"] = report.goals(res)
    res["wall_s"] = time.perf_counter() - t_start
    try:
        from bench import plots
    except ImportError as exc:  # matplotlib comes with the demo extra
        cm.say(f"no plots: {exc} (pip install matplotlib, or the 'demo' extra)")
        res["plots"] = []
    else:
        res["plots"] = plots.all_plots(res, a.out)
    md = report.markdown(res)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    print(md)
    cm.say(f"wrote {a.out}/results.json, results.md and {len(res['plots'])} plots in {res['wall_s']:.0f} s")
    return 1 if res["errors"] else 0
