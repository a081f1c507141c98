"""Request bodies that are not the method's protobuf message, against real daemons.

grpc's own deserializer would answer INTERNAL ("Exception deserializing request!")
before any of our code runs; the daemon's RequestParseGuard answers INVALID_ARGUMENT
naming the method and the message type, logs and counts the refusal (Stats and
``snapshotd_requests_refused_total{reason="INVALID_ARGUMENT"}``) and keeps serving.
An empty body is a valid (empty) message: it must reach our own validation. Truncated
HTTP/2 and gRPC frames are grpc core's to answer; the daemon must survive them.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import urllib.request
from concurrent import futures

import grpc
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.manifest import block_checksums
from snapshotd.node.server import RequestParseGuard

C = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["Snapshotd"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
TRUNCATED_FIELD = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length of 2^32-1, then nothing
JUNK = random.Random(7).randbytes(257)
BS = 4096


# -- helpers ----------------------------------------------------------------------------
def methods():
    """(path, input message descriptor, client streaming, server streaming) of every
    method of both services the daemon serves (new methods are covered automatically)."""
    for svc in (SERVICE, HEALTH):
        for m in svc.methods:
            yield f"/{svc.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming


def call_raw(ch, path, client_streaming, server_streaming, bodies, metadata=None):
    """Send raw bytes (no serializer) and return (code, details)."""
    if client_streaming:
        stub = (ch.stream_stream if server_streaming else ch.stream_unary)(path)
        arg = iter(bodies)
    else:
        stub = (ch.unary_stream if server_streaming else ch.unary_unary)(path)
        (arg,) = bodies
    try:
        out = stub(arg, timeout=10, metadata=metadata)
        if server_streaming:
            list(out)  # (never called with a good request for health Watch: it never ends)
        return C.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def refused_metric(port: int, reason: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "snapshotd_requests_refused_total" and s.labels.get("reason") == reason:
                return s.value
    return 0.0


def malformed_re(path: str, type_name: str, nbytes: int) -> str:
    return (rf"^malformed request for {re.escape(path)}: cannot parse as "
            rf"{re.escape(type_name)} \({nbytes} bytes; .+\)$")


def manifest(job, rank, version, data):
    n = len(data)
    m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=n,
                         block_size_bytes=BS, checksum_algo="xxh3_64", meta_json="{}",
                         tensors=[pb.TensorEntry(name="b", dtype="uint8", shape=[n], nbytes=n)])
    m.block_checksums.extend(block_checksums(data, n, BS))
    return m


@pytest.fixture
def mdaemon(daemon_factory):
    return daemon_factory(extra_args=["--metrics-addr", "127.0.0.1:0"]).start()


# -- tests ----------------------------------------------------------------------------
def test_junk_bodies_are_invalid_argument_counted_and_logged(mdaemon):
    d, port = mdaemon, mdaemon.info["metrics_port"]
    cl = d.client()
    before_stats = cl.stats().requests_refused
    before_metric = refused_metric(port, "INVALID_ARGUMENT")
    sent = 0
    with grpc.insecure_channel(f"unix:{d.socket}") as ch:
        for path, msg, cs, ss in methods():
            for body in (JUNK, TRUNCATED_FIELD):
                with pytest.raises(DecodeError):  # precondition: the bytes really do not parse
                    GetMessageClass(msg).FromString(body)
                code, details = call_raw(ch, path, cs, ss, [body])
                sent += 1
                assert code == C.INVALID_ARGUMENT, (path, code, details)
                assert re.match(malformed_re(path, msg.full_name, len(body)), details), details
    assert sent == 2 * (len(SERVICE.methods) + len(HEALTH.methods))
    # Counted once each, in Stats and in the metrics, and logged with the method.
    assert cl.stats().requests_refused - before_stats == sent
    assert refused_metric(port, "INVALID_ARGUMENT") - before_metric == sent
    log = (d.dir / "daemon.log").read_text()
    assert len(re.findall(r"refused \(INVALID_ARGUMENT\): malformed request for /", log)) == sent
    # Still serving, and nothing changed.
    assert d.alive()
    assert cl.stats().jobs == [] and d.segments() == []
    cl.register_job("after", 1)
    assert [j.job_id for j in cl.stats().jobs] == ["after"]
    with grpc.insecure_channel(f"unix:{d.socket}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    cl.close()


def test_empty_body_reaches_our_own_validation(mdaemon):
    """b"" is a valid empty message: the refusal must be our validation's, not a parse error."""
    d, port = mdaemon, mdaemon.info["metrics_port"]
    expect = {
        "RegisterJob": (C.INVALID_ARGUMENT, r"invalid job id ''"),
        "AdoptShard": (C.INVALID_ARGUMENT, r"AdoptShard needs a manifest"),
        "PushShard": (C.INVALID_ARGUMENT, r"first message must carry the manifest"),
        "AcquireStaging": (C.NOT_FOUND, r"unknown job ''"),
        "Stats": (C.OK, r"^$"),
    }
    before = refused_metric(port, "INVALID_ARGUMENT")
    with grpc.insecure_channel(f"unix:{d.socket}") as ch:
        for name, (want, pattern) in expect.items():
            m = SERVICE.methods_by_name[name]
            code, details = call_raw(ch, f"/snapshotd.v1.Snapshotd/{name}", m.client_streaming,
                                     m.server_streaming, [b""])
            assert code == want, (name, code, details)
            assert re.search(pattern, details) and "malformed" not in details, (name, details)
    assert refused_metric(port, "INVALID_ARGUMENT") - before == 3
    assert d.alive()


def test_junk_chunk_in_a_push_stream_is_refused_and_frees_its_staging(mdaemon):
    d, port = mdaemon, mdaemon.info["metrics_port"]
    cl = d.client()
    cl.register_job("push", 1)
    data = random.Random(1).randbytes(3 * BS + 11)
    first = pb.PushShardChunk(manifest=manifest("push", 0, 1, data), data=data[:BS])
    first = first.SerializeToString()
    st0, m0 = cl.stats(), refused_metric(port, "INVALID_ARGUMENT")
    segs0 = d.segments()
    with grpc.insecure_channel(f"unix:{d.socket}") as ch:
        code, details = call_raw(ch, "/snapshotd.v1.Snapshotd/PushShard", True, False,
                                 [first, TRUNCATED_FIELD])
    assert code == C.INVALID_ARGUMENT
    assert re.match(malformed_re("/snapshotd.v1.Snapshotd/PushShard",
                                 "snapshotd.v1.PushShardChunk", len(TRUNCATED_FIELD)), details)
    st1 = cl.stats()
    assert st1.requests_refused - st0.requests_refused == 1
    assert refused_metric(port, "INVALID_ARGUMENT") - m0 == 1
    # The half-pushed version left nothing behind, and the same version pushes cleanly.
    assert st1.bytes_reserved == st0.bytes_reserved and d.segments() == segs0
    assert cl.list_versions("push").versions == []
    assert cl.push_shard(manifest("push", 0, 1, data), data).committed
    cl.close()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return head + payload


def _literal(name: str, value: str) -> bytes:  # HPACK literal, not indexed, no Huffman
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _answer_of_stream_1(sock: socket.socket) -> str:
    """Read frames until stream 1 ends; 'grpc-status N', 'rst_stream' or 'goaway'."""
    buf = b""
    while True:
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = int.from_bytes(buf[:3], "big")
            kind, flags = buf[3], buf[4]
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload, buf = buf[9:9 + n], buf[9 + n:]
            if kind == 7:
                return "goaway"
            if stream == 1 and kind == 3:
                return "rst_stream"
            if stream == 1 and kind == 1 and flags & 1:  # trailers (END_STREAM)
                m = re.search(rb"grpc-status.(\d+)", payload)
                return f"grpc-status {int(m.group(1)) if m else '?'}"
        chunk = sock.recv(65536)
        if not chunk:
            return "closed"
        buf += chunk


def test_truncated_frames_do_not_stop_the_daemon(daemon):
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    # What the chaos harness sends: junk, a SETTINGS frame cut short, a bare gRPC prefix.
    for payload in (random.Random(3).randbytes(4096),
                    preface + b"\x00\x03\xe8\x04\x00\x00\x00\x00\x00" + b"\x00" * 10,
                    b"\x00\x00\x00\x00\xff"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(daemon.socket)
            s.sendall(payload)
    # A well-formed stream whose gRPC message prefix promises 100 bytes but the stream
    # ends after 6: grpc core never hands a message to the server, so no parse happens.
    headers = b"".join(_literal(k, v) for k, v in [
        (":method", "POST"), (":scheme", "http"), (":path", "/snapshotd.v1.Snapshotd/RegisterJob"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")])
    body = b"\x00" + struct.pack(">I", 100) + b"\x0a\x04abcd"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(daemon.socket)
        s.sendall(preface + _frame(4, 0, 0, b"") + _frame(1, 4, 1, headers) + _frame(0, 1, 1, body))
        answer = _answer_of_stream_1(s)
    assert answer not in ("grpc-status 0", "closed"), answer
    assert daemon.alive()
    cl = daemon.client()
    cl.register_job("still", 1)
    assert [j.job_id for j in cl.stats().jobs] == ["still"]
    cl.close()


def test_token_is_checked_before_the_body_is_parsed(daemon_factory):
    d = daemon_factory(token="s3cret").start()
    path = "/snapshotd.v1.Snapshotd/AdoptShard"
    with grpc.insecure_channel(f"unix:{d.socket}") as ch:
        code, details = call_raw(ch, path, False, False, [JUNK])
        assert code == C.UNAUTHENTICATED and "malformed" not in details
        code, details = call_raw(ch, path, False, False, [JUNK],
                                 metadata=[("x-snapshotd-token", "s3cret")])
        assert code == C.INVALID_ARGUMENT
        assert re.match(malformed_re(path, "snapshotd.v1.AdoptShardRequest", len(JUNK)), details)
    assert d.alive()


def test_guard_covers_stream_handlers_that_do_not_refuse_themselves(tmp_path):
    """The fallback for streamed requests: a MalformedRequestError escaping a handler
    that does not catch it is still refused INVALID_ARGUMENT (stream-unary and
    stream-stream), and a good stream goes through untouched."""
    refused = []
    req = health_pb2.HealthCheckRequest

    def count(requests, context):
        return health_pb2.HealthCheckResponse(status=sum(1 for _ in requests))

    def echo(requests, context):
        for r in requests:
            yield health_pb2.HealthCheckResponse(status=len(r.service))

    handlers = {
        "Count": grpc.stream_unary_rpc_method_handler(
            count, request_deserializer=req.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
        "Echo": grpc.stream_stream_rpc_method_handler(
            echo, request_deserializer=req.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
    }
    server = grpc.server(futures.ThreadPoolExecutor(2),
                         interceptors=[RequestParseGuard(lambda m, d: refused.append(m))])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    sock = tmp_path / "g.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        good = req(service="ab").SerializeToString()
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            assert ch.stream_unary("/t.S/Count")(iter([good, good]), timeout=5) == \
                health_pb2.HealthCheckResponse(status=2).SerializeToString()
            for path, cs, ss in (("/t.S/Count", True, False), ("/t.S/Echo", True, True)):
                code, details = call_raw(ch, path, cs, ss, [good, TRUNCATED_FIELD])
                assert code == C.INVALID_ARGUMENT, (path, code, details)
                assert re.match(malformed_re(path, "grpc.health.v1.HealthCheckRequest", 6), details)
        assert refused == ["/t.S/Count", "/t.S/Echo"]
    finally:
        server.stop(0).wait()
