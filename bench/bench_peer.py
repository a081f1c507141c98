"""Peer-plane throughput: snapshotd.node.peer call_many over loopback TCP vs raw pyzmq.

Measures, in GB/s (1 GB = 1e9 bytes), median of --repeats, moving --size-mib of data in
--block-mib blocks between this process (the PeerClient) and a PeerServer running in a
separate process (so the two sides do not share a GIL):

* upload:   call_many of ``contrib`` requests (header + block), window --window; the
            handler checks the block's size and acks. The server verifies each payload's
            length and xxh3 before the handler.
* download: call_many of ``fetch`` requests (header only); the handler replies with a
            block (a memoryview of a numpy array, sent zero-copy); replies are consumed
            through ``on_reply`` (payload checked for length, then dropped), as a bulk
            reader would.

Both send and serve ``peer_pb2`` messages as the daemon does, so building the requests,
the checks on them (snapshotd.node.peer.checks) and the protobuf frame header are part
of what is measured.

each with and without an HMAC key, against raw pyzmq PUSH/PULL with copy=False (one way,
same block size, to a separate process; the end of a round is acknowledged on a
second socket), measured in the same run. The first round of every case is a warm-up
and is checked bit-exact (upload: server-side xxh3; download: compared with the block).

Every case runs with glibc's default malloc and then with
``snapshotd.node.peer.tune_malloc_for_bulk_transfers()`` applied in both processes (--malloc
picks one): with defaults, part of every freed multi-MiB ZeroMQ message goes back to the
kernel and the next one page-faults; the raw baseline is measured under the same setting.

    python -m bench.bench_peer [--size-mib 1024] [--block-mib 4] [--window 8] [--repeats 5]
                               [--malloc both|default|tuned] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import zmq

try:
    from snapshotd.node.peer import PeerClient, PeerServer, peer_pb2 as ppb, tune_malloc_for_bulk_transfers
except ImportError:  # run as `python bench/bench_peer.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from snapshotd.node.peer import PeerClient, PeerServer, peer_pb2 as ppb, tune_malloc_for_bulk_transfers

_HERE = os.path.abspath(__file__)
_REPO = os.path.dirname(os.path.dirname(_HERE))
SERVER_ID = "bench-srv"
CLIENT_ID = "bench-cli"
RAW = "raw pyzmq PUSH/PULL copy=False"
OURS = "snapshotd.node.peer call_many"


def _block(nbytes: int) -> np.ndarray:
    return np.random.default_rng(12345).integers(0, 256, nbytes, dtype=np.uint8)


# ------------------------------------------------------------------ server processes


def _serve_peer(key: bytes | None, block_bytes: int) -> None:
    block = _block(block_bytes)
    view = memoryview(block)

    def handler(sender, request, payload):
        op = request.WhichOneof("op")
        if op == "contrib":
            if payload is None or payload.nbytes != block_bytes:
                raise ValueError(f"upload: got {None if payload is None else payload.nbytes} bytes")
            return ppb.PeerReply(ack=ppb.Ack()), None
        if op == "fetch":
            return ppb.PeerReply(ack=ppb.Ack()), view
        raise ValueError(f"unknown op {op!r}")

    srv = PeerServer("tcp://127.0.0.1:0", SERVER_ID, key, [CLIENT_ID], handler,
                     max_payload_bytes=max(block_bytes, 1 << 20))
    srv.start()
    print(json.dumps({"port": srv.port}), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    srv.stop()


def _serve_raw() -> None:
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
    data_port = pull.bind_to_random_port("tcp://127.0.0.1")
    ack_port = push.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"port": data_port, "ack_port": ack_port}), flush=True)
    n = nbytes = 0
    while True:
        frame = pull.recv(copy=False)
        if len(frame) == 3 and frame.bytes == b"end":
            push.send(json.dumps({"n": n, "bytes": nbytes}).encode())
            n = nbytes = 0
        elif len(frame) == 4 and frame.bytes == b"quit":
            break
        else:
            n += 1
            nbytes += len(frame)
        del frame
    pull.close()
    push.close()


class _Child:
    """A server subprocess (this file with --serve-*) that prints its ports as JSON."""

    def __init__(self, args: list[str]):
        env = dict(os.environ)
        env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, _HERE, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError(f"bench server {args} failed to start (rc={self.proc.wait()})")
        self.info = json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------ measurements


def _median_rate(fn, nbytes: int, repeats: int) -> tuple[float, list[float]]:
    fn(check=True)  # warm-up round, verified
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(check=False)
        times.append(time.perf_counter() - t0)
    rates = [nbytes / t / 1e9 for t in times]
    return nbytes / statistics.median(times) / 1e9, rates


def bench_raw(block: np.ndarray, nblocks: int, repeats: int, malloc: str = "default") -> dict:
    child = _Child(["--serve-raw"] + (["--tune-malloc"] if malloc == "tuned" else []))
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    try:
        for s in (push, pull):
            s.setsockopt(zmq.LINGER, 0)
        push.connect(f"tcp://127.0.0.1:{child.info['port']}")
        pull.connect(f"tcp://127.0.0.1:{child.info['ack_port']}")
        view = memoryview(block)

        def round_(check: bool) -> None:
            for _ in range(nblocks):
                push.send(view, copy=False)
            push.send(b"end")
            if not pull.poll(60_000):
                raise RuntimeError("raw receiver did not acknowledge")
            ack = json.loads(pull.recv())
            if check and ack != {"n": nblocks, "bytes": nblocks * block.nbytes}:
                raise RuntimeError(f"raw receiver got {ack}")

        gbps, rates = _median_rate(round_, nblocks * block.nbytes, repeats)
        push.send(b"quit")
    finally:
        push.close()
        pull.close()
        child.close()
    return {"transport": RAW, "key": False, "direction": "one-way", "malloc": malloc,
            "gbps": gbps, "rates": rates}


def bench_peer(block: np.ndarray, nblocks: int, window: int, repeats: int, key: bytes | None,
               malloc: str = "default") -> list[dict]:
    child = _Child(["--serve-peer", "--block-bytes", str(block.nbytes)]
                   + (["--key-hex", key.hex()] if key else [])
                   + (["--tune-malloc"] if malloc == "tuned" else []))
    cli = PeerClient(f"tcp://127.0.0.1:{child.info['port']}", CLIENT_ID, SERVER_ID, key, timeout_ms=60_000)
    out = []
    try:
        view = memoryview(block)
        nbytes = nblocks * block.nbytes

        counts = [nblocks] * 6

        def upload(check: bool) -> None:  # a wrong size is an error reply: call_many raises
            cli.call_many([(ppb.PeerRequest(contrib=ppb.ContribRequest(
                job="bench", version=1, stripe=i, row=0, position=0, block_counts=counts)), view)
                for i in range(nblocks)], window=window)

        def download(check: bool) -> None:
            def consume(i, reply, payload):
                if payload is None or payload.nbytes != block.nbytes:
                    raise RuntimeError("download: wrong payload size")
                if check and not np.array_equal(np.frombuffer(payload, dtype=np.uint8), block):
                    raise RuntimeError("download: payload differs from the server's block")

            cli.call_many([(ppb.PeerRequest(fetch=ppb.FetchRequest(
                job="bench", version=1, kind=ppb.BLOCK_KIND_DATA, block_index=i)), None)
                for i in range(nblocks)], window=window, on_reply=consume)

        for direction, fn in (("upload", upload), ("download", download)):
            gbps, rates = _median_rate(fn, nbytes, repeats)
            out.append({"transport": OURS, "key": key is not None, "direction": direction,
                        "malloc": malloc, "gbps": gbps, "rates": rates})
    finally:
        cli.close()
        child.close()
    return out


# ------------------------------------------------------------------ CLI


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=_positive(float), default=1024.0, help="data per round (default 1024)")
    p.add_argument("--block-mib", type=_positive(float), default=4.0, help="block size (default 4)")
    p.add_argument("--window", type=_positive(int), default=8, help="requests in flight (default 8)")
    p.add_argument("--repeats", type=_positive(int), default=5, help="timed rounds, median reported (default 5)")
    p.add_argument("--malloc", choices=("both", "default", "tuned"), default="both",
                   help="glibc malloc settings to measure under (default both)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (8 MiB of 256 KiB blocks, 2 repeats) unless given")
    p.add_argument("--serve-peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--block-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--key-hex", default="", help=argparse.SUPPRESS)
    p.add_argument("--tune-malloc", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = _parser().parse_args(argv)
    if a.tune_malloc:
        tune_malloc_for_bulk_transfers()
    if a.serve_peer:
        _serve_peer(bytes.fromhex(a.key_hex) if a.key_hex else None, a.block_bytes)
        return 0
    if a.serve_raw:
        _serve_raw()
        return 0
    if a.quick:
        given = {x.split("=")[0] for x in argv}
        if "--size-mib" not in given:
            a.size_mib = 8.0
        if "--block-mib" not in given:
            a.block_mib = 0.25
        if "--repeats" not in given:
            a.repeats = 2
    block_bytes = max(1, int(a.block_mib * (1 << 20)))
    nblocks = max(1, int(a.size_mib * (1 << 20)) // block_bytes)
    block = _block(block_bytes)
    key = os.urandom(32)

    modes = ("default", "tuned") if a.malloc == "both" else (a.malloc,)
    results = []
    tuned_ok = None
    for mode in modes:  # default first: the tuning cannot be undone in this process
        if mode == "tuned":
            tuned_ok = tune_malloc_for_bulk_transfers()
        rows = [bench_raw(block, nblocks, a.repeats, mode)]
        for k in (None, key):
            rows.extend(bench_peer(block, nblocks, a.window, a.repeats, k, mode))
        raw = rows[0]["gbps"]
        for r in rows:
            r["vs_raw"] = r["gbps"] / raw if raw else None
        results.extend(rows)

    total = nblocks * block_bytes
    print(f"peer plane over loopback tcp: {nblocks} x {block_bytes / (1 << 20):g} MiB = "
          f"{total / (1 << 20):g} MiB per round, window {a.window}, median of {a.repeats}")
    if tuned_ok is False:
        print("note: tune_malloc_for_bulk_transfers() is not available here (not glibc); "
              "'tuned' rows ran with default malloc")
    print(f"{'transport':<32} {'malloc':<8} {'key':<5} {'direction':<9} {'GB/s':>6} {'vs raw':>7}")
    for r in results:
        keyed = "-" if r["transport"] == RAW else ("yes" if r["key"] else "no")
        print(f"{r['transport']:<32} {r['malloc']:<8} {keyed:<5} {r['direction']:<9} "
              f"{r['gbps']:>6.2f} {r['vs_raw']:>6.2f}x")

    if a.json:
        doc = {
            "block_bytes": block_bytes, "blocks": nblocks, "size_bytes": total, "window": a.window,
            "repeats": a.repeats, "python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "cpus": os.cpu_count(), "malloc_tuning_applied": tuned_ok,
            "results": results,
        }
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
