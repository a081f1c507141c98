"""GPU mode: the client's device-to-host path against the raw pinned copy, torch.save
and DCP async_save, on a model state of a few GiB living on the GPU.

Measured, median of ``repeats`` after ``warmup`` (the first snapshot pins the staging
segment with cudaHostRegister and the daemon allocates it):

  raw pinned copy     copy_(non_blocking=True) of every tensor into one pinned host
                      buffer, then synchronize: the floor of any device-to-host snapshot;
  snapshotd           save() returns after issuing the copies on a side stream
                      ("blocked"); "copy done" = save() until the device copy finished
                      (torch.cuda.synchronize; what a loop pays if nothing overlaps the
                      copy, checked against the <= 1.2x raw pinned copy goal); "safe" =
                      until the daemon holds and committed it;
  torch.save          of the CUDA state dict to /dev/shm (device -> pageable host -> file);
  DCP async_save      to disk: "blocked" until it returns (DCP stages the state to host
                      memory first), "safe" until its future resolves (files fsync'ed).

Sized to finish in under 4 minutes on an H100/H200 (default 4 GiB of state). Without a
CUDA device it returns ``{"skipped": True, "reason": ...}`` and measures nothing.

    python -m bench.gpu [--size-mib 4096] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch

from bench import common as cm


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (CPU-only build)"
        return (f"no CUDA device: torch {torch.__version__}, CUDA runtime {built}, "
                f"torch.cuda.is_available() is False; GPU mode not run")
    return None


def _build_on_device(state_bytes: int, tensor_bytes: int):
    """(model, AdamW) on cuda:0 with ~state_bytes of params + moments, made on the device."""
    pbytes = cm.param_bytes_for(state_bytes)
    n_full, rest = divmod(pbytes, tensor_bytes)
    sizes = [tensor_bytes] * n_full + ([rest] if rest >= 4 else [])
    model = torch.nn.Module()
    ps = []
    for i, s in enumerate(sizes):
        g = torch.Generator(device="cuda").manual_seed(1000 + i)
        ps.append(torch.nn.Parameter(torch.empty(s // 4, device="cuda").uniform_(-1, 1, generator=g)))
    model.params = torch.nn.ParameterList(ps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": p * 0.1, "exp_avg_sq": p * p}
    torch.cuda.synchronize()
    return model, opt


def _raw_pinned(tensors: list[torch.Tensor], repeats: int) -> float:
    total = sum(t.numel() * t.element_size() for t in tensors)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    host.fill_(0)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        off = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            host[off:off + n].copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            off += n
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del host
    return cm.med(times[1:])


def run(state_mib: int = 4096, repeats: int = 3, warmup: int = 2,
        tensor_mib: int = 256) -> dict:
    reason = _skip_reason()
    if reason:
        cm.say(f"gpu: skipped: {reason}")
        return {"skipped": True, "reason": reason}
    from bench.compare_snapshot import SingleDaemon
    from snapshotd_client import Snapshotter

    state_bytes = state_mib * cm.MiB
    t_start = time.perf_counter()
    res: dict = {"skipped": False, "device": torch.cuda.get_device_name(0),
                 "capability": list(torch.cuda.get_device_capability(0)),
                 "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "errors": []}
    # The daemon keeps two slots of the state in /dev/shm and torch.save writes a third;
    # containers often have a small /dev/shm: size down rather than fail.
    fit = int(min(cm.shm_free() / 3.5, cm.mem_available() / 5, torch.cuda.mem_get_info()[0] / 2.5))
    if fit < state_bytes:
        res["sized_down_from_bytes"] = state_bytes
        state_bytes = max(cm.MiB, fit // cm.MiB * cm.MiB)
        cm.say(f"gpu: only room for {cm.fmt_bytes(state_bytes)} of state (/dev/shm "
               f"{cm.fmt_bytes(cm.shm_free())}, RAM {cm.fmt_bytes(cm.mem_available())})")
    model, opt = _build_on_device(state_bytes, tensor_mib * cm.MiB)
    tensors = cm.state_tensors(model, opt)
    res["state_bytes"] = nbytes = cm.state_nbytes(model, opt)
    cm.say(f"gpu: {res['device']}, state {cm.fmt_bytes(nbytes)} on the device")
    raw_s = _raw_pinned(tensors, repeats)
    res["raw_pinned_copy_s"] = raw_s
    res["raw_pinned_gbps"] = nbytes / raw_s / 1e9
    cm.say(f"gpu: raw pinned copy {raw_s * 1e3:.1f} ms ({res['raw_pinned_gbps']:.1f} GB/s)")

    workdir = tempfile.mkdtemp(prefix="bench-suite-gpu-", dir="/tmp")
    daemon = SingleDaemon(workdir, 4 * nbytes + (512 << 20))
    try:
        snap = Snapshotter(model, opt, job_id="benchgpu", socket_path=daemon.socket, rank=0,
                           world_size=1, on_daemon_unavailable="raise")
        blocked, copied, safe, first = [], [], [], []
        for i in range(warmup + repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fut = snap.save(i + 1)
            t1 = time.perf_counter()
            torch.cuda.synchronize()  # the side stream's device-to-host copies are done
            t2 = time.perf_counter()
            st = fut.result()
            t3 = time.perf_counter()
            if not st.committed:
                raise RuntimeError(f"snapshot {i + 1} did not commit")
            if i >= warmup:
                blocked.append(t1 - t0)
                copied.append(t2 - t0)
                safe.append(t3 - t0)
            else:  # each slot's first use maps, prefaults and registers it with the driver
                first.append(t1 - t0)
        # Without cudaHostRegister the copies are synchronous: say which path was measured.
        pinned = len(snap.pinned_segments)
        snap.close()
        res["snapshotd"] = {"blocked_s": cm.med(blocked), "copy_done_s": cm.med(copied),
                            "safe_s": cm.med(safe), "blocked_all_s": blocked,
                            "copy_done_all_s": copied, "safe_all_s": safe,
                            "warmup_blocked_s": first, "pinned_segments": pinned,
                            "daemon_memory": daemon.memory()}
    finally:
        daemon.stop()
    cm.say(f"gpu: snapshotd blocked {res['snapshotd']['blocked_s'] * 1e3:.1f} ms, copy done "
           f"{res['snapshotd']['copy_done_s'] * 1e3:.1f} ms, safe {res['snapshotd']['safe_s'] * 1e3:.1f} ms"
           f" ({pinned} staging segments pinned; first saves blocked "
           f"{', '.join(f'{x * 1e3:.0f}' for x in first)} ms)")

    path = os.path.join("/dev/shm", f"bench-gpu-{os.getpid()}.pt")
    ts = []
    try:
        for i in range(1 + repeats):
            if os.path.exists(path):
                os.unlink(path)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
            ts.append(time.perf_counter() - t0)
        res["torch_save_shm_s"] = cm.med(ts[1:])
        cm.say(f"gpu: torch.save /dev/shm {res['torch_save_shm_s'] * 1e3:.1f} ms")
    except Exception as exc:  # keep the other figures
        res["errors"].append(f"torch.save: {type(exc).__name__}: {exc}")
        cm.say(f"gpu: torch.save failed: {exc}")
    finally:
        if os.path.exists(path):
            os.unlink(path)

    import torch.distributed.checkpoint as dcp

    blocked, safe = [], []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(1 + repeats):
                p = os.path.join(workdir, f"dcp-{i}")
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fut = dcp.async_save({"model": model.state_dict(), "optim": opt.state_dict()},
                                     checkpoint_id=p)
                t1 = time.perf_counter()
                fut.result()
                t2 = time.perf_counter()
                shutil.rmtree(p, ignore_errors=True)
                if i >= 1:
                    blocked.append(t1 - t0)
                    safe.append(t2 - t0)
        res["dcp_async"] = {"blocked_s": cm.med(blocked), "safe_s": cm.med(safe)}
        cm.say(f"gpu: DCP async_save blocked {res['dcp_async']['blocked_s'] * 1e3:.1f} ms, "
               f"on disk {res['dcp_async']['safe_s'] * 1e3:.1f} ms")
    except Exception as exc:
        res["errors"].append(f"DCP async_save: {type(exc).__name__}: {exc}")
        cm.say(f"gpu: DCP async_save failed: {exc}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["copy_done_over_raw"] = res["snapshotd"]["copy_done_s"] / raw_s
    res["blocked_over_raw"] = res["snapshotd"]["blocked_s"] / raw_s
    res["wall_s"] = time.perf_counter() - t_start
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=4096, help="state on the device (default 4096)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.size_mib < 1 or a.repeats < 1:
        p.error("--size-mib and --repeats must be positive")
    res = run(a.size_mib, a.repeats)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
