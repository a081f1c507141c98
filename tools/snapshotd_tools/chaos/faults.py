"""Fault primitives that are not a plain signal: bit flips in held blocks, garbage on
both planes, a push beyond the memory budget.

Every function acts on a running ``Rig`` and returns a short description of what it
did (it goes into the report's "fault" column) or raises when the fault could not be
injected at all (so a scenario never passes because nothing happened). The garbage
functions also return what they observed (each junk request and the code it was
answered with, or "no answer"): the verdict is ``invariants.garbage_refused``'s, built
from those answers, not a constant.
"""

from __future__ import annotations

import os
import random
import socket

from snapshotd.wire import shm
from snapshotd_tools.chaos.rig import Rig
from snapshotd.wire.config import parse_size


def flip_data_bit(rig: Rig, node: str, block_size: int) -> str:
    """Flip one bit in the middle of the first block of ``node``'s committed shard."""
    rank = rig.nodes.index(node)
    cl = rig.client(node)
    try:
        name = cl.open_shard(rig.job, rank).segment_name
    finally:
        cl.close()
    seg = shm.open_segment(name, writable=True)
    try:
        off = min(seg.size - 1, block_size // 2)
        seg.buf[off] ^= 0x10
    finally:
        seg.close()
    return f"bit flipped in {node}'s data block 0 ({name.rsplit('.', 4)[-4]}..., byte {off})"


def flip_parity_bits(rig: Rig, node: str, block_size: int) -> str:
    """Flip one bit in every parity block ``node`` holds for the job."""
    names = shm.list_segments(f"{rig.prefix}{node}.{rig.job}.parity.")
    if not names:
        raise RuntimeError(f"{node} holds no parity segment for job {rig.job}")
    blocks = 0
    for name in names:
        seg = shm.open_segment(name, writable=True)
        try:
            for off in range(block_size // 3, seg.size, block_size):
                seg.buf[off] ^= 0x01
                blocks += 1
        finally:
            seg.close()
    return f"bit flipped in each of {node}'s {blocks} parity blocks"


def garbage_grpc(rig: Rig, node: str) -> tuple[str, dict]:
    """Raw garbage, a truncated HTTP/2 frame, and real gRPC calls with garbage bodies;
    returns (what was sent, {"answers": {method/body: code}, "raw_sent": n})."""
    import grpc

    path = rig.socks[rig.nodes.index(node)]
    sent = []
    for payload in (os.urandom(4096),
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x03\xe8\x04\x00\x00\x00\x00\x00" + b"\x00" * 10,
                    b"\x00\x00\x00\x00\xff"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(path)
            s.sendall(payload)
        sent.append(len(payload))
    answers = {}
    junk = random.Random(7).randbytes(257)  # fixed junk: the same answers every run
    with grpc.insecure_channel(f"unix:{path}") as ch:
        for method in ("AdoptShard", "AcquireStaging", "OpenShard", "RegisterJob"):
            call = ch.unary_unary(f"/snapshotd.v1.Snapshotd/{method}")
            for what, body in (("junk", junk), ("truncated", b"\x0a\xff\xff\xff\xff\x0f")):
                try:
                    call(body, timeout=5)
                    answers[f"{method}/{what}"] = "OK"
                except grpc.RpcError as exc:
                    answers[f"{method}/{what}"] = exc.code().name
    return (f"garbage to {node}'s gRPC socket: {len(sent)} raw streams, {len(answers)} calls with "
            f"junk bodies", {"answers": answers, "raw_sent": len(sent)})


def garbage_zmq(rig: Rig, node: str) -> tuple[str, dict]:
    """Junk, truncated and unsigned messages on ``node``'s peer port (ZeroMQ), then
    protobuf-shaped junk: well-framed, signed messages from a spec node whose header
    parses but names no op, an op this node lacks, a field the schema lacks, a field of
    the wrong wire type, lacks a required field, carries an unknown block kind or a
    negative version, or is a reply. Returns (what was sent, {"answers": {what: error
    code or "no answer"}, "raw_sent": n}); each must be ``PEER_PROTOCOL``."""
    import zmq

    from snapshotd.node.peer import MAGIC, frame_mac, peer_pb2 as ppb
    from snapshotd.node.spec_file import load_spec

    spec = load_spec(os.path.join(rig.d, "spec.yaml"))
    nd = next(x for x in spec.nodes if x.id == node)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{nd.host}:{nd.peer_port}")
    msgs = [[b"junk"], [os.urandom(1024)], [b"{", b"x"], [b'{"op":"fetch","job":"dp","v":1}', b""],
            [b'{"op":"round","job":"dp","v":1,"from":"n0","sig":"00"}'], [b"", b"", b""],
            [b"{" + b"9" * (1 << 20)]]
    for m in msgs:
        s.send_multipart(m)
    s.poll(500)
    if spec.peer_encryption == "curve":  # a plain socket gets no answers: the junk above is all
        s.close()
        return (f"{len(msgs)} junk/unsigned/truncated messages to {node}'s peer port {nd.peer_port} "
                "(CURVE: no protobuf junk)", {"answers": {}, "raw_sent": len(msgs)})
    sender = next(x.id for x in spec.nodes if x.id != node) if len(spec.nodes) > 1 else node
    key = spec.peer_key.encode() if spec.peer_key else None
    unknown_op = b"\x9a\x06\x01\x00"  # PeerRequest field 99 (length-delimited, 1 byte)
    headers = {
        "no op": ppb.PeerFrameHeader(request=ppb.PeerRequest()).SerializeToString(),
        "unknown op": b"\x22" + bytes([len(unknown_op)]) + unknown_op,
        "unknown field": b"\x78\x01",
        "wrong type": b"\x20\x01",  # request (a message) sent as a varint
        "missing field": ppb.PeerFrameHeader(request=ppb.PeerRequest(
            fetch=ppb.FetchRequest(job=rig.job, version=1))).SerializeToString(),
        "unknown kind": b"\x22\x04\x32\x02\x18\x07",  # request.fetch.kind = 7
        "negative version": ppb.PeerFrameHeader(request=ppb.PeerRequest(
            round=ppb.RoundRequest(job=rig.job, version=-1))).SerializeToString(),
        "a reply": ppb.PeerFrameHeader(reply=ppb.PeerReply(ack=ppb.Ack())).SerializeToString(),
    }
    answers = {}
    try:
        for i, (what, header) in enumerate(headers.items()):
            rid = i.to_bytes(8, "big")
            mac = frame_mac(key, sender.encode(), rid, header) if key else b""
            s.send_multipart([MAGIC, sender.encode(), rid, header, mac])
            reply = []
            answers[what] = "no answer"
            while len(reply) < 4 or reply[2] != rid:  # skip a late answer to earlier junk
                if not s.poll(5000):
                    break
                reply = s.recv_multipart()
            else:
                hdr = ppb.PeerFrameHeader.FromString(reply[3])
                answers[what] = hdr.error.code if hdr.HasField("error") else "not an error"
    finally:
        s.close()
    return (f"{len(msgs)} junk/unsigned/truncated messages and {len(headers)} protobuf-shaped junk "
            f"headers to {node}'s peer port {nd.peer_port}", {"answers": answers, "raw_sent": len(msgs)})


def push_over_budget(rig: Rig, node: str) -> str:
    """Ask ``node`` for a staging segment larger than its whole budget; it must refuse
    (RESOURCE_EXHAUSTED) and keep everything it holds."""
    from snapshotd.wire.errors import MemoryBudgetExceededError

    budget = parse_size(rig.budget)
    cl = rig.client(node, timeout_s=10)
    try:
        cl.register_job("pressure", 1, 1)
        try:
            cl.acquire_staging("pressure", 0, 1, budget + (1 << 20))
        except MemoryBudgetExceededError as exc:
            got = f"refused: {str(exc)[:80]}"
        else:
            raise AssertionError(f"{node} accepted a staging segment over its budget")
        cl.drop_job("pressure")
    finally:
        cl.close()
    return f"staging of {budget / 2**20 + 1:.0f} MiB asked of {node} (budget {rig.budget}): {got}"
