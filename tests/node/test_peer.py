"""Peer-plane transport (snapshotd.node.peer): real ZeroMQ sockets on 127.0.0.1, port 0,
the protobuf frame header (proto/peer.proto) and the checks on peer messages (checks.py)."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

import numpy as np
import pytest
import xxhash
import zmq

from snapshotd.wire._proto import peer_pb2 as ppb
from snapshotd.wire.errors import SnapshotdError
from snapshotd.node.peer import (
    MAGIC,
    PeerAuthError,
    PeerClient,
    PeerProtocolError,
    PeerServer,
    PeerUnavailableError,
    RemoteError,
    checks,
)
from snapshotd.node.peer.framing import decode_header, encode_body, payload_fields

KEY = b"k" * 32
MiB = 1 << 20
GATE = threading.Event()


def echo(sender, req, payload):
    """Echo handler. ``ping`` answers its ``committed_versions`` plus ``"sender:<id>": 1``;
    ``round`` answers ``record_bytes=version``; ``jobs`` no jobs; every other op acks; all
    echo the payload. A ``job`` of ``"boom:<why>"`` raises ValueError("kaboom: <why>"); a
    ``job`` of ``"sleep"`` sleeps ``version`` ms first; ``"gate"`` waits for ``GATE``."""
    op = req.WhichOneof("op")
    msg = getattr(req, op)
    job = msg.job if "job" in msg.DESCRIPTOR.fields_by_name else ""
    if job.startswith("boom:"):
        raise ValueError("kaboom: " + job[5:])
    if job == "sleep":
        time.sleep(msg.version / 1000)
    if job == "gate":  # held until the test opens GATE: a reply that cannot exist before then
        GATE.wait(30)
    if op == "ping":
        committed = {**msg.committed_versions, "sender:" + sender: 1}
        return ppb.PeerReply(ping=ppb.PingReply(committed_versions=committed)), payload
    if op == "round":
        return ppb.PeerReply(round=ppb.RoundReply(record_bytes=msg.version)), payload
    if op == "jobs":
        return ppb.PeerReply(jobs=ppb.JobsReply()), payload
    return ack(), payload


def ack() -> ppb.PeerReply:
    return ppb.PeerReply(ack=ppb.Ack())


def ping(tag: str = "t", n: int = 0) -> ppb.PeerRequest:
    return ppb.PeerRequest(ping=ppb.PingRequest(committed_versions={tag: n}))


def rnd(v: int, job: str = "j") -> ppb.PeerRequest:
    return ppb.PeerRequest(round=ppb.RoundRequest(job=job, version=v))


def fetch(j: int = 0) -> ppb.PeerRequest:
    return ppb.PeerRequest(fetch=ppb.FetchRequest(job="j", version=1, kind=ppb.BLOCK_KIND_DATA, block_index=j))


def fence(job: str) -> ppb.PeerRequest:
    return ppb.PeerRequest(fence=ppb.FenceRequest(job=job))


def jobs() -> ppb.PeerRequest:
    return ppb.PeerRequest(jobs=ppb.JobsRequest())


def form(reply: ppb.PeerReply) -> str:
    return reply.WhichOneof("body")


def tags(reply) -> dict:
    return dict(reply[0].ping.committed_versions)


def size(reply) -> int:
    return reply[0].round.record_bytes


@pytest.fixture
def make_server():
    servers = []

    def make(handler=echo, node_id="srv", key=None, allowed=None, **kw):
        s = PeerServer("tcp://127.0.0.1:0", node_id, key, allowed, handler, **kw).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def make_client():
    clients = []

    def make(server, node_id="cli", peer_id=None, key=None, timeout_ms=3000, **kw):
        c = PeerClient(f"tcp://127.0.0.1:{server.port}", node_id, peer_id or server.node_id, key,
                       timeout_ms=timeout_ms, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def _wait_for(pred, timeout=2.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("key", [None, KEY], ids=["nokey", "key"])
def test_echo_without_payload(make_server, make_client, key):
    srv = make_server(key=key)
    cli = make_client(srv, key=key)
    rep, payload = cli.call(ppb.PeerRequest(ping=ppb.PingRequest(committed_versions={"é": 7, "b": 0})))
    assert payload is None
    assert dict(rep.ping.committed_versions) == {"é": 7, "b": 0, "sender:cli": 1}
    assert srv.served == 1 and not srv.refused


@pytest.mark.parametrize("key", [None, KEY], ids=["nokey", "key"])
@pytest.mark.parametrize("size", [0, 1, 4 * MiB])
def test_echo_payload_bit_exact(make_server, make_client, key, size):
    srv = make_server(key=key)
    cli = make_client(srv, key=key)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    rep, payload = cli.call(fetch(), data)
    assert isinstance(payload, memoryview)
    assert payload.nbytes == size and bytes(payload) == data
    assert form(rep) == "ack"


def test_payload_types_are_sent_as_bytes(make_server, make_client):
    srv = make_server()
    cli = make_client(srv)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for obj in (bytearray(b"abc"), memoryview(b"xyz"), arr):
        _, payload = cli.call(fetch(), obj)
        assert bytes(payload) == bytes(memoryview(obj).cast("B"))
    with pytest.raises(PeerProtocolError):
        cli.call(fetch(), arr[:, ::2])  # not contiguous
    with pytest.raises(PeerProtocolError):
        cli.call(fence("a" * (64 * 1024)))  # header too big
    assert srv.served == 3  # refused before anything was sent
    assert form(cli.call(fence("ok"))[0]) == "ack"


def _req(op: str, **fields) -> ppb.PeerRequest:
    req = ppb.PeerRequest()
    getattr(req, op).SetInParent()
    for name, value in fields.items():
        setattr(getattr(req, op), name, value)
    return req


@pytest.mark.parametrize("bad", [
    (ppb.PeerRequest(), None, None),                                        # no op
    ("not a request", None, None), (ppb.PeerReply(ack=ppb.Ack()), None, None),
    (_req("fetch", job="j", version=1), None, None),                        # no kind
    (_req("fetch", job="j", version=1, kind=ppb.BLOCK_KIND_DATA), None, None),  # no block_index
    (_req("fetch", job="j", version=1, kind=ppb.BLOCK_KIND_PARITY, stripe=1), None, None),  # no row
    (_req("suspect", job="j", version=1, kind=7, block_index=0), None, None),  # kind out of the enum
    (_req("round", job="j", version=-1), None, None),                       # negative version
    (_req("round", job="j"), None, None), (_req("fence"), None, None),      # required fields missing
    (_req("contrib", job="j", version=1, stripe=0, row=0), None, None),
    (_req("rank_block", job="j", version=1, rank=0), None, None),
    (fetch(), b"p", -1), (fetch(), b"p", "x"), (fetch(), b"p", 1 << 64),    # payload_xxh3 out of range
])
def test_requests_outside_the_schema_are_refused_before_sending(make_server, make_client, bad):
    srv = make_server()
    cli = make_client(srv)
    with pytest.raises(PeerProtocolError):
        cli.call(*bad)
    assert tags(cli.call(ping())) == {"t": 0, "sender:cli": 1}
    assert srv.served == 1 and not srv.refused


def test_reply_memoryview_of_numpy_array(make_server, make_client):
    arr = np.random.default_rng(3).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB

    def handler(sender, req, payload):
        return ppb.PeerReply(round=ppb.RoundReply(record_bytes=arr.nbytes)), memoryview(arr)

    srv = make_server(handler)
    cli = make_client(srv)
    rep, payload = cli.call(rnd(1))
    got = np.frombuffer(payload, dtype=np.float32).reshape(arr.shape)
    assert rep.round.record_bytes == arr.nbytes and np.array_equal(got, arr)
    assert got.tobytes() == arr.tobytes()


def test_call_many_order_and_window(make_server, make_client):
    srv = make_server()
    cli = make_client(srv)
    reqs = [(rnd(i), bytes([i]) * (i * 1000)) for i in range(50)]
    replies = cli.call_many(reqs, window=8)
    assert [size(r) for r in replies] == list(range(50))
    for i, (_, p) in enumerate(replies):
        assert bytes(p) == bytes([i]) * (i * 1000)
    assert cli.call_many([], window=8) == []
    # bulk: 4 MiB blocks, distinct contents, window 8
    blocks = [np.full(4 * MiB, i, dtype=np.uint8) for i in range(12)]
    replies = cli.call_many([(rnd(i), b) for i, b in enumerate(blocks)], window=8)
    for i, (h, p) in enumerate(replies):
        assert h.round.record_bytes == i and np.array_equal(np.frombuffer(p, dtype=np.uint8), blocks[i])


def test_call_many_rejects_bad_window(make_server, make_client):
    cli = make_client(make_server())
    with pytest.raises(ValueError):
        cli.call_many([(ping(), None)], window=0)


# ------------------------------------------------------------------------ the checks


SAMPLES = {
    "announce": ppb.AnnounceRequest(job="j", version=3, node="n1", block_count=9, ranks=[0, 1],
                                    manifest_sizes_bytes=[10, 20]),
    "contrib": ppb.ContribRequest(job="j", version=3, stripe=4, row=1, position=2, block_counts=[9, 9, 0]),
    "vote": ppb.VoteRequest(job="j", version=3, ranks=[5]),
    "ping": ppb.PingRequest(committed_versions={"j": 2, "k": 0}),
    "round": ppb.RoundRequest(job="j", version=3),
    "fetch": ppb.FetchRequest(job="j", version=3, kind=ppb.BLOCK_KIND_PARITY, stripe=1, row=0),
    "jobs": ppb.JobsRequest(),
    "suspect": ppb.SuspectRequest(job="j", version=3, kind=ppb.BLOCK_KIND_DATA, block_index=7),
    "fence": ppb.FenceRequest(job="j"),
    "rank_manifest": ppb.RankManifestRequest(job="j", version=3, rank=4),
    "rank_block": ppb.RankBlockRequest(job="j", version=3, rank=4, block_index=0),
}


def test_the_checks_know_every_op_of_the_schema_and_its_required_fields():
    schema_ops = {f.name for f in ppb.PeerRequest.DESCRIPTOR.oneofs_by_name["op"].fields}
    assert set(checks.REQUIRED) == set(checks.REPLY_OF) == set(SAMPLES) == schema_ops
    replies = {f.name for f in ppb.PeerReply.DESCRIPTOR.oneofs_by_name["body"].fields}
    assert set(checks.REPLY_OF.values()) == replies
    for op, msg in SAMPLES.items():
        req = ppb.PeerRequest(**{op: msg})
        wire = ppb.PeerRequest.FromString(req.SerializeToString())
        assert checks.check_request(wire) == op and wire == req
        for name in checks.REQUIRED[op] + checks.BLOCK_AT.get(getattr(msg, "kind", None), ()):
            lacking = ppb.PeerRequest()
            lacking.CopyFrom(req)
            getattr(lacking, op).ClearField(name)
            with pytest.raises(PeerProtocolError, match=f"lacks {name}"):
                checks.check_request(lacking)
    checks.check_reply("jobs", ppb.PeerReply(jobs=ppb.JobsReply()))
    checks.check_reply("fetch", ack())
    for op, bad in (("fetch", ppb.PeerReply()), ("round", ack()), ("fence", ppb.PeerReply(jobs={})), ("ping", {})):
        with pytest.raises(PeerProtocolError):
            checks.check_reply(op, bad)


def test_payload_xxh3_and_on_reply_with_messages(make_server, make_client):
    def handler(sender, req, payload):
        assert isinstance(req, ppb.PeerRequest)
        if req.WhichOneof("op") == "round":
            return ppb.PeerReply(round=ppb.RoundReply(record_bytes=req.round.version)), payload
        body = bytes(payload)
        return ack(), body, xxhash.xxh3_64_intdigest(body)

    srv = make_server(handler=handler)
    cli = make_client(srv)
    rep, payload = cli.call(rnd(5))
    assert rep.round.record_bytes == 5 and payload is None
    data = b"block" * 100
    rep, payload = cli.call(fetch(), data, payload_xxh3=xxhash.xxh3_64_intdigest(data))
    assert form(rep) == "ack" and bytes(payload) == data
    seen = []
    out = cli.call_many([(rnd(i), None) for i in range(10)],
                        on_reply=lambda i, r, p: seen.append(r.round.record_bytes) or i)
    assert out == list(range(10)) and seen == list(range(10))
    with pytest.raises(ValueError):
        PeerServer("tcp://127.0.0.1:0", "x", None, None, None)  # no handler at all


def test_known_xxh3_is_sent_and_verified(make_server, make_client):
    srv = make_server()
    cli = make_client(srv)
    data = b"stored block"
    known = xxhash.xxh3_64_intdigest(data)
    assert bytes(cli.call(fetch(), data, known)[1]) == data
    assert bytes(cli.call(fetch(), data, np.uint64(known))[1]) == data
    with pytest.raises(RemoteError) as ei:  # a stored checksum that does not match: at rest
        cli.call(fetch(), data, 12345)
    assert ei.value.error_code == "PEER_PROTOCOL" and "xxh3 mismatch" in str(ei.value)
    assert "stored checksum" in str(ei.value) and srv.refused["checksum"] == 1

    def lying(sender, req, payload):
        return ack(), b"rotten", 1

    liar = make_client(make_server(lying))
    with pytest.raises(PeerProtocolError, match="xxh3 mismatch"):
        liar.call(fetch())
    assert liar.checksum_failures == 1


def test_frame_header_carries_payload_fields():
    body = encode_body("request", fetch(), True)
    raw = body + payload_fields(memoryview(b"abc"))
    h = decode_header(raw)
    assert h.payload_bytes == 3 and h.payload_xxh3 == xxhash.xxh3_64_intdigest(b"abc")
    assert not h.payload_xxh3_stored and h.request == fetch()
    h = decode_header(body + payload_fields(memoryview(b"abc"), stored_xxh3=7))
    assert h.payload_xxh3 == 7 and h.payload_xxh3_stored
    assert not decode_header(encode_body("request", ping(), False)).HasField(
        "payload_bytes")


# ------------------------------------------------------------------------ errors


def test_handler_exception_becomes_remote_error(make_server, make_client):
    srv = make_server()
    cli = make_client(srv)
    with pytest.raises(RemoteError) as ei:
        cli.call(fence("boom:bad block"))
    e = ei.value
    assert isinstance(e, SnapshotdError)
    assert e.error_code == "INVALID_REQUEST" and e.message == "kaboom: bad block"
    assert "kaboom: bad block" in str(e) and e.peer_id == "srv"
    assert tags(cli.call(ping("x"))) == {"x": 0, "sender:cli": 1}  # server still serves
    assert srv.handler_errors == 1 and srv.served == 2
    assert cli.resets == 0  # nothing was left in flight: the connection is kept


def test_snapshotd_error_code_travels(make_server, make_client):
    from snapshotd.wire.errors import UnknownJobError

    def handler(sender, req, payload):
        raise UnknownJobError("job j1")

    cli = make_client(make_server(handler))
    with pytest.raises(RemoteError) as ei:
        cli.call_many([(ping(), None)] * 3)
    assert ei.value.error_code == "UNKNOWN_JOB" and ei.value.grpc_code_name == "NOT_FOUND"


def test_bad_handler_return_is_an_error_reply(make_server, make_client):
    def handler(sender, req, payload):
        job = req.fence.job
        if job == "shape":
            return "nope"
        if job == "dict":
            return {"ok": True}, None  # not a PeerReply
        if job == "form":
            return ppb.PeerReply(round=ppb.RoundReply(record_bytes=1)), None  # not what fence answers
        if job == "empty":
            return ppb.PeerReply(), None
        return ack(), None

    cli = make_client(make_server(handler))
    with pytest.raises(RemoteError):
        cli.call(fence("shape"))
    for job in ("dict", "form", "empty"):
        with pytest.raises(RemoteError) as ei:
            cli.call(fence(job))
        assert ei.value.error_code == "PEER_PROTOCOL"
    assert form(cli.call(fence("fine"))[0]) == "ack"


def test_a_reply_of_the_wrong_form_is_refused_by_the_client():
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def fake_server():  # answers a round with an Ack
        ident, magic, sender, rid, header, mac = router.recv_multipart()
        router.send_multipart([ident, MAGIC, b"srv", rid, ppb.PeerFrameHeader(reply=ack()).SerializeToString(), b""])

    th = threading.Thread(target=fake_server)
    th.start()
    cli = PeerClient(f"tcp://127.0.0.1:{port}", "cli", "srv", None, timeout_ms=3000)
    try:
        with pytest.raises(PeerProtocolError, match="must be 'round'"):
            cli.call(rnd(1))
    finally:
        th.join(5)
        cli.close()
        router.close()


# ------------------------------------------------------------------------ auth


def test_wrong_key_is_refused(make_server, make_client):
    srv = make_server(key=KEY)
    bad = make_client(srv, key=b"x" * 32)
    with pytest.raises(PeerAuthError):  # reply is signed with a key the client lacks
        bad.call(ping())
    assert srv.refused["auth"] == 1 and srv.served == 0
    nokey = make_client(srv, key=None)
    with pytest.raises(RemoteError) as ei:  # no key: the error reply is readable
        nokey.call(fetch(), b"data")
    assert ei.value.message == "unauthenticated" and ei.value.error_code == "PEER_AUTH"
    assert ei.value.grpc_code_name == "UNAUTHENTICATED"
    assert srv.refused["auth"] == 2 and srv.served == 0
    good = make_client(srv, key=KEY)
    assert tags(good.call(ping())) == {"t": 0, "sender:cli": 1}


def test_client_with_key_rejects_unsigned_server(make_server, make_client):
    srv = make_server(key=None)
    cli = make_client(srv, key=KEY)
    with pytest.raises(PeerAuthError):
        cli.call(ping())
    assert srv.served == 1  # the server (no key) accepted it; the reply was rejected


def test_client_rejects_unexpected_server_id(make_server, make_client):
    srv = make_server(node_id="impostor", key=KEY)
    cli = make_client(srv, peer_id="srv", key=KEY)
    with pytest.raises(PeerAuthError):
        cli.call(ping())


def test_unknown_sender_is_refused(make_server, make_client):
    srv = make_server(key=KEY, allowed={"n1", "n2"})
    stranger = make_client(srv, node_id="n3", key=KEY)
    with pytest.raises(RemoteError) as ei:
        stranger.call(ping())
    assert ei.value.error_code == "PEER_AUTH"
    assert srv.refused["unknown_peer"] == 1 and srv.served == 0
    friend = make_client(srv, node_id="n1", key=KEY)
    assert "sender:n1" in tags(friend.call(ping()))


# ------------------------------------------------------------------------ garbage


def _raw_dealer(port):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _hdr(request=None, **fields) -> bytes:
    """A PeerFrameHeader built by hand: ``request`` a PeerRequest, plus frame header fields."""
    h = ppb.PeerFrameHeader(**fields)
    if request is not None:
        h.request.CopyFrom(request)
    return h.SerializeToString()


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


@pytest.mark.parametrize("key", [None, KEY], ids=["nokey", "key"])
def test_garbage_frames_do_not_stop_the_server(make_server, make_client, key):
    srv = make_server(key=key, max_payload_bytes=4096)
    raw = _raw_dealer(srv.port)

    def mac(sender, rid, header):
        return hmac.new(key, MAGIC + sender + rid + header, hashlib.sha256).digest() if key else b""

    def signed(header, *payload):
        return [MAGIC, b"cli", rid, header, mac(b"cli", rid, header), *payload]

    rid = b"\0" * 8
    ok = _hdr(ping())
    big = _hdr(fence("x" * (64 * 1024)))
    no_kind = _hdr(_req("fetch", job="j", version=1))
    negative = _hdr(_req("round", job="j", version=-5))
    unknown_op = b"\x22" + _varint(4) + _varint((99 << 3) | 2) + b"\x01\x00"  # request.<field 99>
    bad_kind = b"\x22\x04\x32\x02\x18\x07"  # request.fetch.kind = 7
    reply = ppb.PeerFrameHeader(reply=ppb.PeerReply(ack=ppb.Ack())).SerializeToString()
    no_op = ppb.PeerFrameHeader(request=ppb.PeerRequest()).SerializeToString()
    deep = b"\x7b" * 30000 + b"\x7c" * 30000  # groups nested 30000 deep
    good_hdr = _hdr(fetch(), payload_bytes=3, payload_xxh3=xxhash.xxh3_64_intdigest(b"abd"))
    over_hdr = _hdr(fetch(), payload_bytes=5000, payload_xxh3=0)
    garbage = [
        [b"hello"],                                                # 1 frame
        [b"XXX", b"cli", rid, ok, b""],                            # bad magic
        [b"SD1", b"cli", rid, b'{"op":"jobs"}', b""],              # the old JSON framing
        [MAGIC, b"cli", b"short", ok, b""],                        # bad request id
        [MAGIC, b"cli", rid, ok, b"", b"p", b"extra"],             # too many frames
        signed(b"\xff\xff\xff"),                                   # not protobuf
        signed(b"\x20\x01"),                                       # request field, wrong wire type
        signed(b"\x78\x01"),                                       # unknown header field
        signed(unknown_op),                                        # an op this node lacks
        signed(no_op),                                             # a request without an op
        signed(b""),                                               # no body at all
        signed(reply),                                             # a reply, not a request
        signed(bad_kind),                                          # enum value out of the schema
        signed(no_kind),                                           # a required field missing
        signed(negative),                                          # a negative version
        signed(deep),                                              # nesting bomb
        signed(big),                                               # header > 64 KiB
        [MAGIC, b"\xff\xfe", rid, ok, b""],                        # sender not UTF-8
        signed(good_hdr, b"abc"),                                  # xxh3 mismatch
        signed(over_hdr, b"z" * 5000),                             # > max payload
        signed(ok, b"nolen"),                                      # payload, no length/xxh3
    ]
    for msg in garbage:
        raw.send_multipart(msg)
    n_expected = len(garbage)
    assert _wait_for(lambda: sum(srv.refused.values()) >= n_expected), dict(srv.refused)
    assert srv.refused["checksum"] == 1
    assert srv.refused["malformed"] == n_expected - 1
    assert srv.served == 0
    # A frame far over MAXMSGSIZE drops that connection only.
    raw.send_multipart([MAGIC, b"cli", rid, ok, b"", b"\0" * (1 << 20)])
    raw.close()
    cli = make_client(srv, key=key)
    for _ in range(3):
        assert bytes(cli.call(fetch(), b"fine")[1]) == b"fine"
    assert srv.served == 3


def test_refusals_are_answered_with_a_code(make_server):
    srv = make_server(key=KEY)
    raw = _raw_dealer(srv.port)
    try:
        rid = b"\1" * 8
        header = _hdr(jobs(), payload_bytes=1 << 40, payload_xxh3=0)
        raw.send_multipart([MAGIC, b"cli", rid, header,
                            hmac.new(KEY, MAGIC + b"cli" + rid + header, hashlib.sha256).digest(), b"abcd"])
        assert raw.poll(3000)
        magic, sender, rrid, reply, mac = raw.recv_multipart()
        assert (magic, sender, rrid) == (MAGIC, b"srv", rid)
        err = decode_header(reply).error
        assert err.code == "PEER_PROTOCOL" and "header says" in err.message
    finally:
        raw.close()


def test_too_big_payload_from_client_gets_error(make_server, make_client):
    srv = make_server(max_payload_bytes=1000)
    cli = make_client(srv)
    with pytest.raises(RemoteError) as ei:
        cli.call(fetch(), b"x" * 2000)  # over the limit but under MAXMSGSIZE: error reply
    assert ei.value.error_code == "PEER_PROTOCOL"
    assert srv.refused["malformed"] == 1
    assert bytes(cli.call(fetch(), b"x" * 1000)[1]) == b"x" * 1000


# ------------------------------------------------------------------------ timeouts


def test_timeout_then_next_call_gets_its_own_reply(make_server, make_client):
    srv = make_server()
    cli = make_client(srv, timeout_ms=300)
    GATE.clear()
    t0 = time.monotonic()
    try:
        with pytest.raises(PeerUnavailableError):
            cli.call(rnd(1000, job="gate"))  # its reply cannot exist until GATE opens
        assert time.monotonic() - t0 >= 0.3  # a timeout never fires early
        assert cli.resets == 1
    finally:
        GATE.set()
    # The server answers the old request first; this call must get its own reply, never
    # the old one (which arrives on the reset socket first, or not at all).
    assert tags(cli.call(ping("new"), timeout_ms=10000)) == {"new": 0, "sender:cli": 1}
    assert tags(cli.call(ping("newer"))) == {"newer": 0, "sender:cli": 1}
    assert srv.served == 3


def test_timeout_in_call_many_resets(make_server, make_client):
    srv = make_server()
    cli = make_client(srv, timeout_ms=250)
    reqs = [(rnd(i), None) for i in range(4)] + [(rnd(600, job="sleep"), None)]
    with pytest.raises(PeerUnavailableError):
        cli.call_many(reqs, window=8)
    replies = cli.call_many([(rnd(i), None) for i in range(5)], timeout_ms=3000)
    assert [size(r) for r in replies] == list(range(5))


def test_nothing_listening(make_client):
    with zmq.Context.instance().socket(zmq.ROUTER) as s:  # grab a free port, then free it
        port = s.bind_to_random_port("tcp://127.0.0.1")
    cli = PeerClient(f"tcp://127.0.0.1:{port}", "cli", "srv", None, timeout_ms=300)
    try:
        with pytest.raises(PeerUnavailableError):
            cli.call(ping())  # gives up after its timeout (the suite's timeout catches a hang)
        assert cli.resets == 1
        with pytest.raises(PeerUnavailableError):
            cli.call_many([(fetch(), b"x" * 100)] * 3, timeout_ms=200)
    finally:
        cli.close()
    with pytest.raises(PeerUnavailableError):
        cli.call(ping())  # closed


def test_server_restart_on_same_port(make_server, make_client):
    srv = make_server(key=KEY)
    port = srv.port
    cli = make_client(srv, key=KEY, timeout_ms=300)
    assert "t" in tags(cli.call(ping()))
    srv.stop()
    with pytest.raises(PeerUnavailableError):
        cli.call(ping())
    srv2 = PeerServer(f"tcp://127.0.0.1:{port}", "srv", KEY, None, echo).start()
    try:
        assert "t" in tags(cli.call(ping(), timeout_ms=3000))
    finally:
        srv2.stop()


# ------------------------------------------------------------------------ concurrency


def test_threads_share_one_client(make_server, make_client):
    srv = make_server(key=KEY)
    cli = make_client(srv, key=KEY)
    errors = []

    def worker(t):
        try:
            for i in range(25):
                data = bytes([t, i]) * (1000 + 97 * i)
                if i % 5 == 0:
                    vs = [t * 10000 + i * 10 + j for j in range(4)]
                    replies = cli.call_many([(rnd(v), data) for v in vs], window=2)
                    assert [size(r) for r in replies] == vs
                    assert all(bytes(p) == data for _, p in replies)
                else:
                    rep, p = cli.call(rnd(t * 10000 + i * 10), data)
                    assert rep.round.record_bytes == t * 10000 + i * 10 and bytes(p) == data
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors, errors
    assert srv.served == 4 * (20 + 5 * 4)


def test_server_lifecycle():
    srv = PeerServer("tcp://127.0.0.1:0", "srv", None, None, echo)
    assert srv.port and srv.endpoint.startswith("tcp://127.0.0.1:")
    srv.stop()  # never started: closes the socket
    srv.stop()
    with pytest.raises(RuntimeError):
        srv.start()
    with PeerServer("tcp://*:0", "srv", None, None, echo) as s2:
        assert s2.port
        with PeerClient(f"tcp://127.0.0.1:{s2.port}", "c", "srv", None) as c:
            rep = c.call(jobs())[0]
            assert form(rep) == "jobs" and not rep.jobs.jobs


def test_mismatched_request_ids_are_discarded():
    """Defence in depth: a reply whose request id is not pending is dropped, not matched."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen = []

    def reply(size):
        return ppb.PeerFrameHeader(reply=ppb.PeerReply(round=ppb.RoundReply(record_bytes=size))).SerializeToString()

    def fake_server():
        ident, magic, sender, rid, header, mac = router.recv_multipart()
        seen.append((magic, sender, header, mac))
        stale = (int.from_bytes(rid, "big") ^ 1).to_bytes(8, "big")
        router.send_multipart([ident, MAGIC, b"srv", stale, reply(1), b""])
        router.send_multipart([ident, MAGIC, b"srv", rid, reply(2), b""])

    th = threading.Thread(target=fake_server)
    th.start()
    cli = PeerClient(f"tcp://127.0.0.1:{port}", "cli", "srv", None, timeout_ms=3000)
    try:
        rep, payload = cli.call(rnd(1, job="q"))
        assert rep.round.record_bytes == 2 and payload is None and cli.discarded == 1
        assert seen == [(MAGIC, b"cli", _hdr(rnd(1, job="q")), b"")]
    finally:
        th.join(5)
        cli.close()
        router.close()


def test_handler_gets_memoryview_of_frame(make_server, make_client):
    kinds = []

    def handler(sender, req, payload):
        kinds.append((type(payload), None if payload is None else bytes(payload)))
        return ack(), None

    cli = make_client(make_server(handler))
    cli.call(fetch(), b"abc")
    cli.call(fetch())
    assert kinds == [(memoryview, b"abc"), (type(None), None)]


def test_call_many_on_reply_streams_in_order(make_server, make_client):
    def handler(sender, req, payload):
        v = req.round.version
        return ppb.PeerReply(round=ppb.RoundReply(record_bytes=v)), bytes([v]) * 1000

    cli = make_client(make_server(handler))
    seen = []

    def on_reply(i, reply, payload):
        seen.append(i)
        assert reply.round.record_bytes == i and bytes(payload) == bytes([i]) * 1000
        return i * 10

    out = cli.call_many([(rnd(i), None) for i in range(30)], window=8, on_reply=on_reply)
    assert out == [i * 10 for i in range(30)] and seen == list(range(30))

    def failing(i, reply, payload):
        if i == 3:
            raise KeyError("consumer failed")

    with pytest.raises(KeyError):
        cli.call_many([(rnd(i), None) for i in range(30)], window=8, on_reply=failing)
    assert cli.resets == 1
    assert [size(r) for r in cli.call_many([(rnd(i), None) for i in range(5)])] == list(range(5))


def test_a_failure_forwarding_a_bulk_reply_does_not_end_the_serving_loop(make_server, make_client,
                                                                          monkeypatch):
    """The serving thread sends the bulk thread's replies. An exception there once ended
    the loop (a bug in the traffic counter did, in a daemon started from a half-edited
    tree): the daemon kept serving gRPC while its peers could no longer reach it. Now that
    failure is counted as internal, and the server goes on answering."""
    from snapshotd.node.peer import server as server_mod

    srv = make_server(inline_ops={"ping"})
    cli = make_client(srv, timeout_ms=1000)
    real, calls = server_mod.TRAFFIC.count, []

    def count_once_broken(kind, n):
        calls.append(kind)
        if kind == "reply" and calls.count("reply") == 1:
            raise KeyError("broken once")
        return real(kind, n)

    monkeypatch.setattr(server_mod.TRAFFIC, "count", count_once_broken)
    cli.call(fetch(), b"x" * 10)  # a bulk op (not inline): sent, then its count raised
    assert _wait_for(lambda: srv.refused["internal"] >= 1)
    rep, payload = cli.call(fetch(), b"y" * 10)  # the loop still serves the bulk ops ...
    assert bytes(payload) == b"y" * 10
    rep, _ = cli.call(ppb.PeerRequest(ping=ppb.PingRequest()))  # ... and the pings
