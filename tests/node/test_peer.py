"""Peer-plane transport (snapshotd.node.peer): real ZeroMQ sockets on 127.0.0.1, port 0."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import numpy as np
import pytest
import xxhash
import zmq

from snapshotd.wire.errors import SnapshotdError
from snapshotd.node.peer import (
    MAGIC,
    PeerAuthError,
    PeerClient,
    PeerProtocolError,
    PeerServer,
    PeerUnavailableError,
    RemoteError,
)

KEY = b"k" * 32
MiB = 1 << 20


def echo(sender, header, payload):
    """Echo handler: returns the header (plus the sender) and the payload as received."""
    op = header.get("op")
    if op == "boom":
        raise ValueError("kaboom: " + header.get("why", ""))
    if op == "sleep":
        time.sleep(header["s"])
    reply = {k: v for k, v in header.items() if k not in ("len", "xxh3")}
    reply["sender"] = sender
    return reply, payload


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
    hdr, payload = cli.call({"op": "ping", "n": 7, "s": "é"})
    assert payload is None
    assert hdr == {"op": "ping", "n": 7, "s": "é", "sender": "cli"}
    assert srv.served == 1 and not srv.refused


@pytest.mark.parametrize("key", [None, KEY], ids=["nokey", "key"])
@pytest.mark.parametrize("size", [0, 1, 4 * MiB])
def test_echo_payload_bit_exact(make_server, make_client, key, size):
    srv = make_server(key=key)
    cli = make_client(srv, key=key)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    hdr, payload = cli.call({"op": "put"}, data)
    assert isinstance(payload, memoryview)
    assert payload.nbytes == size and bytes(payload) == data
    assert hdr["len"] == size and hdr["xxh3"] == xxhash.xxh3_64_intdigest(data)


def test_payload_types_are_sent_as_bytes(make_server, make_client):
    srv = make_server()
    cli = make_client(srv)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for obj in (bytearray(b"abc"), memoryview(b"xyz"), arr):
        _, payload = cli.call({}, obj)
        assert bytes(payload) == bytes(memoryview(obj).cast("B"))
    with pytest.raises(PeerProtocolError):
        cli.call({}, arr[:, ::2])  # not contiguous
    with pytest.raises(PeerProtocolError):
        cli.call({"x": object()})  # not JSON
    with pytest.raises(PeerProtocolError):
        cli.call({"x": "a" * (64 * 1024)})  # header too big
    assert cli.call({"ok": 1})[0]["ok"] == 1


def test_reply_memoryview_of_numpy_array(make_server, make_client):
    arr = np.random.default_rng(3).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB

    def handler(sender, header, payload):
        return {"shape": list(arr.shape)}, memoryview(arr)

    srv = make_server(handler)
    cli = make_client(srv)
    hdr, payload = cli.call({"op": "get"})
    got = np.frombuffer(payload, dtype=np.float32).reshape(hdr["shape"])
    assert np.array_equal(got, arr)
    assert got.tobytes() == arr.tobytes()


def test_call_many_order_and_window(make_server, make_client):
    def handler(sender, header, payload):
        return {"i": header["i"]}, payload

    srv = make_server(handler)
    cli = make_client(srv)
    reqs = [({"i": i}, bytes([i]) * (i * 1000)) for i in range(50)]
    replies = cli.call_many(reqs, window=8)
    assert [h["i"] for h, _ in replies] == list(range(50))
    for i, (_, p) in enumerate(replies):
        assert bytes(p) == bytes([i]) * (i * 1000)
    assert cli.call_many([], window=8) == []
    # bulk: 4 MiB blocks, distinct contents, window 8
    blocks = [np.full(4 * MiB, i, dtype=np.uint8) for i in range(12)]
    replies = cli.call_many([({"i": i}, b) for i, b in enumerate(blocks)], window=8)
    for i, (h, p) in enumerate(replies):
        assert h["i"] == i and np.array_equal(np.frombuffer(p, dtype=np.uint8), blocks[i])


def test_call_many_rejects_bad_window(make_server, make_client):
    cli = make_client(make_server())
    with pytest.raises(ValueError):
        cli.call_many([({}, None)], window=0)


# ------------------------------------------------------------------------ errors


def test_handler_exception_becomes_remote_error(make_server, make_client):
    srv = make_server()
    cli = make_client(srv)
    with pytest.raises(RemoteError) as ei:
        cli.call({"op": "boom", "why": "bad block"})
    e = ei.value
    assert isinstance(e, SnapshotdError)
    assert e.error_code == "INVALID_REQUEST" and e.message == "kaboom: bad block"
    assert "kaboom: bad block" in str(e) and e.peer_id == "srv"
    assert cli.call({"op": "ping"})[0]["op"] == "ping"  # server still serves
    assert srv.handler_errors == 1 and srv.served == 2
    assert cli.resets == 0  # nothing was left in flight: the connection is kept


def test_snapshotd_error_code_travels(make_server, make_client):
    from snapshotd.wire.errors import UnknownJobError

    def handler(sender, header, payload):
        raise UnknownJobError("job j1")

    cli = make_client(make_server(handler))
    with pytest.raises(RemoteError) as ei:
        cli.call_many([({}, None)] * 3)
    assert ei.value.error_code == "UNKNOWN_JOB" and ei.value.grpc_code_name == "NOT_FOUND"


def test_bad_handler_return_is_an_error_reply(make_server, make_client):
    def handler(sender, header, payload):
        if header.get("bad") == "shape":
            return "nope"
        if header.get("bad") == "json":
            return {"x": {1, 2}}, None
        return {"ok": True}, None

    cli = make_client(make_server(handler))
    with pytest.raises(RemoteError):
        cli.call({"bad": "shape"})
    with pytest.raises(RemoteError) as ei:
        cli.call({"bad": "json"})
    assert ei.value.error_code == "PEER_PROTOCOL"
    assert cli.call({})[0] == {"ok": True}


# ------------------------------------------------------------------------ auth


def test_wrong_key_is_refused(make_server, make_client):
    srv = make_server(key=KEY)
    bad = make_client(srv, key=b"x" * 32)
    with pytest.raises(PeerAuthError):  # reply is signed with a key the client lacks
        bad.call({"op": "ping"})
    assert srv.refused["auth"] == 1 and srv.served == 0
    nokey = make_client(srv, key=None)
    with pytest.raises(RemoteError) as ei:  # no key: the error reply is readable
        nokey.call({"op": "ping"}, b"data")
    assert ei.value.message == "unauthenticated" and ei.value.error_code == "PEER_AUTH"
    assert ei.value.grpc_code_name == "UNAUTHENTICATED"
    assert srv.refused["auth"] == 2 and srv.served == 0
    good = make_client(srv, key=KEY)
    assert good.call({"op": "ping"})[0]["op"] == "ping"


def test_client_with_key_rejects_unsigned_server(make_server, make_client):
    srv = make_server(key=None)
    cli = make_client(srv, key=KEY)
    with pytest.raises(PeerAuthError):
        cli.call({"op": "ping"})
    assert srv.served == 1  # the server (no key) accepted it; the reply was rejected


def test_client_rejects_unexpected_server_id(make_server, make_client):
    srv = make_server(node_id="impostor", key=KEY)
    cli = make_client(srv, peer_id="srv", key=KEY)
    with pytest.raises(PeerAuthError):
        cli.call({"op": "ping"})


def test_unknown_sender_is_refused(make_server, make_client):
    srv = make_server(key=KEY, allowed={"n1", "n2"})
    stranger = make_client(srv, node_id="n3", key=KEY)
    with pytest.raises(RemoteError) as ei:
        stranger.call({"op": "ping"})
    assert ei.value.error_code == "PEER_AUTH"
    assert srv.refused["unknown_peer"] == 1 and srv.served == 0
    friend = make_client(srv, node_id="n1", key=KEY)
    assert friend.call({"op": "ping"})[0]["sender"] == "n1"


# ------------------------------------------------------------------------ garbage


def _raw_dealer(port):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _hdr(d):
    return json.dumps(d).encode()


@pytest.mark.parametrize("key", [None, KEY], ids=["nokey", "key"])
def test_garbage_frames_do_not_stop_the_server(make_server, make_client, key):
    srv = make_server(key=key, max_payload_bytes=4096)
    raw = _raw_dealer(srv.port)

    def mac(sender, rid, header):
        return hmac.new(key, MAGIC + sender + rid + header, hashlib.sha256).digest() if key else b""

    rid = b"\0" * 8
    big = _hdr({"pad": "x" * (64 * 1024)})
    bad_json = b"{not json"
    good_hdr = _hdr({"len": 3, "xxh3": xxhash.xxh3_64_intdigest(b"abd")})
    over_hdr = _hdr({"len": 5000, "xxh3": 0})
    garbage = [
        [b"hello"],                                               # 1 frame
        [b"XXX", b"cli", rid, b"{}", b""],                         # bad magic
        [MAGIC, b"cli", b"short", b"{}", b""],                     # bad request id
        [MAGIC, b"cli", rid, b"{}", b"", b"p", b"extra"],           # too many frames
        [MAGIC, b"cli", rid, bad_json, mac(b"cli", rid, bad_json)],  # invalid JSON
        [MAGIC, b"cli", rid, b"[1]", mac(b"cli", rid, b"[1]")],    # JSON but not an object
        [MAGIC, b"cli", rid, big, mac(b"cli", rid, big)],           # header > 64 KiB
        [MAGIC, b"\xff\xfe", rid, b"{}", b""],                     # sender not UTF-8
        [MAGIC, b"cli", rid, good_hdr, mac(b"cli", rid, good_hdr), b"abc"],  # xxh3 mismatch
        [MAGIC, b"cli", rid, over_hdr, mac(b"cli", rid, over_hdr), b"z" * 5000],  # > max payload
        [MAGIC, b"cli", rid, b"{}", mac(b"cli", rid, b"{}"), b"nolen"],  # payload, no len
    ]
    for msg in garbage:
        raw.send_multipart(msg)
    n_expected = len(garbage)
    assert _wait_for(lambda: sum(srv.refused.values()) >= n_expected), dict(srv.refused)
    assert srv.refused["checksum"] == 1
    assert srv.refused["malformed"] == n_expected - 1
    assert srv.served == 0
    # A frame far over MAXMSGSIZE drops that connection only.
    raw.send_multipart([MAGIC, b"cli", rid, b"{}", b"", b"\0" * (1 << 20)])
    raw.close()
    cli = make_client(srv, key=key)
    for _ in range(3):
        assert bytes(cli.call({"op": "echo"}, b"fine")[1]) == b"fine"
    assert srv.served == 3


def test_too_big_payload_from_client_gets_error(make_server, make_client):
    srv = make_server(max_payload_bytes=1000)
    cli = make_client(srv)
    with pytest.raises(RemoteError) as ei:
        cli.call({}, b"x" * 2000)  # over the limit but under MAXMSGSIZE: error reply
    assert ei.value.error_code == "PEER_PROTOCOL"
    assert srv.refused["malformed"] == 1
    assert bytes(cli.call({}, b"x" * 1000)[1]) == b"x" * 1000


# ------------------------------------------------------------------------ timeouts


def test_timeout_then_next_call_gets_its_own_reply(make_server, make_client):
    srv = make_server()
    cli = make_client(srv, timeout_ms=300)
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailableError):
        cli.call({"op": "sleep", "s": 1.0, "tag": "old"})
    took = time.monotonic() - t0
    assert 0.25 <= took < 0.9, took
    assert cli.resets == 1
    # The server is still sleeping; this call must wait for its own reply, never "old".
    hdr, _ = cli.call({"op": "ping", "tag": "new"}, timeout_ms=3000)
    assert hdr["tag"] == "new"
    time.sleep(0.1)
    hdr, _ = cli.call({"op": "ping", "tag": "newer"})
    assert hdr["tag"] == "newer"
    assert srv.served == 3


def test_timeout_in_call_many_resets(make_server, make_client):
    srv = make_server()
    cli = make_client(srv, timeout_ms=250)
    reqs = [({"op": "ping", "i": i}, None) for i in range(4)] + [({"op": "sleep", "s": 0.6}, None)]
    with pytest.raises(PeerUnavailableError):
        cli.call_many(reqs, window=8)
    replies = cli.call_many([({"op": "ping", "i": i}, None) for i in range(5)], timeout_ms=3000)
    assert [h["i"] for h, _ in replies] == list(range(5))


def test_nothing_listening(make_client):
    with zmq.Context.instance().socket(zmq.ROUTER) as s:  # grab a free port, then free it
        port = s.bind_to_random_port("tcp://127.0.0.1")
    cli = PeerClient(f"tcp://127.0.0.1:{port}", "cli", "srv", None, timeout_ms=300)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailableError):
            cli.call({"op": "ping"})
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(PeerUnavailableError):
            cli.call_many([({"op": "ping"}, b"x" * 100)] * 3, timeout_ms=200)
    finally:
        cli.close()
    with pytest.raises(PeerUnavailableError):
        cli.call({"op": "ping"})  # closed


def test_server_restart_on_same_port(make_server, make_client):
    srv = make_server(key=KEY)
    port = srv.port
    cli = make_client(srv, key=KEY, timeout_ms=300)
    assert cli.call({"op": "ping"})[0]["op"] == "ping"
    srv.stop()
    with pytest.raises(PeerUnavailableError):
        cli.call({"op": "ping"})
    srv2 = PeerServer(f"tcp://127.0.0.1:{port}", "srv", KEY, None, echo).start()
    try:
        assert cli.call({"op": "ping"}, timeout_ms=3000)[0]["op"] == "ping"
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
                    replies = cli.call_many([({"t": t, "i": i, "j": j}, data) for j in range(4)], window=2)
                    assert [(h["t"], h["i"], h["j"]) for h, _ in replies] == [(t, i, j) for j in range(4)]
                    assert all(bytes(p) == data for _, p in replies)
                else:
                    hdr, p = cli.call({"t": t, "i": i}, data)
                    assert (hdr["t"], hdr["i"]) == (t, i) and bytes(p) == data
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
            assert c.call({"a": 1})[0]["a"] == 1


def test_mismatched_request_ids_are_discarded():
    """Defence in depth: a reply whose request id is not pending is dropped, not matched."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen = []

    def fake_server():
        ident, magic, sender, rid, header, mac = router.recv_multipart()
        seen.append((magic, sender, header, mac))
        stale = (int.from_bytes(rid, "big") ^ 1).to_bytes(8, "big")
        router.send_multipart([ident, MAGIC, b"srv", stale, b'{"who":"stale"}', b""])
        router.send_multipart([ident, MAGIC, b"srv", rid, b'{"who":"mine"}', b""])

    th = threading.Thread(target=fake_server)
    th.start()
    cli = PeerClient(f"tcp://127.0.0.1:{port}", "cli", "srv", None, timeout_ms=3000)
    try:
        hdr, payload = cli.call({"q": 1})
        assert hdr == {"who": "mine"} and payload is None and cli.discarded == 1
        assert seen == [(MAGIC, b"cli", b'{"q":1}', b"")]
    finally:
        th.join(5)
        cli.close()
        router.close()


def test_handler_gets_memoryview_of_frame(make_server, make_client):
    kinds = []

    def handler(sender, header, payload):
        kinds.append((type(payload), None if payload is None else bytes(payload)))
        return {}, None

    cli = make_client(make_server(handler))
    cli.call({}, b"abc")
    cli.call({})
    assert kinds == [(memoryview, b"abc"), (type(None), None)]


def test_call_many_on_reply_streams_in_order(make_server, make_client):
    def handler(sender, header, payload):
        return {"i": header["i"]}, bytes([header["i"]]) * 1000

    cli = make_client(make_server(handler))
    seen = []

    def on_reply(i, header, payload):
        seen.append(i)
        assert header["i"] == i and bytes(payload) == bytes([i]) * 1000
        return i * 10

    out = cli.call_many([({"i": i}, None) for i in range(30)], window=8, on_reply=on_reply)
    assert out == [i * 10 for i in range(30)] and seen == list(range(30))

    def failing(i, header, payload):
        if i == 3:
            raise KeyError("consumer failed")

    with pytest.raises(KeyError):
        cli.call_many([({"i": i}, None) for i in range(30)], window=8, on_reply=failing)
    assert cli.resets == 1
    assert [h["i"] for h, _ in cli.call_many([({"i": i}, None) for i in range(5)])] == list(range(5))
