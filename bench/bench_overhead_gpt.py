"""The cost of a save (issue 16): a GPT-style 2-rank DDP loop, and save() against a copy.

    python -m bench.bench_overhead_gpt [--rounds 8] [--round-steps 10] [--sizes 1,16,256]
                                       [--nodes 1] [--no-stage-ahead] [--json out.json] [--quick]

Two measurements, each side by side in one run on real daemons (``localcluster``: by
default one node, m=0, both ranks on it, as a user's first try on one machine;
``--nodes 2 --parity 1`` puts each rank on its own node):

``gpt``  -- the demo's nanoGPT-style model (``snapshotd_tools.demo.gpt_trainer.GPT``, by
default n_embd 64, 2 layers: ~1.3 MB of parameters + AdamW moments per rank), DDP over
gloo, 2 ranks as 2 processes, one torch thread each, gradient accumulation 2. The same
processes alternate rounds of ``--round-steps`` iterations without snapshots and with
``snap.save(step)`` after every iteration (the order flips every round, so drifts in
the machine's load hit both alike). A step is timed from the start of the iteration to
the return of ``save`` (the hand-off thread and the daemon compete for the same cores
during the following steps, so their cost shows in the step time too). Reported per
rank and overall: median and mean step time of each mode, overhead = with / without - 1
(of the medians, and of the means), and the time ``save()`` held the loop (median, p90,
max; and how much of it was waiting for the previous save's hand-off) beside one warm
copy of the same tensors; the CPU time per step of each mode (both ranks' processes,
hand-off threads included, plus the daemon's: a figure that does not depend on how busy
the machine is, unlike step times on a shared one) and its ratio, and how many saves had to ask the daemon for their staging
segment themselves (the others found it acquired by the previous hand-off;
``--no-stage-ahead``: every save asks, as before issue 16).

``blocking`` -- one process, one rank, state of each size (parameters + AdamW moments
in 64 MiB tensors): per repeat, one warm copy of the state into touched buffers, then
``save()`` timed by the caller, then the hand-off awaited (so that the previous save's
hand-off does not share the measured window); states up to 64 MiB at least 200 times
(``SMALL_REPEATS``: a median of a few is noise there). Reported: median blocking, median
copy, blocking - copy (goal: <= 1 ms) and blocking / copy.

Timings come from the caller's clock (``time.perf_counter`` around the call), not from
``Snapshotter``'s own figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
GOAL_OVERHEAD = 0.05  # snapshot every step: <= 5 % of the step
GOAL_EXCESS_S = 1e-3  # save() blocking <= warm copy + 1 ms
# A small state's save takes ~0.3 ms of which this shared VM's scheduling can add as much
# again to some saves (a vCPU woken from idle): a median of a few is either mode. States
# up to SMALL_STATE are measured SMALL_REPEATS times at least (a few seconds in all).
SMALL_STATE, SMALL_REPEATS = 64 * MiB, 200


def _q(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- the GPT loop: one rank ----------------------------------------------------------------
def _rank_main(a) -> None:
    """One DDP rank (run as ``python -m bench.bench_overhead_gpt _rank ...``); prints one
    JSON line with its timings."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from bench import common as cm
    from snapshotd_client import Snapshotter
    from snapshotd_tools.demo.gpt_trainer import GPT, GPTConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1337 + rank)
    cfg = GPTConfig(n_embd=a.n_embd, n_layer=a.n_layer, n_head=2, block_size=16, vocab_size=64)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(cfg.vocab_size, (4096,), generator=g)

    def get_batch():
        ix = torch.randint(len(data) - cfg.block_size, (4,))
        return (torch.stack([data[i:i + cfg.block_size] for i in ix]),
                torch.stack([data[i + 1:i + 1 + cfg.block_size] for i in ix]))

    raw = GPT(cfg)
    model = nn.parallel.DistributedDataParallel(raw)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    best = 1e9
    X, Y = get_batch()
    snap = Snapshotter(model, opt, job_id=a.job, socket_path=a.socket,
                       on_daemon_unavailable="raise",
                       state={"batch": lambda: (X, Y), "best_val_loss": lambda: best})
    if a.no_stage_ahead:
        snap.stage_ahead = False  # every save asks the daemon for its segment itself
    asked = [0]  # saves that called AcquireStaging themselves (not staged ahead)
    real_acquire = snap.client.acquire_staging

    def counting_acquire(*args, **kw):
        asked[0] += 1
        return real_acquire(*args, **kw)

    snap.client.acquire_staging = counting_acquire
    step = 0
    times = {"off": [], "on": []}
    save_s, skipped, futs = [], 0, []

    cpu = {"off": [], "on": []}  # CPU seconds of this process (all its threads) per step
    daemon_cpu = {"off": 0.0, "on": 0.0}  # the daemons' CPU seconds in each mode (rank 0)

    def iteration(save: bool, timed: bool) -> None:
        nonlocal X, Y, step, best, skipped
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(2):  # gradient accumulation, as the demo
            _, loss = model(X, Y)
            X, Y = get_batch()
            (loss / 2).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        best = min(best, loss.item())
        if save:
            ts = time.perf_counter()
            fut = snap.save(step)
            te = time.perf_counter()
            skipped += fut is None
            if timed:
                save_s.append(te - ts)
                if fut is not None:
                    futs.append(fut)
        if timed:
            times["on" if save else "off"].append(time.perf_counter() - t0)
            cpu["on" if save else "off"].append(time.process_time() - c0)

    for _ in range(a.warmup):  # the staging slots exist and are mapped after these
        iteration(True, False)
    snap.wait()
    asked[0] = 0
    for rnd in range(a.rounds):
        for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
            d0 = _cpu_of(a.daemon_pids) if rank == 0 else 0.0
            for _ in range(a.round_steps):
                iteration(mode == "on", True)
            if mode == "on":
                snap.wait(a.timeout_s)  # this round's hand-offs count in this round
                dist.barrier()
            if rank == 0:
                daemon_cpu[mode] += _cpu_of(a.daemon_pids) - d0
    st = snap.wait(a.timeout_s)
    backpressure_s = [f.result().backpressure_s for f in futs]
    dist.barrier()  # every rank delivered its last save: it commits (a moment later)
    try:
        _wait_committed(snap.client, a.job, step, 60.0)
    except RuntimeError:
        pass  # reported: latest_committed < last_step
    committed = snap.client.list_versions(a.job).latest_committed_version
    tensors = cm.state_tensors(raw, opt)
    copy_s = cm.warm_copy_s(tensors, 20)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    snap.close()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "times": times, "save_s": save_s, "skipped": skipped,
                      "backpressure_s": backpressure_s, "acquired_by_save": asked[0],
                      "cpu_s": cpu, "daemon_cpu_s": daemon_cpu,
                      "last_step": step, "last_saved": st.version if st else 0,
                      "latest_committed": committed, "state_bytes": state_bytes,
                      "payload_bytes": st.bytes if st else 0, "warm_copy_s": copy_s}), flush=True)


def _cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` used so far."""
    from bench.common import proc_cpu_seconds

    return sum(proc_cpu_seconds(pid) for pid in pids)


def _summary_of(times_off, times_on, save_s, copy_s) -> dict:
    off_med, on_med = statistics.median(times_off), statistics.median(times_on)
    off_mean, on_mean = statistics.fmean(times_off), statistics.fmean(times_on)
    return {"steps_each": len(times_off), "median_step_off_s": off_med, "median_step_on_s": on_med,
            "mean_step_off_s": off_mean, "mean_step_on_s": on_mean,
            "overhead_median": on_med / off_med - 1, "overhead_mean": on_mean / off_mean - 1,
            "save_median_s": statistics.median(save_s), "save_p90_s": _q(save_s, 0.9),
            "save_max_s": max(save_s), "warm_copy_s": copy_s}


def run_gpt(rounds: int, round_steps: int, nodes: int = 1, parity: int = 0, n_embd: int = 64,
            n_layer: int = 2, warmup: int = 5, timeout_s: float = 300.0,
            stage_ahead: bool = True, socket: str | None = None, daemon_pids=()) -> dict:
    """Bring up ``nodes`` daemons, run the 2-rank loop, take the daemons down
    (``socket``: use that running daemon instead, both ranks on it)."""
    from snapshotd_tools import localcluster as lc

    work = tempfile.mkdtemp(prefix="bench-ovh-gpt-")
    d = os.path.join(work, "cluster")
    job = "ovh" + os.urandom(3).hex()
    try:
        if socket is None:
            info = lc.up(d, nodes, parity, block_size="1MiB", budget="1GiB")
            socks = [info["nodes"][f"n{i % nodes}"]["socket"] for i in range(2)]
        else:
            socks = [socket, socket]
        pids = daemon_pids if socket is not None else [v["pid"] for v in info["nodes"].values()]
        port = lc.free_port()
        procs = []
        for r in range(2):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                       LOCAL_WORLD_SIZE=str(2 if nodes == 1 else 1), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.bench_overhead_gpt", "_rank", "--job", job,
                 "--socket", socks[r], "--rounds", str(rounds), "--round-steps", str(round_steps),
                 "--n-embd", str(n_embd), "--n-layer", str(n_layer), "--warmup", str(warmup),
                 "--timeout-s", str(timeout_s), "--daemon-pids", ",".join(map(str, pids)),
                 *([] if stage_ahead else ["--no-stage-ahead"])],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError("the GPT ranks did not finish in time")
            if p.returncode != 0:
                for q in procs:
                    q.kill()
                raise RuntimeError(f"a GPT rank exited {p.returncode}: {err[-2000:]}")
            outs.append(json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]))
    finally:
        if os.path.exists(os.path.join(d, "cluster.json")):
            lc.down(d)
        shutil.rmtree(work, ignore_errors=True)
    ranks = []
    for o in sorted(outs, key=lambda o: o["rank"]):
        s = _summary_of(o["times"]["off"], o["times"]["on"], o["save_s"], o["warm_copy_s"])
        s.update(rank=o["rank"], skipped=o["skipped"], state_bytes=o["state_bytes"],
                 backpressure_median_s=statistics.median(o["backpressure_s"] or [0.0]),
                 acquired_by_save=o["acquired_by_save"],
                 payload_bytes=o["payload_bytes"], last_step=o["last_step"],
                 last_saved=o["last_saved"], latest_committed=o["latest_committed"])
        ranks.append(s)
    allo = [x for o in outs for x in o["times"]["off"]]
    alln = [x for o in outs for x in o["times"]["on"]]
    alls = [x for o in outs for x in o["save_s"]]
    res = _summary_of(allo, alln, alls, statistics.median(o["warm_copy_s"] for o in outs))
    # CPU cost per step (both ranks' processes, hand-off threads included, + the daemons):
    # independent of how busy the machine is, unlike the step times
    n = len(outs[0]["cpu_s"]["off"])
    dc = next(o["daemon_cpu_s"] for o in outs if o["rank"] == 0)
    cpu_off = sum(sum(o["cpu_s"]["off"]) for o in outs) / n + dc["off"] / n
    cpu_on = sum(sum(o["cpu_s"]["on"]) for o in outs) / n + dc["on"] / n
    res.update(cpu_step_off_s=cpu_off, cpu_step_on_s=cpu_on, cpu_overhead=cpu_on / cpu_off - 1,
               daemon_cpu_step_off_s=dc["off"] / n, daemon_cpu_step_on_s=dc["on"] / n)
    res.update(ranks=ranks, nodes=nodes, parity=parity, n_embd=n_embd, n_layer=n_layer,
               stage_ahead=stage_ahead,
               backpressure_median_s=statistics.median(x for o in outs for x in o["backpressure_s"] or [0.0]),
               rounds=rounds, round_steps=round_steps, state_bytes_per_rank=ranks[0]["state_bytes"],
               goal_overhead=GOAL_OVERHEAD, met=res["overhead_median"] <= GOAL_OVERHEAD)
    return res


# -- save() blocking against a warm copy -------------------------------------------------------
def _budget(sizes: list[int]) -> int:
    return 3 * max(sizes, default=0) + 256 * MiB  # three slots (committed, pending, staging)


def _wait_committed(client, job: str, version: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.list_versions(job).latest_committed_version < version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job}: version {version} did not commit in {timeout_s} s")
        time.sleep(0.01)


def run_blocking(sizes: list[int], repeats: int, warmup: int = 3, tensor_bytes: int = 64 * MiB,
                 socket: str | None = None, small_repeats: int = SMALL_REPEATS) -> dict:
    """``sizes``: state bytes (parameters + moments) per measurement. ``socket``: a running
    daemon with room for three slots of the largest size (else one is brought up)."""
    import gc

    from bench import common as cm
    from snapshotd_client import Snapshotter
    from snapshotd_tools import localcluster as lc

    work = tempfile.mkdtemp(prefix="bench-ovh-blk-")
    d = os.path.join(work, "cluster")
    rows = []
    try:
        if socket is None:
            info = lc.up(d, 1, 0, block_size="1MiB", budget=str(_budget(sizes)))
            socket = info["nodes"]["n0"]["socket"]
        sock = socket
        for S in sizes:
            n_rep = max(repeats, small_repeats) if S <= SMALL_STATE else repeats
            model, opt = cm.build_state(S, min(tensor_bytes, max(S // 4, 4096)))
            tensors = cm.state_tensors(model, opt)
            dst = cm.copy_buffers(tensors)
            job = f"blk{S // MiB}m" + os.urandom(2).hex()
            snap = Snapshotter(model, opt, job_id=job, socket_path=sock, rank=0, world_size=1,
                               on_daemon_unavailable="raise")
            blocked, copies = [], []
            try:
                for i in range(warmup + n_rep):
                    tc = time.perf_counter()
                    for x, t in zip(dst, tensors):
                        x.copy_(t)
                    t0 = time.perf_counter()
                    fut = snap.save(i + 1)
                    t1 = time.perf_counter()
                    if fut is None:
                        raise RuntimeError(f"save {i + 1} was skipped")
                    st = fut.result()  # handed off (a cluster commits it a moment later)
                    if i >= warmup:
                        copies.append(t0 - tc)
                        blocked.append(t1 - t0)
                nbytes = st.bytes
                _wait_committed(snap.client, job, warmup + n_rep)
                snap.client.drop_job(job)
            finally:
                snap.close()
            b, c = statistics.median(blocked), statistics.median(copies)
            rows.append({"state_bytes": sum(t.numel() * t.element_size() for t in tensors),
                         "payload_bytes": nbytes, "tensors": len(tensors), "repeats": n_rep,
                         "blocking_median_s": b, "blocking_p90_s": _q(blocked, 0.9),
                         "warm_copy_median_s": c, "excess_s": b - c, "blocking_over_copy": b / c,
                         "met": b - c <= GOAL_EXCESS_S})
            cm.say(f"blocking {cm.fmt_bytes(S)}: save {b * 1e3:.2f} ms, copy {c * 1e3:.2f} ms, "
                   f"excess {(b - c) * 1e3:+.2f} ms")
            del model, opt, tensors, dst
            gc.collect()
    finally:
        if os.path.exists(os.path.join(d, "cluster.json")):
            lc.down(d)
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "goal_excess_s": GOAL_EXCESS_S}


def run(rounds: int, round_steps: int, sizes: list[int], repeats: int, nodes: int = 1,
        parity: int = 0, n_embd: int = 64, n_layer: int = 2, stage_ahead: bool = True,
        small_repeats: int = SMALL_REPEATS) -> dict:
    """Both measurements (the suite's "overhead" section); with one node, on one daemon."""
    from snapshotd_tools import localcluster as lc

    work = tempfile.mkdtemp(prefix="bench-ovh-")
    d = os.path.join(work, "cluster")
    try:
        sock = None
        if nodes == 1:
            info = lc.up(d, 1, 0, block_size="1MiB", budget=str(max(1 << 30, _budget(sizes))))
            sock = info["nodes"]["n0"]["socket"]
        res = {"gpt": run_gpt(rounds, round_steps, nodes, parity, n_embd, n_layer,
                              stage_ahead=stage_ahead, socket=sock,
                              daemon_pids=[info["nodes"]["n0"]["pid"]] if sock else ())}
        if sizes:
            res["blocking"] = run_blocking(sizes, repeats, socket=sock, small_repeats=small_repeats)
    finally:
        if os.path.exists(os.path.join(d, "cluster.json")):
            lc.down(d)
        shutil.rmtree(work, ignore_errors=True)
    return res


def format_text(res: dict) -> str:
    lines = []
    g = res.get("gpt")
    if g:
        lines.append(f"GPT-style DDP, 2 ranks, {g['nodes']} node(s) m={g['parity']}, "
                     f"{g['state_bytes_per_rank'] / 1e6:.2f} MB state per rank, "
                     f"{g['steps_each']} steps per mode")
        for r in g["ranks"] + [dict(g, rank="all")]:
            lines.append(f"  rank {r['rank']}: step {r['median_step_off_s'] * 1e3:.2f} ms without, "
                         f"{r['median_step_on_s'] * 1e3:.2f} ms with a save every step "
                         f"(median {r['overhead_median'] * 100:+.1f} %, mean {r['overhead_mean'] * 100:+.1f} %); "
                         f"save() median {r['save_median_s'] * 1e3:.2f} ms, p90 "
                         f"{r['save_p90_s'] * 1e3:.2f}, max {r['save_max_s'] * 1e3:.1f} (of which waiting for "
                         f"the previous hand-off: median {r['backpressure_median_s'] * 1e3:.2f}); "
                         f"{r.get('acquired_by_save', '-')} saves asked for a segment themselves; warm copy "
                         f"{r['warm_copy_s'] * 1e3:.3f} ms")
        lines.append(f"  CPU per step (2 ranks + daemon): {g['cpu_step_off_s'] * 1e3:.2f} ms without, "
                     f"{g['cpu_step_on_s'] * 1e3:.2f} ms with ({g['cpu_overhead'] * 100:+.1f} %; daemon "
                     f"{g['daemon_cpu_step_off_s'] * 1e3:.2f} -> {g['daemon_cpu_step_on_s'] * 1e3:.2f} ms)")
    for r in (res.get("blocking") or {}).get("rows", []):
        lines.append(f"  {r['state_bytes'] / MiB:7.0f} MiB: save() {r['blocking_median_s'] * 1e3:8.2f} ms, "
                     f"warm copy {r['warm_copy_median_s'] * 1e3:8.2f} ms, excess "
                     f"{r['excess_s'] * 1e3:+.2f} ms ({r['blocking_over_copy']:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_rank"]:
        p = argparse.ArgumentParser()
        for k in ("--job", "--socket"):
            p.add_argument(k, required=True)
        for k in ("--rounds", "--round-steps", "--n-embd", "--n-layer", "--warmup"):
            p.add_argument(k, type=int, required=True)
        p.add_argument("--timeout-s", type=float, required=True)
        p.add_argument("--no-stage-ahead", action="store_true")
        p.add_argument("--daemon-pids", default="")
        ra = p.parse_args(argv[1:])
        ra.daemon_pids = [int(x) for x in ra.daemon_pids.split(",") if x]
        _rank_main(ra)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--round-steps", type=int, default=10)
    p.add_argument("--sizes", default="1,16,256", help="MiB, comma separated ('' : none; 1024 is optional)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--parity", type=int, default=0)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--no-stage-ahead", action="store_true",
                   help="GPT loop: every save asks the daemon for its staging segment itself")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="few steps, 1 MiB (a smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.round_steps, a.sizes, a.repeats = 2, 3, "1", 2
    try:
        sizes = [int(float(x) * MiB) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sizes: MiB numbers like 1,16,256, got {a.sizes!r}")
    if a.rounds < 1 or a.round_steps < 1 or a.repeats < 1 or any(s <= 0 for s in sizes):
        p.error("--rounds, --round-steps, --repeats and every size must be positive")
    if a.nodes not in (1, 2) or a.parity not in range(a.nodes):
        p.error("--nodes 1 (m=0) or --nodes 2 (m=0 or 1)")
    res = run(a.rounds, a.round_steps, sizes, a.repeats, a.nodes, a.parity, a.n_embd, a.n_layer,
              not a.no_stage_ahead, small_repeats=a.repeats if a.quick else SMALL_REPEATS)
    print(format_text(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
