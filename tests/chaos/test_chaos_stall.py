"""The ``stall_server`` fault's parts: the run-time trigger of the peer server's test-only
stall hook (``SNAPSHOTD_TEST_STALL_PEER_SERVER=@DIR``), and the ``commit_through_stall``
verdict. (The scenario against a real cluster: ``snapshotd chaos --only
stall-serving-thread``, and the full matrix in test_chaos_cluster.py.)"""

from __future__ import annotations

import os

from snapshotd.node.peer import PeerClient, PeerServer, peer_pb2 as ppb
from snapshotd.node.peer.server import STALL_ENV
from snapshotd_tools.chaos import scenarios as sc
from snapshotd_tools.chaos.invariants import Observation, check
from snapshotd_tools.chaos.stall import trigger_path


def _contrib() -> ppb.PeerRequest:
    return ppb.PeerRequest(contrib=ppb.ContribRequest(job="j", version=1, stripe=0, row=0, position=0,
                                                      block_counts=[1, 1]))


def _ping() -> ppb.PeerRequest:
    return ppb.PeerRequest(ping=ppb.PingRequest(committed_versions={"j": 1}))


def _server(node: str) -> PeerServer:
    def handler(sender, request, payload):
        if request.WhichOneof("op") == "contrib":
            return ppb.PeerReply(ack=ppb.Ack()), None
        return ppb.PeerReply(ping=ppb.PingReply(committed_versions={"j": 1})), None

    return PeerServer("tcp://127.0.0.1:0", node, None, None, handler, inline_ops={"ping"}).start()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def test_a_trigger_file_arms_the_stall_at_run_time_once(tmp_path, monkeypatch):
    monkeypatch.setenv(STALL_ENV, f"@{tmp_path}")
    srv = _server("n1")
    cl = PeerClient(f"tcp://127.0.0.1:{srv.port}", "n0", "n1", None, timeout_ms=20000)
    try:
        cl.call(_contrib(), b"x" * 16)
        assert srv.stalls == 0  # armed with nothing: no stall
        other = trigger_path(str(tmp_path), "n2")
        _write(other, "n2:contrib:0.2:1:sleep")  # another node's trigger: left alone
        mine = trigger_path(str(tmp_path), "n1")
        _write(mine, "n1:contrib:0.2:1:sleep")
        cl.call(_ping())  # the next request takes the trigger; a ping does not stall
        assert not os.path.exists(mine) and os.path.exists(other)
        assert srv.stalls == 0
        for _ in range(3):  # the first contribution stalls, once
            assert cl.call(_contrib(), b"x" * 16)[0].WhichOneof("body") == "ack"
        assert srv.stalls == 1
    finally:
        cl.close()
        srv.stop()


def test_without_the_variable_a_trigger_file_is_never_read(tmp_path, monkeypatch):
    monkeypatch.delenv(STALL_ENV, raising=False)
    srv = _server("n1")
    cl = PeerClient(f"tcp://127.0.0.1:{srv.port}", "n0", "n1", None, timeout_ms=20000)
    path = trigger_path(str(tmp_path), "n1")
    _write(path, "n1:contrib:0.2:1:sleep")
    try:
        cl.call(_ping())
        cl.call(_contrib(), b"x" * 16)
        assert srv.stalls == 0 and os.path.exists(path)
    finally:
        cl.close()
        srv.stop()


def test_commit_through_stall_needs_a_newer_version_within_the_bound():
    def verdict(after_s):
        o = Observation("resume", 10, ["d"] * 11, stall={"node": "n1", "target": 7, "after_s": after_s})
        return {c.name: c for c in check(o)}["commit_through_stall"]

    assert verdict(0.4).ok and "v7 or newer" in verdict(0.4).detail
    assert not verdict(None).ok and "not committed within 30 s" in verdict(None).detail
    assert not verdict(31.0).ok
    assert "commit_through_stall" not in {c.name for c in check(Observation("resume", 10, ["d"] * 11))}


def test_stall_server_scenarios_parse_with_defaults_and_refuse_bad_modes():
    s = sc.parse_scenario({"name": "s", "fault": {"kind": "stall_server"}})
    assert s.params == {"node": 1, "seconds": 5.0, "mode": "sleep"}
    (b,) = [x for x in sc.builtin_scenarios() if x.name == "stall-serving-thread"]
    assert b.kind == "stall_server" and b.params["seconds"] > 1.5  # past the local heartbeat timeout
    try:
        sc.parse_scenario({"name": "s", "fault": {"kind": "stall_server", "mode": "nap"}})
    except sc.ScenarioError as exc:
        assert "sleep or gil" in str(exc)
    else:
        raise AssertionError("a bad mode was accepted")
