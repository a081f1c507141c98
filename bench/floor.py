"""The least CPU work one node's daemon must do per snapshot, with this machine's kernels.

Issue 16 asks, where the cluster cannot show its GB/s goals (2 shared cores), for the
daemon's core-seconds per GB of state beside the minimum work one snapshot needs. With
the accumulator route (``core/placement.contribution_targets``), for a node holding D
bytes of state in a group with k data and m parity blocks per stripe, every version
costs at least:

* **hash D**: the daemon checks what the trainer wrote (xxh3-64 per block; the client
  does not send checksums by default);
* **encode D**: the node's share of the stripes' parity rows -- every stripe's
  accumulator reads its k data blocks once and writes m rows (``combine_rows``), and
  each node accumulates 1/N of the N x D / k stripes, i.e. one k+m encode of D bytes;
* **hash the parity held**: m/k x D, so a later read can be verified;
* **copies for the network**: (k+m-1)/k x D sent and as much received; at least one
  memory copy each way (into and out of the kernel's socket buffers; ZeroMQ sends large
  frames without a copy of its own).

Each part is timed here with the kernels the daemon uses (xxhash, the erasure backend
in use: ISA-L or numpy, ``numpy.copyto`` into warm pages) on one ``--sample-mib`` chunk
and scaled linearly to D (every part is a streaming pass, linear in its bytes).
The trainer's own copy into shared memory is not the daemon's and is not counted.

    python -m bench.floor --size-mib 256 --k 2 --m 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import xxhash

MiB = 1 << 20


def _best(fn, repeats: int) -> float:
    """Fewest seconds of ``repeats`` calls after one warm-up call (a floor: the run least
    disturbed by other work on the machine)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def snapshot_floor(state_bytes: int, k: int, m: int, block_bytes: int = 4 * MiB,
                   sample_bytes: int = 64 * MiB, repeats: int = 5) -> dict:
    """Seconds of CPU each part of one node's minimum work per snapshot takes on this
    machine (see the module docstring), their sum, and the same as core-seconds per GB."""
    from snapshotd.node.erasure import erasure_code

    if k < 1 or m < 0:
        raise ValueError(f"need k >= 1 and m >= 0, got k={k}, m={m}")
    block_bytes = min(block_bytes, sample_bytes // max(k, 1))
    per = sample_bytes // (k * block_bytes)  # stripes in the sample
    if per < 1:
        raise ValueError("sample smaller than one stripe")
    sample = per * k * block_bytes
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, sample, dtype=np.uint8)
    scale = state_bytes / sample

    def hash_all(buf) -> None:
        mv = memoryview(buf)
        for off in range(0, len(buf), block_bytes):
            xxhash.xxh3_64_intdigest(mv[off:off + block_bytes])

    out = {"hash_data_s": _best(lambda: hash_all(data), repeats) * scale}
    code = erasure_code(k, m) if m else None
    if m:
        parity = [np.zeros(block_bytes, dtype=np.uint8) for _ in range(m)]
        stripes = [[data[(s * k + j) * block_bytes:(s * k + j + 1) * block_bytes] for j in range(k)]
                   for s in range(per)]

        def encode_all() -> None:
            for blocks in stripes:
                code.encode(blocks, parity)

        out["encode_s"] = _best(encode_all, repeats) * scale
        par_sample = data[:max(block_bytes, sample * m // k)]  # m/k of the state, hashed
        out["hash_parity_s"] = _best(lambda: hash_all(par_sample), repeats) * (sample * m / k) / len(par_sample) * scale
    else:
        out["encode_s"] = out["hash_parity_s"] = 0.0
    dst = np.empty_like(data)
    np.copyto(dst, data)  # touch the pages: warm copies
    copy_s = _best(lambda: np.copyto(dst, data), repeats) * scale
    route = (k + m - 1) / k if m else 0.0  # bytes sent per byte of state (accumulator route)
    out["network_copies_s"] = 2 * route * copy_s  # sent and received, one copy each
    out["sent_over_d"] = route
    out["total_s"] = out["hash_data_s"] + out["encode_s"] + out["hash_parity_s"] + out["network_copies_s"]
    out["core_s_per_gb"] = out["total_s"] / (state_bytes / 1e9)
    out["backend"] = code.backend_name if code is not None else "none"
    return out


def describe(fl: dict) -> str:
    """One line: the parts and their sum, in ms."""
    return (f"{fl['total_s'] * 1e3:.1f} ms (hash D {fl['hash_data_s'] * 1e3:.1f}, encode "
            f"{fl['encode_s'] * 1e3:.1f} [{fl['backend']}], hash parity {fl['hash_parity_s'] * 1e3:.1f}, "
            f"copies of {fl['sent_over_d']:.2f} x D each way {fl['network_copies_s'] * 1e3:.1f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--block-size-mib", type=int, default=4)
    p.add_argument("--sample-mib", type=int, default=64)
    a = p.parse_args(argv)
    fl = snapshot_floor(a.size_mib * MiB, a.k, a.m, a.block_size_mib * MiB, a.sample_mib * MiB)
    print(f"minimum daemon work per node per snapshot of {a.size_mib} MiB, k={a.k} m={a.m}: {describe(fl)}; "
          f"{fl['core_s_per_gb']:.3f} core-s per GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
