"""Erasure-coding throughput: snapshotd.core.erasure (ISA-L and numpy backends) vs competitors.

Measures encode and decode-of-m-losses (the first m shards, i.e. data shards, are lost
and rebuilt from the rest) in GB/s of data (1 GB = 1e9 bytes), median of --repeats,
single-threaded, for: erasure_code(backend="isal"), erasure_code(backend="numpy"), pyeclib's
Python API (isa_l_rs_vand), zfec, and reedsolo (pure Python; per-codeword RSCodec with
nsize=k+m, on a small size only). Missing competitors are skipped with the reason.
Every library's decode is checked to round-trip the data.

Buffers are warmed before timing (inputs and outputs pre-touched and reused), and every
shard is a separate 64-byte-aligned allocation at a staggered page offset
(``allocate_blocks``): ISA-L encode dropped from ~18 to 7.2 GB/s when the shards were
slices of one buffer at power-of-two offsets (cache aliasing; /work/shared/ANCHORS.md).
Measured here, the slow case needs both a shared offset modulo 4 KiB and no 64-byte
alignment (numpy's big buffers start 16 bytes into a page); the "one buffer" row
reproduces it: slices of one np.empty buffer at power-of-two offsets.

    python -m bench.bench_erasure [--size-mib 64] [--k 4 --m 2] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np

try:
    from snapshotd.core.erasure import allocate_blocks
except ImportError:  # run as `python bench/bench_erasure.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from snapshotd.core.erasure import allocate_blocks
from snapshotd.node.erasure import erasure_code, isal_library_path

from snapshotd.wire.errors import BackendUnavailableError

OURS_ISAL = "snapshotd isal"


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults, table expansion, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt_size(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


def _make_data(k: int, shard: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shard, dtype=np.uint8) for _ in range(k)]


def bench_ours(backend: str, k: int, m: int, shard: int, repeats: int, one_buffer: bool = False) -> dict:
    code = erasure_code(k, m, backend=backend)
    if one_buffer:  # slices of one allocation at power-of-two offsets, 16 B into a page
        raw = np.empty((k + m) * shard + 8192, dtype=np.uint8)
        start = (-raw.ctypes.data) % 4096 + 16
        whole = raw[start : start + (k + m) * shard]
        shards = [whole[i * shard : (i + 1) * shard] for i in range(k + m)]
        for dst, src in zip(shards, _make_data(k, shard)):
            dst[:] = src
        data, parity = shards[:k], shards[k:]
    else:
        data = allocate_blocks(k, shard)
        for dst, src in zip(data, _make_data(k, shard)):
            dst[:] = src
        parity = allocate_blocks(m, shard, start=k)  # staggered against the data too
    enc = _median_time(lambda: code.encode(data, parity), repeats)
    shards = data + parity
    lost = list(range(m))
    avail = {i: s for i, s in enumerate(shards) if i not in lost}
    out = dict(zip(lost, allocate_blocks(m, shard, stagger=not one_buffer)))
    dec = _median_time(lambda: code.reconstruct(avail, lost, out), repeats)
    for i in lost:
        assert np.array_equal(out[i], shards[i]), f"{backend}: shard {i} did not round-trip"
    return {"encode_s": enc, "decode_s": dec, "detail": code.backend_name}


def bench_pyeclib(k: int, m: int, shard: int, repeats: int) -> dict:
    from pyeclib.ec_iface import ECDriver

    driver = ECDriver(k=k, m=m, ec_type="isa_l_rs_vand")
    payload = b"".join(a.tobytes() for a in _make_data(k, shard))
    frags = driver.encode(payload)
    enc = _median_time(lambda: driver.encode(payload), repeats)
    survivors = frags[m:]  # lose the first m fragments (data)
    dec = _median_time(lambda: driver.decode(survivors), repeats)
    assert driver.decode(survivors) == payload, "pyeclib did not round-trip"
    return {"encode_s": enc, "decode_s": dec, "detail": "isa_l_rs_vand via liberasurecode"}


def bench_zfec(k: int, m: int, shard: int, repeats: int) -> dict:
    import zfec

    data = _make_data(k, shard)
    encoder, decoder = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
    parity_nums = list(range(k, k + m))
    parity = encoder.encode(data, parity_nums)
    enc = _median_time(lambda: encoder.encode(data, parity_nums), repeats)
    shards = data + list(parity)
    # Surviving primary block i must sit at position i: otherwise zfec's decode swaps
    # the input buffers' contents in place (seen with zfec 1.6) and repeats go wrong.
    nums: list[int] = [i if i >= m else -1 for i in range(k)]
    spare = iter(range(max(m, k), k + m))
    nums = [i if i >= 0 else next(spare) for i in nums]
    blocks = [shards[i] for i in nums]
    dec = _median_time(lambda: decoder.decode(blocks, nums), repeats)
    got = decoder.decode(blocks, nums)
    assert all(bytes(g) == d.tobytes() for g, d in zip(got, data)), "zfec did not round-trip"
    return {"encode_s": enc, "decode_s": dec, "detail": f"zfec {getattr(zfec, '__version__', '?')}"}


def bench_reedsolo(k: int, m: int, total: int, repeats: int) -> dict:
    import reedsolo

    if k + m > 255:
        raise RuntimeError("reedsolo codewords are limited to 255 symbols")
    rsc = reedsolo.RSCodec(nsym=m, nsize=k + m)
    total -= total % k
    payload = bytearray(np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8).tobytes())
    coded = rsc.encode(payload)
    enc = _median_time(lambda: rsc.encode(payload), repeats)
    n = k + m
    lost = list(range(m))  # the first m symbols of every codeword: data shards 0..m-1
    words = [bytearray(coded[i : i + n]) for i in range(0, len(coded), n)]
    for w in words:
        for p in lost:
            w[p] = 0

    def decode() -> bytearray:
        out = bytearray()
        for w in words:
            out += rsc.decode(w, erase_pos=lost, only_erasures=True)[0]
        return out

    dec = _median_time(decode, repeats)
    assert decode() == payload, "reedsolo did not round-trip"
    return {"encode_s": enc, "decode_s": dec, "detail": "pure Python, per codeword", "size": total}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=float, default=64.0, help="data bytes per stripe set (default 64)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="tiny reedsolo size, at most 2 repeats, no one-buffer row")
    p.add_argument("--reedsolo-kib", type=float, default=None, help="reedsolo size (default 64, quick 4)")
    a = p.parse_args(argv)
    if a.k < 1 or a.m < 1 or a.k + a.m > 256:
        p.error("need k >= 1, m >= 1, k + m <= 256")
    if a.size_mib <= 0 or a.repeats < 1:
        p.error("--size-mib and --repeats must be positive")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    k, m = a.k, a.m
    repeats = min(a.repeats, 2) if a.quick else a.repeats
    shard = max(1, int(a.size_mib * (1 << 20)) // k)
    size = shard * k
    rs_kib = a.reedsolo_kib if a.reedsolo_kib is not None else (4 if a.quick else 64)
    rs_size = max(k, int(rs_kib * 1024))

    runs: list[tuple[str, Callable[[], dict], int]] = [
        (OURS_ISAL, lambda: bench_ours("isal", k, m, shard, repeats), size),
        ("snapshotd numpy", lambda: bench_ours("numpy", k, m, shard, repeats), size),
    ]
    if not a.quick:
        runs.append(("snapshotd isal, one buffer", lambda: bench_ours("isal", k, m, shard, repeats, True), size))
    runs += [
        ("pyeclib isa_l_rs_vand", lambda: bench_pyeclib(k, m, shard, repeats), size),
        ("zfec", lambda: bench_zfec(k, m, shard, repeats), size),
        ("reedsolo", lambda: bench_reedsolo(k, m, rs_size, min(repeats, 3)), rs_size),
    ]
    print(f"erasure benchmark: k={k} m={m}, shard {_fmt_size(shard)}, median of {repeats}, single thread")
    print(f"ISA-L library: {isal_library_path() or 'not found'}")
    results, skipped = [], []
    for name, fn, nbytes in runs:
        try:
            r = fn()
        except (ImportError, BackendUnavailableError, RuntimeError) as e:
            print(f"  skipped {name}: {type(e).__name__}: {e}")
            skipped.append({"library": name, "reason": f"{type(e).__name__}: {e}"})
            continue
        nbytes = r.get("size", nbytes)
        results.append(
            {
                "library": name,
                "detail": r["detail"],
                "size_bytes": nbytes,
                "encode_gbps": nbytes / r["encode_s"] / 1e9,
                "decode_gbps": nbytes / r["decode_s"] / 1e9,
            }
        )

    base = next((r for r in results if r["library"] == OURS_ISAL), None)
    header = f"{'library':<28} | {'encode GB/s':>11} | {'decode GB/s':>11} | {'size':>9} | {'vs ours/isal enc, dec':>22}"
    print(header)
    print("-" * len(header))
    for r in results:
        if base:
            r["encode_vs_isal"] = r["encode_gbps"] / base["encode_gbps"]
            r["decode_vs_isal"] = r["decode_gbps"] / base["decode_gbps"]
            ratio = f"{r['encode_vs_isal']:.4f}x, {r['decode_vs_isal']:.4f}x"
        else:
            ratio = "n/a"
        print(
            f"{r['library']:<28} | {r['encode_gbps']:>11.4f} | {r['decode_gbps']:>11.4f} | "
            f"{_fmt_size(r['size_bytes']):>9} | {ratio:>22}"
        )
    print(f"(decode = rebuild of {m} lost data shard(s); GB/s of data, 1 GB = 1e9 bytes; "
          f"reedsolo on {_fmt_size(rs_size - rs_size % k)} only)")
    if a.json:
        doc = {
            "k": k,
            "m": m,
            "shard_bytes": shard,
            "size_bytes": size,
            "repeats": repeats,
            "isal_library": isal_library_path(),
            "results": results,
            "skipped": skipped,
        }
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
