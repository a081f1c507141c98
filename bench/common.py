"""Shared pieces of the comparison suite (``python -m bench``).

* the model state every contender snapshots: parameters plus AdamW state
  (``exp_avg``, ``exp_avg_sq``, ``step``), so ``state_bytes`` = 3 x parameter bytes,
  in tensors of at most ``tensor_bytes`` each; ``build_state`` makes the same shapes in
  every process (the restore workers rebuild an empty twin from the same numbers);
* a fingerprint of such a state, so a restore is checked, not only timed;
* memory figures of a process (/proc/PID/status) and of a daemon's /dev/shm holdings;
* helpers to write a file "safely" (fsync) and to drop one file's pages from the
  page cache (posix_fadvise DONTNEED), so a restore "from disk" reads the disk;
* machine description for the report.

1 GB = 1e9 bytes, 1 MiB = 2**20 bytes, times in seconds unless a name says otherwise.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch
import xxhash

MiB = 1 << 20
DEFAULT_TENSOR_BYTES = 64 * MiB


class StateModel(torch.nn.Module):
    """Parameters totalling ``param_bytes`` (float32) in tensors of <= ``tensor_bytes``."""

    def __init__(self, param_bytes: int, tensor_bytes: int, fill: bool = True):
        super().__init__()
        n_full, rest = divmod(param_bytes, tensor_bytes)
        sizes = [tensor_bytes] * n_full + ([rest] if rest >= 4 else [])
        ps = []
        for i, s in enumerate(sizes):
            t = torch.empty(max(1, s // 4))
            if fill:
                g = torch.Generator().manual_seed(1000 + i)
                t.uniform_(-1, 1, generator=g)
            else:
                t.zero_()  # a freshly started trainer's model: initialised, touched
            ps.append(torch.nn.Parameter(t))
        self.params = torch.nn.ParameterList(ps)


def param_bytes_for(state_bytes: int) -> int:
    """Parameter bytes of a state of ``state_bytes`` (params + 2 AdamW moments)."""
    return max(4, (state_bytes // 3) // 4 * 4)


def build_state(state_bytes: int, tensor_bytes: int = DEFAULT_TENSOR_BYTES, fill: bool = True):
    """(model, AdamW optimizer) holding about ``state_bytes`` of state.

    ``fill``: the optimizer state is filled in (as after a training step) with values
    derived from the parameters; without it the optimizer is fresh (no state), as in a
    trainer that just started and is about to restore."""
    model = StateModel(param_bytes_for(state_bytes), max(4, tensor_bytes // 4 * 4), fill)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if fill:
        with torch.no_grad():
            for p in model.parameters():
                opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": p * 0.1, "exp_avg_sq": p * p}
    return model, opt


def state_dict_of(model, opt) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def state_nbytes(model, opt) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for s in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    return n


def state_tensors(model, opt) -> list[torch.Tensor]:
    out = [p.detach() for p in model.parameters()]
    for p in model.parameters():
        s = opt.state.get(p, {})
        out += [s[k] for k in ("exp_avg", "exp_avg_sq") if k in s]
    return out


def fingerprint(model, opt) -> str:
    """xxh3 over the first and last MiB of every parameter and moment (cheap, and any
    restore that puts the wrong bytes anywhere near a tensor boundary fails it)."""
    h = xxhash.xxh3_64()
    for t in state_tensors(model, opt):
        b = t.contiguous().view(-1).view(torch.uint8)
        h.update(b[:MiB].numpy().tobytes())
        h.update(b[-MiB:].numpy().tobytes())
    return h.hexdigest()


def split_state(state_bytes: int, parts: int, tensor_bytes: int = DEFAULT_TENSOR_BYTES):
    """The same total state cut into ``parts`` (model, optimizer) pairs, one per rank."""
    return [build_state(state_bytes // parts, tensor_bytes) for _ in range(parts)]


# -- timing --------------------------------------------------------------------------
def med(xs) -> float:
    return float(statistics.median(xs))


def timed(fn, *a, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn(*a, **kw)
    return time.perf_counter() - t0, r


def copy_buffers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Touched buffers shaped like ``tensors`` (targets of a warm copy)."""
    dst = [torch.empty_like(t) for t in tensors]
    for d in dst:
        d.fill_(0)
    return dst


def warm_copy_s(tensors: list[torch.Tensor], repeats: int, dst=None) -> float:
    """Median time of one copy of ``tensors`` into touched, reused buffers (the floor)."""
    dst = dst if dst is not None else copy_buffers(tensors)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for d, t in zip(dst, tensors):
            d.copy_(t)
        times.append(time.perf_counter() - t0)
    del dst
    return med(times[1:])


# -- files ------------------------------------------------------------------------------
def fsync_path(path: str) -> None:
    """fsync a file, or every file in a directory and the directory itself."""
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(path, f) for f in os.listdir(path)] + [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_page_cache(path: str) -> None:
    """Evict one file's (or a directory's files') pages: the next read hits the disk.
    Only these files are touched (posix_fadvise), never the machine's whole cache."""
    paths = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def path_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


# -- memory -----------------------------------------------------------------------------
def proc_memory(pid: int) -> dict:
    """Memory of a process in bytes, from /proc/PID/status:
    peak_rss (VmHWM: the most resident memory ever, including mapped /dev/shm pages the
    process touched), rss (VmRSS now), rss_anon (private heap now: what the process
    holds beyond the shared-memory segments), rss_shmem (shm pages mapped now)."""
    keys = {"VmHWM": "peak_rss", "VmRSS": "rss", "RssAnon": "rss_anon", "RssShmem": "rss_shmem"}
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[keys[k]] = int(v.split()[0]) * 1024
    return out


def shm_bytes(prefix: str) -> int:
    """Bytes allocated to /dev/shm segments whose name starts with ``prefix`` (tmpfs
    blocks actually used, so a sparse or unfallocated tail is not counted)."""
    from snapshotd.wire import shm

    n = 0
    for name in shm.list_segments(prefix):
        try:
            n += os.stat(shm.path_of(name)).st_blocks * 512
        except OSError:
            pass
    return n


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def shm_free() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


# -- machine -----------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "ram_bytes": total,
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 0.05 else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Per live thread of process ``pid``: (its name in /proc, CPU seconds so far), from
    ``/proc/PID/task/TID/{comm,schedstat}``; {} when the process is gone."""
    out = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                out[int(t)] = (f.read().strip(), ns / 1e9)
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile
    return out


def thread_cpu_delta(before: dict, after: dict) -> dict[int, tuple[str, float]]:
    """CPU seconds each thread alive in both ``thread_cpu_seconds`` readings ran between them."""
    return {t: (after[t][0], after[t][1] - before[t][1]) for t in after if t in before}


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid``'s live threads have run so far, at nanosecond
    resolution (the sum of ``/proc/PID/task/*/schedstat``); ``/proc/PID/stat`` counts
    in clock ticks (10 ms), too coarse for the few milliseconds a save costs a daemon.
    Threads that exit drop out of the sum: compare it over windows in which the
    process's threads live on (a daemon's do). 0.0 when the process is gone."""
    return sum((cpu for _, cpu in thread_cpu_seconds(pid).values()), 0.0)
