"""Security: every kind of refused request is refused, logged and counted in metrics.

Real daemon processes, real gRPC, real ZeroMQ (see docs/SECURITY.md for the model):
1. a client without (or with a wrong) daemon token;
2. a peer without the peer key (wrong key, no key, a sender outside the spec);
3. oversized length claims: a shard bigger than the budget, a peer header whose
   payload_bytes lies, and a raw ZMTP frame whose 8-byte length prefix says 1 TiB;
4. a request for another job's snapshot (jobs bound to job tokens);
5. a cluster with ``peer_encryption: curve`` commits and rebuilds; peers with a wrong
   key, or talking plaintext, are refused at the handshake.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import stat
import struct
import time
import urllib.request

import psutil
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from snapshotd.wire import errors

from snapshotd.wire import shm
from snapshotd_tools import localcluster as lc
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.manifest import block_checksums
from snapshotd.node.peer import MAGIC, PeerAuthError, PeerClient, PeerUnavailableError, RemoteError
from snapshotd.node.cluster import peer_ops
from snapshotd.node.peer import frame_mac as _mac, peer_pb2
from snapshotd.node.peer.curve import CurvePeers, derive_keypair
from snapshotd.node.spec_file import load_spec
from snapshotd_client.transport import DaemonClient

BS = 64 << 10
JOB = "sec"


# -- helpers ----------------------------------------------------------------------------
def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(port: int, name: str, **labels) -> float:
    return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(pred, timeout_s: float = 20.0, what: str = "condition"):
    t0 = time.monotonic()
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_shard(cl: DaemonClient, job: str, rank: int, version: int, data: bytes, bs: int = BS,
                ws: int = 1, lws: int = 0):
    cl.register_job(job, ws, lws)
    st = cl.acquire_staging(job, rank, version, len(data))
    seg = shm.open_segment(st.segment_name, writable=True)
    try:
        seg.buf[:len(data)] = data
    finally:
        seg.close()
    n = len(data)
    m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=n, block_size_bytes=bs,
                         checksum_algo="xxh3_64", meta_json="{}",
                         tensors=[pb.TensorEntry(name="w", dtype="uint8", shape=[n], offset=0, nbytes=n)])
    m.block_checksums.extend(block_checksums(data, n, bs))
    return cl.adopt(st.segment_name, m)


def open_bytes(cl: DaemonClient, job: str, rank: int) -> bytes:
    r = cl.open_shard(job, rank)
    seg = shm.open_segment(r.segment_name)
    try:
        return bytes(seg.buf[:r.manifest.payload_bytes])
    finally:
        seg.close()


def one_node_spec(path: str, node: str, key: str, encryption: str = "none") -> tuple[int, int]:
    ports = lc.free_ports(2)
    with open(path, "w") as f:
        json.dump({"group_size": 1, "parity": 0, "block_size_bytes": "64KiB", "peer_key": key,
                   "peer_encryption": encryption, "heartbeat_interval_ms": 200,
                   "heartbeat_timeout_ms": 1500,
                   "nodes": [{"id": node, "host": "127.0.0.1", "port": ports[0], "peer_port": ports[1]}]}, f)
    return ports[0], ports[1]


# -- 1. client without the token ------------------------------------------------------------
def test_client_without_token_is_refused_logged_counted(daemon_factory):
    d = daemon_factory(token="s3cret", extra_args=["--metrics-addr", "127.0.0.1:0",
                                                   "--log-level", "WARNING"]).start()
    port = d.info["metrics_port"]
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    good = d.client()
    write_shard(good, JOB, 0, 1, os.urandom(1000))
    for token in (None, "wrong", "s3cret "):
        bad = DaemonClient.for_socket(d.socket, token=token, timeout_s=10)
        with pytest.raises(errors.AuthenticationError):
            bad.open_shard(JOB, 0)
        with pytest.raises(errors.AuthenticationError):
            bad.register_job("intruder", 1)
        bad.close()
    assert metric(port, "snapshotd_requests_refused_total", reason="UNAUTHENTICATED") == 6
    assert good.stats().requests_refused == 6
    assert "intruder" not in [j.job_id for j in good.stats().jobs]
    log = d.read_log()
    assert "missing snapshotd token" in log and "wrong snapshotd token" in log
    good.close()


# -- 2. a peer without the key ---------------------------------------------------------------
def test_peer_without_key_is_refused_logged_counted(daemon_factory, tmp_path):
    node = "p" + os.urandom(4).hex()
    key = os.urandom(16).hex()
    _, peer_port = one_node_spec(str(tmp_path / "spec.yaml"), node, key)
    d = daemon_factory(node_id=node, extra_args=[
        "--spec", str(tmp_path / "spec.yaml"), "--metrics-addr", "127.0.0.1:0"]).start()
    port = d.info["metrics_port"]
    addr = f"tcp://127.0.0.1:{peer_port}"
    forged = peer_ops.jobs()
    for k in (b"not-the-key", None):
        with PeerClient(addr, node, node, k, timeout_ms=3000) as pc:
            with pytest.raises((PeerAuthError, RemoteError)):
                pc.call(forged)
    with PeerClient(addr, "intruder", node, key.encode(), timeout_ms=3000) as pc:  # key, not in spec
        with pytest.raises((PeerAuthError, RemoteError), match="unknown peer"):
            pc.call(forged)
    with PeerClient(addr, node, node, key.encode(), timeout_ms=3000) as pc:  # the right key: answered
        assert pc.call(forged)[0].WhichOneof("body") == "jobs"
    assert metric(port, "snapshotd_peer_messages_refused_total", reason="auth") == 2
    assert metric(port, "snapshotd_peer_messages_refused_total", reason="unknown_peer") == 1
    assert metric(port, "snapshotd_peer_auth_failures_total") == 3
    assert "refused (auth)" in d.read_log() and "refused (unknown_peer)" in d.read_log()


# -- 3. oversized length claims ----------------------------------------------------------------
def _zmtp_null_greeting() -> bytes:
    # ZMTP 3.0: signature, version 3.0, mechanism "NULL", as-server 0, filler.
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31


def _zmtp_ready(socket_type: bytes) -> bytes:
    prop = b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    body = b"\x05READY" + prop
    return b"\x04" + bytes([len(body)]) + body  # short command frame


def test_oversized_length_claims_are_refused_before_allocation(daemon_factory, tmp_path):
    node = "o" + os.urandom(4).hex()
    key = os.urandom(16).hex()
    _, peer_port = one_node_spec(str(tmp_path / "spec.yaml"), node, key)
    d = daemon_factory(node_id=node, budget="64MiB", extra_args=[
        "--spec", str(tmp_path / "spec.yaml"), "--metrics-addr", "127.0.0.1:0"]).start()
    port = d.info["metrics_port"]
    cl = d.client()
    cl.register_job(JOB, 1)
    # (a) gRPC: a shard claiming far more bytes than the budget: refused before a byte is kept.
    for n in (1 << 40, (1 << 64) - 1):
        with pytest.raises(errors.MemoryBudgetExceededError):
            cl.acquire_staging(JOB, 0, 1, n)
    big = pb.ShardManifest(job_id=JOB, rank=0, version=2, payload_bytes=1 << 36, block_size_bytes=4 << 20,
                           checksum_algo="xxh3_64")  # a 64 GiB push announced in its manifest
    big.block_checksums.extend([0] * ((1 << 36) // (4 << 20)))
    with pytest.raises(errors.MemoryBudgetExceededError):
        cl.push_shard(big, b"\0" * 1024)
    with pytest.raises(errors.MemoryBudgetExceededError, match="ranks in all"):  # job table bound
        cl.register_job("huge", 1 << 21)
    assert cl.stats().bytes_reserved == 0
    assert metric(port, "snapshotd_requests_refused_total", reason="RESOURCE_EXHAUSTED") == 4
    # (b) peer plane: a header whose payload_bytes claims 1 TiB for a 4-byte payload.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{peer_port}")
    try:
        rid = os.urandom(8)
        header = peer_pb2.PeerFrameHeader(request=peer_ops.jobs(),
                                          payload_bytes=1 << 40, payload_xxh3=0).SerializeToString()
        sock.send_multipart([MAGIC, node.encode(), rid, header, _mac(key.encode(), node.encode(), rid, header), b"abcd"])
        assert sock.poll(5000), "no reply"
        err = peer_pb2.PeerFrameHeader.FromString(sock.recv_multipart()[3]).error
        assert err.code == "PEER_PROTOCOL" and "header says" in err.message, err
    finally:
        sock.close(linger=0)
    # ... and a header of groups nested 30000 deep (a recursion bomb): refused, no traceback.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{peer_port}")
    try:
        rid = os.urandom(8)
        header = b"\x7b" * 30000 + b"\x7c" * 30000  # field 15, start-group / end-group
        sock.send_multipart([MAGIC, node.encode(), rid, header, _mac(key.encode(), node.encode(), rid, header)])
        assert sock.poll(5000), "no reply"
        err = peer_pb2.PeerFrameHeader.FromString(sock.recv_multipart()[3]).error
        assert "not a valid PeerFrameHeader" in err.message, err
    finally:
        sock.close(linger=0)
    assert metric(port, "snapshotd_peer_messages_refused_total", reason="malformed") == 2
    assert metric(port, "snapshotd_peer_messages_refused_total", reason="internal") == 0
    assert "refused (malformed)" in d.read_log() and "Traceback" not in d.read_log()
    # (c) ZMTP: a frame whose 8-byte length prefix says 1 TiB. libzmq checks it against
    # ZMQ_MAXMSGSIZE before allocating and drops the connection; the daemon stays small.
    rss0 = psutil.Process(d.proc.pid).memory_info().rss
    with socket.create_connection(("127.0.0.1", peer_port), timeout=5) as s:
        s.sendall(_zmtp_null_greeting())
        greeting = b""
        while len(greeting) < 64:  # the daemon's whole greeting (recv may return part of it)
            chunk = s.recv(64 - len(greeting))
            assert chunk, "the daemon closed the connection during the greeting"
            greeting += chunk
        s.sendall(_zmtp_ready(b"DEALER"))
        s.sendall(b"\x00\x03" + MAGIC)  # a well-framed one-frame message: proves the handshake took
        wait_for(lambda: metric(port, "snapshotd_peer_messages_refused_total", reason="malformed") == 3,
                 timeout_s=90, what="the raw ZMTP message to arrive")  # 20 s was too short in a loaded CI
        s.sendall(b"\x02" + struct.pack(">Q", 1 << 40) + b"\0" * 4096)  # long frame, 1 TiB claimed
        s.settimeout(5)
        dropped = False
        try:
            while s.recv(65536):
                pass
            dropped = True
        except (ConnectionResetError, BrokenPipeError):
            dropped = True
        except socket.timeout:
            pass
        assert dropped, "the daemon kept reading a 1 TiB frame"
    assert psutil.Process(d.proc.pid).memory_info().rss < rss0 + (64 << 20)
    with PeerClient(f"tcp://127.0.0.1:{peer_port}", node, node, key.encode(), timeout_ms=3000) as pc:
        assert JOB in pc.call(peer_ops.jobs())[0].jobs.jobs  # still serving
    cl.close()


# -- 4. another job's snapshot ---------------------------------------------------------------
def test_request_for_another_jobs_snapshot_is_refused(daemon_factory):
    d = daemon_factory(extra_args=["--metrics-addr", "127.0.0.1:0"]).start()
    port = d.info["metrics_port"]
    alice = DaemonClient.for_socket(d.socket, job_token="alice-secret", timeout_s=10)
    bob = DaemonClient.for_socket(d.socket, job_token="bob-secret", timeout_s=10)
    anon = DaemonClient.for_socket(d.socket, job_token="", timeout_s=10)
    data = os.urandom(3 * BS + 5)
    assert write_shard(alice, "alice-job", 0, 1, data).committed
    write_shard(bob, "bob-job", 0, 1, b"bob" * 100)
    n = 0
    for other in (bob, anon):
        for call in (lambda c: c.open_shard("alice-job", 0), lambda c: c.fetch_shard("alice-job", 0),
                     lambda c: c.list_versions("alice-job"), lambda c: c.drop_job("alice-job"),
                     lambda c: c.acquire_staging("alice-job", 0, 2, 10),
                     lambda c: c.register_job("alice-job", 1, restarting=True)):
            with pytest.raises(errors.SnapshotdError, match="bound to a job token") as ei:
                call(other)
            assert ei.value.grpc_code.name == "PERMISSION_DENIED"
            n += 1
    assert metric(port, "snapshotd_requests_refused_total", reason="PERMISSION_DENIED") == n
    assert "bound to a job token" in d.read_log()
    assert open_bytes(alice, "alice-job", 0) == data  # untouched, still the owner's
    # The binding survives a daemon restart (only the token's SHA-256 is on disk, 0600).
    path = os.path.join(d.state_dir, "job_tokens.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(errors.InvalidRequestError):  # a refused registration binds nothing
        alice.register_job("bad job", 1)
    text = open(path).read()
    assert "bad job" not in text and sorted(json.loads(text)["jobs"]) == ["alice-job", "bob-job"]
    assert "alice-secret" not in text and hashlib.sha256(b"alice-secret").hexdigest() in text
    d.stop()
    d.start()
    for c in (alice, bob, anon):
        c.close()
    alice = DaemonClient.for_socket(d.socket, job_token="alice-secret", timeout_s=10)
    bob = DaemonClient.for_socket(d.socket, job_token="bob-secret", timeout_s=10)
    with pytest.raises(errors.SnapshotdError, match="bound to a job token"):
        bob.open_shard("alice-job", 0)
    assert open_bytes(alice, "alice-job", 0) == data
    # Dropping the job (by its owner) unbinds it.
    alice.drop_job("alice-job")
    assert "alice-job" not in open(path).read()
    alice.close()
    bob.close()


def test_require_job_token(daemon_factory):
    d = daemon_factory(extra_args=["--require-job-token"]).start()
    anon = DaemonClient.for_socket(d.socket, job_token="", timeout_s=10)
    with pytest.raises(errors.SnapshotdError, match="requires a job token"):
        anon.register_job("j", 1)
    anon.close()
    ok = DaemonClient.for_socket(d.socket, job_token="t", timeout_s=10)
    assert write_shard(ok, "j", 0, 1, b"x" * 10).committed
    ok.close()


# -- 5. CURVE ------------------------------------------------------------------------------
def test_curve_cluster_commits_rebuilds_and_refuses_wrong_keys(tmp_path):
    d = str(tmp_path / "curve")
    info = lc.up(d, 3, 1, block_size="64KiB", budget="256MiB", peer_encryption="curve",
                 daemon_args=["--metrics-addr", "127.0.0.1:0"])
    try:
        spec = load_spec(os.path.join(d, "spec.yaml"))
        assert spec.peer_encryption == "curve"
        nodes = ["n0", "n1", "n2"]
        socks = lc.sockets(d)
        datas = {}
        for rank, nd in enumerate(nodes):
            cl = DaemonClient.for_socket(socks[nd], timeout_s=30)
            datas[rank] = random.Random(rank).randbytes(200_000 + rank * 7000)
            write_shard(cl, JOB, rank, 1, datas[rank], ws=3, lws=1)
            cl.close()

        def committed(nd):
            cl = DaemonClient.for_socket(socks[nd], timeout_s=10)
            try:
                return {j.job_id: j.latest_committed_version for j in cl.stats().jobs}.get(JOB, 0)
            finally:
                cl.close()

        for nd in nodes:
            wait_for(lambda: committed(nd) == 1, what=f"{nd} to commit v1 over CURVE")
        # n1 is lost with its memory; its replacement rebuilds over CURVE.
        pid = lc.node_pid(d, "n1")
        os.kill(pid, 9)
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
        lc.wipe_node(d, "n1")
        # While it is gone: the survivors report the group degraded (status and metrics).
        n0_port = info["nodes"]["n0"]["metrics_port"]
        wait_for(lambda: metric(n0_port, "snapshotd_degraded_stripes", job=JOB) > 0, what="degraded stripes")
        assert metric(n0_port, "snapshotd_lost_shards_max", job=JOB) == 1
        assert metric(n0_port, "snapshotd_peers_up") == 1
        health = lc.group_health(lc.collect_status(d))
        assert [(h["up"], h["nodes"], h["max_lost_shards"], h["state"], h["down"]) for h in health] == \
            [(2, 3, 1, "degraded", ["n1"])]
        text = lc.format_status(lc.collect_status_via(socks["n0"]))
        assert any(ln.split()[:2] == ["n1", "no"] and "no heartbeat" in ln for ln in text.splitlines()), text
        assert any(ln.split()[:2] == ["g0", "2/3"] and "degraded" in ln for ln in text.splitlines()), text
        lc.restart_node(d, "n1", "256MiB")
        wait_for(lambda: committed("n1") == 1, what="n1 to rebuild v1 over CURVE")
        cl = DaemonClient.for_socket(socks["n1"], timeout_s=30)
        assert open_bytes(cl, JOB, 1) == datas[1]
        cl.close()
        with open(os.path.join(d, "n1.ready")) as f:
            n1_port = json.load(f)["metrics_port"]
        assert metric(n1_port, "snapshotd_rebuild_seconds_count") == 1
        assert metric(n1_port, "snapshotd_rebuild_bytes_total") > 0

        # Peers with the wrong key, or without CURVE, never get a message through.
        n0 = spec.node("n0")
        addr = f"tcp://127.0.0.1:{n0.peer_port}"
        key = spec.peer_key.encode()
        wrong = CurvePeers(b"wrong-key", "n2", nodes)
        for curve in (wrong, None):
            with PeerClient(addr, "n2", "n0", key, timeout_ms=1500, curve=curve) as pc:
                with pytest.raises(PeerUnavailableError):
                    pc.call(peer_ops.jobs())
        # A client that knows n0's public key but not an allowed keypair: ZAP says no.
        mixed = CurvePeers(key, "n2", nodes)
        mixed.public, mixed.secret = zmq.curve_keypair()
        with PeerClient(addr, "n2", "n0", key, timeout_ms=1500, curve=mixed) as pc:
            with pytest.raises(PeerUnavailableError):
                pc.call(peer_ops.jobs())
        wait_for(lambda: metric(n0_port, "snapshotd_peer_messages_refused_total", reason="curve") >= 2,
                 what="CURVE refusals counted")
        assert metric(n0_port, "snapshotd_peer_auth_failures_total") >= 2
        with open(os.path.join(d, "n0.log")) as f:
            assert "CURVE handshake refused" in f.read()
        # The right derived keypair is served.
        with PeerClient(addr, "n2", "n0", key, timeout_ms=3000, curve=CurvePeers(key, "n2", nodes)) as pc:
            assert pc.call(peer_ops.jobs())[0].jobs.jobs[JOB].committed_version == 1
        for nd in nodes:
            with open(os.path.join(d, f"{nd}.log")) as f:
                assert "Traceback" not in f.read()
    finally:
        lc.down(d)
    assert shm.list_segments(f"snapshotd.{lc.instance_of(d)}.") == []


def test_curve_keys_are_derived_per_node_and_key():
    a_pub, a_sec = derive_keypair(b"k1", "n0")
    assert (a_pub, a_sec) == derive_keypair(b"k1", "n0")  # deterministic
    assert zmq.curve_public(a_sec) == a_pub
    assert derive_keypair(b"k1", "n1")[0] != a_pub
    assert derive_keypair(b"k2", "n0")[0] != a_pub
    with pytest.raises(ValueError, match="peer_key"):
        derive_keypair(b"", "n0")
