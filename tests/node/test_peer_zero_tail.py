"""A payload's zero tail stays off the wire (issue 16: bytes on the network).

Real PeerServer and PeerClient on loopback: a request and a reply whose payload ends in
a padded tail arrive whole and bit-identical (the checksum, stored or computed, is the
whole payload's), while the peer plane's own byte counter (``TRAFFIC``) shows the tail
was not sent; payloads without such a tail are sent as they are; a header whose tail
would take the payload over the limit is refused.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import xxhash

from snapshotd.node.peer import PeerClient, PeerProtocolError, PeerServer, RemoteError
from snapshotd.node.peer.framing import ZERO_TAIL_MIN, check_payload, payload_frame, zero_tail
from snapshotd.node.peer.traffic import TRAFFIC
from snapshotd.wire._proto import peer_pb2 as ppb

MiB = 1 << 20


def _block(real: int, size: int = 4 * MiB, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    out = np.zeros(size, np.uint8)
    out[:real] = rng.integers(1, 256, real, dtype=np.uint8)  # no zero byte in the real part
    return out.tobytes()


def _wait(pred, timeout_s: float = 10):
    t0 = time.monotonic()
    while (got := pred()) is None:
        assert time.monotonic() - t0 < timeout_s, "timed out"
        time.sleep(0.002)
    return got


def _fetch() -> ppb.PeerRequest:
    return ppb.PeerRequest(fetch=ppb.FetchRequest(job="j", version=1, kind=ppb.BLOCK_KIND_DATA, block_index=0))


def test_zero_tail_finds_the_padding_and_only_a_long_one():
    assert zero_tail(memoryview(_block(MiB + 3))) == 3 * MiB - 3
    assert zero_tail(memoryview(_block(4 * MiB))) == 0  # no tail
    assert zero_tail(memoryview(_block(4 * MiB - ZERO_TAIL_MIN + 1))) == 0  # too short to bother
    assert zero_tail(memoryview(bytes(4 * MiB))) == 4 * MiB  # all zeros
    assert zero_tail(memoryview(bytes(1000))) == 0  # small payloads are sent as they are


@pytest.mark.parametrize("stored", [False, True], ids=["hashed", "stored-checksum"])
def test_a_padded_payload_crosses_without_its_tail_and_arrives_whole(stored):
    got = {}
    block = _block(MiB + 12345)
    reply_block = _block(2 * MiB + 7, seed=2)

    def handler(sender, req, payload):
        got["req"] = bytes(payload)
        return ppb.PeerReply(ack=ppb.Ack()), memoryview(reply_block), xxhash.xxh3_64_intdigest(reply_block)

    srv = PeerServer("tcp://127.0.0.1:0", "srv", None, None, handler).start()
    cli = PeerClient(f"tcp://127.0.0.1:{srv.port}", "cli", "srv", None, timeout_ms=5000)
    try:
        t0 = TRAFFIC.snapshot()
        xx = xxhash.xxh3_64_intdigest(block) if stored else None
        ((_rep, payload),) = cli.call_many([(_fetch(), memoryview(block), xx)] if stored
                                           else [(_fetch(), memoryview(block))])
        # The server counts a reply once its send returns, which may be after we got it.
        t1 = _wait(lambda: (lambda t: t if t["replies"] > t0["replies"] else None)(TRAFFIC.snapshot()))
        assert hashlib.sha256(got["req"]).digest() == hashlib.sha256(block).digest()
        assert bytes(payload) == reply_block
        sent_req = t1["request_bytes"] - t0["request_bytes"]
        sent_rep = t1["reply_bytes"] - t0["reply_bytes"]
        assert MiB + 12345 <= sent_req < MiB + 12345 + 4096, sent_req  # the real bytes and a header
        assert 2 * MiB + 7 <= sent_rep < 2 * MiB + 7 + 4096, sent_rep
        full = _block(4 * MiB, seed=3)  # no tail: sent whole
        t0 = TRAFFIC.snapshot()
        cli.call_many([(_fetch(), memoryview(full))])
        assert TRAFFIC.snapshot()["request_bytes"] - t0["request_bytes"] >= 4 * MiB
        assert got["req"] == full
    finally:
        cli.close()
        srv.stop()


def test_a_tail_that_breaks_the_payload_limit_or_its_checksum_is_refused():
    block = _block(MiB)
    fields, frame = payload_frame(memoryview(block))
    header = ppb.PeerFrameHeader()
    header.ParseFromString(fields)
    assert header.payload_zero_tail == 3 * MiB and frame.nbytes == MiB
    assert bytes(check_payload(header, frame, 4 * MiB)) == block
    with pytest.raises(PeerProtocolError, match="over the"):
        check_payload(header, frame, 4 * MiB - 1)
    header.payload_zero_tail += 1  # says one zero more than the length allows
    with pytest.raises(PeerProtocolError, match="header says"):
        check_payload(header, frame, 8 * MiB)


def test_a_server_refuses_a_tail_past_its_limit():
    srv = PeerServer("tcp://127.0.0.1:0", "srv", None, None,
                     lambda s, r, p: (ppb.PeerReply(ack=ppb.Ack()), None), max_payload_bytes=2 * MiB).start()
    cli = PeerClient(f"tcp://127.0.0.1:{srv.port}", "cli", "srv", None, timeout_ms=5000)
    try:
        with pytest.raises(RemoteError, match="over the"):  # 1 MiB frame + 3 MiB of zeros > 2 MiB
            cli.call_many([(_fetch(), memoryview(_block(MiB)))])
        assert srv.refused["malformed"] == 1
    finally:
        cli.close()
        srv.stop()
