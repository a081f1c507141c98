"""The same-host hand-off channel (AdoptShard over ZeroMQ, snapshotd.node.handoff),
against real daemon processes: a save/restore round trip through it, every refusal
raising the class gRPC raises, malformed frames refused while the daemon keeps serving,
late replies dropped, a daemon SIGKILLed and restarted, and the fall-back to gRPC."""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch
import zmq

from snapshotd.wire import handoff as hw
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire import errors
from snapshotd.wire.limits import MAX_MESSAGE_BYTES
from snapshotd.wire.manifest import block_checksums
from snapshotd.wire import shm
from snapshotd_client.snapshotter import Snapshotter
from snapshotd_client.transport import DaemonClient, HandoffChannel

from clusterkit import wait_for

BS = 4096


def _manifest(job, version, data, rank=0):
    n = len(data)
    m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=n, block_size_bytes=BS,
                         checksum_algo="xxh3_64", meta_json="{}",
                         tensors=[pb.TensorEntry(name="b", dtype="uint8", shape=[n], nbytes=n)])
    m.block_checksums.extend(block_checksums(data, n, BS))
    return m


def _stage(cl, job, version, data, rank=0):
    """Acquire and fill a staging segment over gRPC; returns (name, manifest)."""
    a = cl.acquire_staging(job, rank, version, len(data))
    seg = shm.open_segment(a.segment_name, writable=True)
    seg.buf[:len(data)] = data
    seg.close()
    return a.segment_name, _manifest(job, version, data, rank)


def _grpc_only(cl: DaemonClient) -> DaemonClient:
    cl._use_handoff("")
    assert cl.handoff is None
    return cl


def _model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def _train(m, opt):
    m(torch.randn(8, 16)).sum().backward()
    opt.step()
    opt.zero_grad()


def _snap(daemon, m, opt, job, **kw):
    return Snapshotter(m, opt, job_id=job, socket_path=daemon.socket, rank=0, world_size=1,
                       on_daemon_unavailable="raise", timeout_s=20, **kw)


def _state(m, opt):
    return {k: v.clone() for k, v in m.state_dict().items()}, {
        (i, k): v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def test_save_restore_round_trip_over_the_channel_is_bit_exact(daemon):
    m, opt = _model(0)
    with _snap(daemon, m, opt, "rt") as s:
        for step in range(1, 5):
            _train(m, opt)
            s.save(step)
            s.wait()
        ch = s.client.handoff
        assert ch is not None and ch.path == daemon.socket + ".ho"
        assert ch.calls == 4  # every adoption went over the channel, none over gRPC
        assert s.last_stats.committed
    want = _state(m, opt)
    m2, opt2 = _model(1)
    with _snap(daemon, m2, opt2, "rt") as s2:
        assert s2.restore() == 4
    got = _state(m2, opt2)
    assert want[0].keys() == got[0].keys() and want[1].keys() == got[1].keys()
    for a, b in zip((*want[0].values(), *want[1].values()), (*got[0].values(), *got[1].values())):
        assert torch.equal(a, b)
    assert os.stat(daemon.socket + ".ho").st_mode & 0o777 == 0o600


def _refusals(d, cl, cl_grpc):
    """(what, callable taking a client) of every refusal compared across the faces."""
    data = os.urandom(3 * BS + 5)
    name, m = _stage(cl_grpc, "ej", 1, data)

    def unknown_job(c):
        bad = pb.ShardManifest()
        bad.CopyFrom(m)
        bad.job_id = "nobody"
        c.adopt(name, bad)

    def bad_manifest(c):
        bad = pb.ShardManifest()
        bad.CopyFrom(m)
        del bad.block_checksums[-1]  # a checksum short
        c.adopt(name, bad)

    def no_manifest(c):
        c.adopt(name, None)

    def stale_next_version(c):
        c.adopt(name, m, next_version=1)

    return [("unknown job", unknown_job, errors.UnknownJobError),
            ("bad manifest", bad_manifest, errors.InvalidRequestError),
            ("no manifest", no_manifest, errors.InvalidRequestError),
            ("next_version not newer", stale_next_version, errors.InvalidRequestError)]


def _raised(fn, c):
    with pytest.raises(errors.SnapshotdError) as ei:
        fn(c)
    return ei.value


def test_every_refusal_raises_the_class_grpc_raises(daemon_factory):
    d = daemon_factory(token="dtok").start()
    cl = d.client(job_token="jtok")
    cl.register_job("ej", 1)
    assert cl.handoff is not None
    cl_grpc = _grpc_only(d.client(job_token="jtok"))
    for what, fn, cls in _refusals(d, cl, cl_grpc):
        r0 = cl_grpc.stats().requests_refused
        over_grpc = _raised(fn, cl_grpc)
        r1 = cl_grpc.stats().requests_refused
        over_zmq = _raised(fn, cl)
        assert type(over_zmq) is type(over_grpc), (what, over_zmq, over_grpc)
        assert isinstance(over_zmq, cls), (what, over_zmq)
        assert str(over_zmq) == str(over_grpc), what
        assert cl_grpc.stats().requests_refused - r1 == r1 - r0, what  # counted alike
    # Refused for its job token (the job is bound to "jtok"), and for the daemon token.
    name, m = _stage(cl_grpc, "ej", 2, b"x" * BS)
    wrong_job = d.client(job_token="other")
    wrong_job._use_handoff(cl.handoff.endpoint)
    assert wrong_job.handoff is not None
    no_token = DaemonClient.for_socket(d.socket, job_token="jtok")  # no daemon token
    no_token._use_handoff(cl.handoff.endpoint)
    assert no_token.handoff is not None
    for cls, zmq_face, grpc_face in (
            (errors.JobAccessDeniedError, wrong_job, _grpc_only(d.client(job_token="other"))),
            (errors.AuthenticationError, no_token,
             _grpc_only(DaemonClient.for_socket(d.socket, job_token="jtok")))):
        r0 = cl_grpc.stats().requests_refused
        e_grpc = _raised(lambda c: c.adopt(name, m), grpc_face)
        r1 = cl_grpc.stats().requests_refused
        e_zmq = _raised(lambda c: c.adopt(name, m), zmq_face)
        assert type(e_zmq) is type(e_grpc) is cls
        assert cl_grpc.stats().requests_refused - r1 == r1 - r0 == 1
    # Nothing changed: the staged version adopts.
    resp = cl.adopt(name, m)
    assert resp.version == 2 and resp.committed
    assert re.search(r"AdoptShard \(hand-off\): missing snapshotd token", d.read_log())


def _raw(path):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect("ipc://" + path)
    return ctx, s


def _ask(s, parts):
    s.send_multipart(parts)
    assert s.poll(20000), "no reply to a malformed request"
    return s.recv_multipart()


def test_malformed_frames_are_refused_and_the_daemon_keeps_serving(daemon):
    cl = daemon.client()
    cl.register_job("mf", 1)
    ch = cl.handoff
    name, m = _stage(cl, "mf", 1, os.urandom(2 * BS))
    good = pb.AdoptShardRequest(segment_name=name, manifest=m).SerializeToString()
    hdr = hw.header(hw.KIND_ADOPT, 7)
    cases = {
        "wrong version": [hw.HEADER.pack(hw.MAGIC, 99, hw.KIND_ADOPT, 7), b"", b"", good],
        "bad magic": [hw.HEADER.pack(b"XXXX", 1, hw.KIND_ADOPT, 7), b"", b"", good],
        "short header": [b"SDHO\x00"],
        "too few frames": [hdr, b"", good],
        "wrong kind": [hw.header(hw.KIND_OK, 7), b"", b"", good],
        "unparsable body": [hdr, b"", b"", b"\x0a\xff\xff\xff\xff\x0f"],
        "oversized body": [hdr, b"", b"", b"\0" * (MAX_MESSAGE_BYTES + 1)],
    }
    refused0 = cl.stats().requests_refused
    ctx, s = _raw(ch.path)
    try:
        for what, parts in cases.items():
            rid, body, code, msg = hw.decode_reply(_ask(s, parts))
            assert body is None and code == errors.MalformedRequestError.code, (what, code, msg)
            assert rid == (7 if what in ("too few frames", "wrong kind", "unparsable body",
                                         "oversized body") else 0), what
            assert msg, what
    finally:
        ctx.destroy(linger=0)
    assert cl.stats().requests_refused - refused0 == len(cases)
    log = daemon.read_log()
    assert len(re.findall(r"AdoptShard \(hand-off\) refused \(INVALID_ARGUMENT\)", log)) == len(cases)
    # Nothing changed, and the channel still serves: the staged version adopts.
    assert cl.list_versions("mf").latest_committed_version == 0
    resp = cl.adopt(name, m)
    assert resp.committed and ch.calls == 1 and daemon.alive()


def _stop(pid: int) -> None:
    """SIGSTOP, and wait until the process is stopped (the signal takes effect later)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped():
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    wait_for(stopped, 20, f"process {pid} to stop")


def test_requests_queued_while_the_daemon_was_stopped_are_all_answered(daemon):
    """The owner thread takes one request per poll wake: every request queued at once
    (here: while the daemon was SIGSTOPped) is still answered, each once."""
    cl = daemon.client()
    cl.register_job("q", 1)  # (the channel is offered at registration)
    ctx, s = _raw(cl.handoff.path)
    try:
        _stop(daemon.proc.pid)
        try:
            for rid in range(1, 11):
                s.send_multipart([hw.header(hw.KIND_ADOPT, rid), b"", b"", b"\x0a\xff\xff\xff\xff\x0f"])
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        got = []
        while len(got) < 10:
            assert s.poll(20000), f"answered {sorted(got)} of 10"
            got.append(hw.decode_reply(s.recv_multipart())[0])
        assert sorted(got) == list(range(1, 11))
    finally:
        ctx.destroy(linger=0)


def test_a_manifest_in_the_wire_form_with_a_layout_field_after_its_layout_is_refused(daemon):
    """The client sends a save's manifest as its layout's bytes plus the per-save fields;
    the daemon's layout check skips the walk for a known layout prefix only when nothing
    else follows it. A layout field appended after a known prefix is refused, nothing
    changed, and the next good save commits."""
    cl = daemon.client()
    cl.register_job("wf", 1)
    data = os.urandom(2 * BS)

    def wire(m, extra=b""):
        lay = pb.ShardManifest()
        lay.CopyFrom(m)
        for f in ("version", "meta_json", "block_checksums"):
            lay.ClearField(f)
        per = pb.ShardManifest(version=m.version, meta_json=m.meta_json, block_checksums=m.block_checksums)
        return lay.SerializeToString() + per.SerializeToString() + extra

    for v in (1, 2):
        name, m = _stage(cl, "wf", v, data)
        assert cl.adopt(name, wire(m)).committed
    name, m = _stage(cl, "wf", 3, data)
    bad = pb.ShardManifest(tensors=[pb.TensorEntry(name="x", dtype="uint8", shape=[8], offset=0, nbytes=9)])
    with pytest.raises(errors.InvalidRequestError, match="nbytes 9 != 8"):
        cl.adopt(name, wire(m, bad.SerializeToString()))
    assert cl.list_versions("wf").latest_committed_version == 2
    assert cl.adopt(name, wire(m)).committed and cl.handoff.calls == 4


def test_a_late_reply_is_dropped_by_its_request_id(daemon):
    cl = daemon.client()
    cl.register_job("late", 1)
    ch = cl.handoff
    assert cl.adopt(*_stage(cl, "late", 1, os.urandom(BS))).version == 1  # connected
    n2, m2 = _stage(cl, "late", 2, os.urandom(BS))
    _stop(daemon.proc.pid)
    try:
        with pytest.raises(errors.DaemonUnavailableError, match="no reply in"):
            ch.call(pb.AdoptShardRequest(segment_name=n2, manifest=m2), timeout_s=0.3)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    # The daemon serves the request late; its reply comes before any later one.
    wait_for(lambda: cl.list_versions("late").latest_committed_version == 2, 20, "v2 to commit")
    resp = cl.adopt(*_stage(cl, "late", 3, os.urandom(BS)))
    assert resp.version == 3 and ch.calls == 2


def test_a_large_adoption_goes_through_the_worker_pool(daemon):
    from snapshotd.node.handoff import INLINE_MAX_PAYLOAD_BYTES

    cl = daemon.client()
    cl.register_job("big", 1)
    data = os.urandom(INLINE_MAX_PAYLOAD_BYTES + 3 * BS)
    resp = cl.adopt(*_stage(cl, "big", 1, data))
    assert resp.committed and resp.bytes_hashed == len(data) and cl.handoff.calls == 1
    m, got = cl.fetch_shard("big", 0, 1)
    assert bytes(got) == data
    resp = cl.adopt(*_stage(cl, "big", 2, data[:BS]))  # and a small one after it, inline
    assert resp.committed and cl.handoff.calls == 2


def test_daemon_sigkill_mid_call_and_restart_the_client_recovers(daemon):
    m, opt = _model(3)
    with _snap(daemon, m, opt, "rs") as s:
        for step in (1, 2, 3):  # at a steady interval: step 4's segment is staged ahead
            _train(m, opt)
            s.save(step)
            s.wait()
        ch = s.client.handoff
        assert ch is not None and ch.calls == 3 and s._staged[0] == 4
        # The daemon dies with the hand-off of step 4 in flight: the call fails at once
        # (the connection drops), not at its 20 s deadline.
        _stop(daemon.proc.pid)
        _train(m, opt)
        s.save(4)  # no call to the daemon before the hand-off
        wait_for(lambda: ch.sent == 4, 20, "the hand-off of step 4 to be sent")
        daemon.kill()
        with pytest.raises(errors.DaemonUnavailableError, match="dropped the connection"):
            s.wait()
        daemon.start()
        # The snapshotter registers again; the next saves commit over the channel
        # (ZeroMQ reconnected to the new daemon's socket file).
        for step in range(5, 8):
            _train(m, opt)
            s.save(step)
            assert s.wait().committed
        assert s.client.handoff is ch and ch.calls == 6
        # Killed and restarted between two saves (the socket's connection attempts were
        # refused meanwhile, and ZeroMQ backs off): the next save goes through at once.
        daemon.kill()
        daemon.start()
        s._registered = False  # (what it staged ahead is gone: tests/client/test_incremental.py)
        _train(m, opt)
        s.save(8)
        assert s.wait().committed and ch.calls == 7
    want = _state(m, opt)
    m2, opt2 = _model(4)
    with _snap(daemon, m2, opt2, "rs") as s2:
        assert s2.restore() == 8
    assert all(torch.equal(a, b) for a, b in zip(want[0].values(), _state(m2, opt2)[0].values()))


def test_fall_back_to_grpc_when_not_advertised_or_turned_off(daemon_factory, monkeypatch):
    # A daemon run with SNAPSHOTD_HANDOFF=grpc offers no channel.
    monkeypatch.setenv(hw.ENV_HANDOFF, "grpc")
    d = daemon_factory(token="t", tcp=True).start()
    monkeypatch.delenv(hw.ENV_HANDOFF)
    assert not os.path.exists(d.socket + ".ho")
    cl = d.client()
    assert cl.register_job("fb", 1).handoff_endpoint == "" and cl.handoff is None
    name, m = _stage(cl, "fb", 1, os.urandom(BS))
    assert cl.adopt(name, m).committed  # over gRPC
    # A daemon that offers it, to a client over TCP (not the same host), or turned off
    # on the client's side.
    d2 = daemon_factory(token="t", tcp=True).start()
    tcp = DaemonClient(f"127.0.0.1:{d2.info['tcp_port']}", token="t")
    assert tcp.register_job("fb", 1).handoff_endpoint.startswith("ipc://")
    assert tcp.handoff is None
    name, m = _stage(tcp, "fb", 1, os.urandom(BS))
    assert tcp.adopt(name, m).committed
    monkeypatch.setenv(hw.ENV_HANDOFF, "grpc")
    off = d2.client()
    off.register_job("fb", 1)
    assert off.handoff is None
    monkeypatch.delenv(hw.ENV_HANDOFF)
    on = d2.client()
    on.register_job("fb", 1)
    assert isinstance(on.handoff, HandoffChannel)
