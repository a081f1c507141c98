"""The client's end of the hand-off channel (transport.HandoffChannel) against a scripted
ROUTER in this process: which reply it takes, how a refusal's code becomes its class,
and when it gives up with DaemonUnavailableError. The daemon's end: tests/node/test_handoff.py."""

from __future__ import annotations

import os
import threading

import pytest
import zmq

from snapshotd.wire import errors
from snapshotd.wire import handoff as hw
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd_client.transport import DaemonClient, HandoffChannel

from clusterkit import wait_for


class Router:
    """A ROUTER on an ipc file that answers each request with ``script(rid, parts)``
    (a list of replies, each a list of frames; [] = no answer)."""

    def __init__(self, path, script):
        self.path, self.script = path, script
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("ipc://" + path)
        self.seen: list[list[bytes]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            if not self.sock.poll(50):
                continue
            ident, *parts = self.sock.recv_multipart()
            self.seen.append(parts)
            for reply in self.script(hw.read_header(parts[0])[1], parts):
                self.sock.send_multipart([ident, *reply])

    def close(self):
        self._stop = True
        self.thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()


def _req(v=1):
    return pb.AdoptShardRequest(segment_name="s", manifest=pb.ShardManifest(job_id="j", version=v))


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "d.sock.ho")


def test_stale_replies_are_dropped_and_tokens_travel(path):
    def script(rid, parts):  # an old request's reply first, then this one's
        return [hw.encode_ok(rid - 1, pb.AdoptShardResponse(version=999).SerializeToString()),
                hw.encode_ok(rid, pb.AdoptShardResponse(version=rid).SerializeToString())]

    r = Router(path, script)
    ch = HandoffChannel(path, "dtok", "jtok")
    try:
        for i in (1, 2, 3):
            assert ch.call(_req(), 10).version == i
        assert ch.calls == 3 and ch.sent == 3
        assert r.seen[0][1:3] == [b"dtok", b"jtok"]
        assert pb.AdoptShardRequest.FromString(r.seen[0][3]) == _req()
    finally:
        ch.close()
        r.close()


@pytest.mark.parametrize("code, cls", [
    ("UNKNOWN_JOB", errors.UnknownJobError),
    ("SNAPSHOT_SKIPPED", errors.SnapshotSkippedError),
    ("AUTHENTICATION", errors.AuthenticationError),
    ("NO_SUCH_CODE", errors.DaemonError),  # an unknown code: as gRPC's unknown status
])
def test_a_refusal_raises_the_class_its_code_names(path, code, cls):
    r = Router(path, lambda rid, parts: [hw.encode_error(rid, code, "why")])
    ch = HandoffChannel(path, None, None)
    try:
        with pytest.raises(errors.SnapshotdError) as ei:
            ch.call(_req(), 10)
        assert type(ei.value) is cls and str(ei.value) == "AdoptShard: why"
    finally:
        ch.close()
        r.close()


def test_no_reply_then_socket_gone_are_daemon_unavailable(path):
    r = Router(path, lambda rid, parts: [])
    ch = HandoffChannel(path, None, None)
    try:
        with pytest.raises(errors.DaemonUnavailableError, match="no reply in 0.2 s"):
            ch.call(_req(), 0.2)
        r.close()
        os.unlink(path)
        wait_for(lambda: not ch._sock.poll(0, zmq.POLLOUT), 20, "the channel to see the drop")
        with pytest.raises(errors.DaemonUnavailableError, match="socket is gone"):
            ch.call(_req(), 30)
        ch.close()
        with pytest.raises(errors.DaemonUnavailableError, match="closed"):
            ch.call(_req(), 30)
    finally:
        ch.close()


def test_used_only_for_an_ipc_file_beside_a_unix_socket(tmp_path, monkeypatch):
    sock = str(tmp_path / "d.sock")
    open(sock, "w").close()
    open(sock + ".ho", "w").close()
    cl = DaemonClient.for_socket(sock)
    cl._use_handoff("ipc:///elsewhere/d.sock.ho")  # the daemon's view of the directory
    assert cl.handoff is not None and cl.handoff.path == sock + ".ho"
    same = cl.handoff
    cl._use_handoff("ipc:///elsewhere/d.sock.ho")
    assert cl.handoff is same
    for endpoint in ("tcp://127.0.0.1:5555", "", "ipc:///x/missing.ho"):
        cl._use_handoff(endpoint)
        assert cl.handoff is None, endpoint
    monkeypatch.setenv(hw.ENV_HANDOFF, "grpc")
    cl._use_handoff("ipc:///elsewhere/d.sock.ho")
    assert cl.handoff is None
    monkeypatch.delenv(hw.ENV_HANDOFF)
    real_stat = os.stat
    # A file of another owner than the socket's (planted in a shared directory) is not used.
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: os.stat_result(
        (*real_stat(p, *a, **k)[:4], 4242, *real_stat(p, *a, **k)[5:])) if str(p).endswith(".ho")
        else real_stat(p, *a, **k))
    cl._use_handoff("ipc:///elsewhere/d.sock.ho")
    assert cl.handoff is None
    monkeypatch.setattr(os, "stat", real_stat)
    cl._use_handoff("ipc:///elsewhere/d.sock.ho")
    assert cl.handoff is not None
    monkeypatch.setenv(hw.ENV_HANDOFF, "grpc")
    cl.close()
    monkeypatch.delenv(hw.ENV_HANDOFF)
    monkeypatch.chdir(tmp_path)  # even where the endpoint's file name resolves
    tcp = DaemonClient("127.0.0.1:1")
    tcp._use_handoff("ipc://" + sock + ".ho")
    assert tcp.handoff is None
    tcp.close()


def test_a_refused_connection_fails_at_once(path):
    """A SIGKILLed daemon leaves its socket file with nobody listening: the call fails
    as soon as the connection is refused (as gRPC fails fast), not after a grace period,
    so a save never waits for the daemon's restart; once it is back, the next call works."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # the file, with nobody listening on it
    s.close()
    ch = HandoffChannel(path, None, None)
    ch.CONNECT_GRACE_S = 10.0  # (the mutant without the refusal check waits this long)
    try:
        with pytest.raises(errors.DaemonUnavailableError, match="not listening"):
            ch.call(_req(), 10)
        os.unlink(path)
        r = Router(path, lambda rid, parts: [hw.encode_ok(rid, b"")])
        try:
            assert ch.call(_req(), 60) == pb.AdoptShardResponse()
        finally:
            r.close()
    finally:
        ch.close()


@pytest.mark.parametrize("tensors", [0, 2, 4, 200, 1000])  # manifests of 1 to 3 length bytes
def test_a_serialized_manifest_goes_out_as_the_message_would(path, tensors):
    """The Snapshotter hands ``adopt`` its manifest as bytes (the layout's serialization
    followed by the save's own fields); the request the daemon reads is the one the
    message form gives, over the channel and over gRPC's message path alike."""
    tmpl = pb.ShardManifest(job_id="j", rank=3, payload_bytes=1 << 21, block_size_bytes=1 << 20,
                            dp_ranks=[0, 1], replicated_bytes=96)
    for i in range(tensors):
        tmpl.tensors.add(name=f"t{i}", dtype="float32", shape=[2, 3], offset=24 * i, nbytes=24)
    own = pb.ShardManifest(version=7, meta_json='{"step":7}', block_checksums=[1, 2])
    want = pb.AdoptShardRequest(segment_name="s", manifest=tmpl, next_version=8,
                                next_payload_bytes=1 << 21, writer_id="w",
                                incremental=pb.IncrementalHint(base_version=6, dirty_blocks=b"\x01"))
    want.manifest.MergeFrom(own)
    r = Router(path, lambda rid, parts: [hw.encode_ok(rid, b"")])
    cl = DaemonClient("127.0.0.1:1")
    cl.handoff = HandoffChannel(path, None, None)
    sent = []
    cl._call = lambda method, req: sent.append((method, req)) or pb.AdoptShardResponse()
    try:
        raw = tmpl.SerializeToString() + own.SerializeToString()
        args = ("s", raw, 8, 1 << 21)
        kw = {"writer_id": "w", "hint": pb.IncrementalHint(base_version=6, dirty_blocks=b"\x01")}
        cl.adopt(*args, **kw)
        assert pb.AdoptShardRequest.FromString(r.seen[0][3]) == want
        cl.handoff.close()
        cl.handoff = None  # the gRPC path parses the bytes into the message
        cl.adopt(*args, **kw)
        assert sent == [("AdoptShard", want)]
    finally:
        cl.close()
        r.close()
