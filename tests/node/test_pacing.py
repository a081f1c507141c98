"""node.peer.pacing: which peer messages the --peer-rate limit holds, and the flags.

The clock and the sleep are fakes (the bucket's arithmetic is pure; what is tested here
is which ops wait, how long, and what the counters say); the hooks in the real client
and server are exercised end to end by tests/integration/test_bench_shaped.py.
"""

import threading

import pytest

from snapshotd.node.cli import build_parser
from snapshotd.node.peer import pacing
from snapshotd.node.peer.pacing import PACED_REPLIES, PACED_REQUESTS, Pacer

MIB = 1 << 20


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def clock(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def paced(rate=10 * MIB, burst=MIB):
    t = FakeTime()
    return Pacer(rate, burst, clock=t.clock, sleep=t.sleep), t


def test_contributions_wait_for_their_bytes():
    p, t = paced()
    assert p.pace("contrib", MIB) == 0.0  # the burst
    assert p.pace("contrib", MIB) == pytest.approx(0.1)
    assert p.pace("contrib", MIB) == pytest.approx(0.1)
    assert t.now == pytest.approx(0.2)
    s = p.status()
    assert s["paced_bytes"] == 3 * MIB and s["paced_messages"] == 3
    assert s["waited_s"] == pytest.approx(0.2)


@pytest.mark.parametrize("op", ["ping", "vote", "announce", "round", "fence", "jobs", "suspect",
                                "rank_manifest"])
def test_control_messages_never_wait(op):
    p, t = paced(rate=1, burst=1)
    for _ in range(5):
        assert p.pace(op, MIB) == 0.0
        assert p.pace(op, MIB, reply=True) == 0.0
    assert t.slept == [] and p.status()["paced_bytes"] == 0


def test_bulk_replies_are_paced_only_as_replies():
    p, t = paced(rate=MIB, burst=MIB)
    for op in PACED_REPLIES:
        assert op not in PACED_REQUESTS  # a fetch *request* carries no block
        p.pace(op, MIB)  # as a request: not held
    assert t.slept == []
    p.pace("fetch", MIB, reply=True)
    p.pace("rank_block", MIB, reply=True)
    assert t.slept == [pytest.approx(1.0)]


def test_off_by_default_and_when_rate_is_zero():
    t = FakeTime()
    p = Pacer(clock=t.clock, sleep=t.sleep)
    assert p.rate_bytes_s is None
    for _ in range(100):
        p.pace("contrib", 64 * MIB)
    p.set_rate(0)
    p.pace("contrib", 64 * MIB)
    assert t.slept == [] and p.status()["paced_bytes"] == 0


def test_set_rate_starts_a_full_bucket_and_refuses_a_negative_rate():
    p, t = paced(rate=MIB, burst=MIB)
    p.pace("contrib", 4 * MIB)  # 3 MiB in debt
    with pytest.raises(ValueError):
        p.set_rate(-5)
    assert p.rate_bytes_s == MIB  # unchanged
    p.set_rate(2 * MIB, 2 * MIB)
    assert p.pace("contrib", 2 * MIB) == 0.0


def test_concurrent_senders_share_one_budget():
    """Threads debit one bucket: together they never exceed the rate."""
    lock = threading.Lock()
    t = FakeTime()
    waits = []

    def sleep(s):  # record only: each thread's wait says where its bytes fall in line
        with lock:
            waits.append(s)

    p = Pacer(10 * MIB, MIB, clock=t.clock, sleep=sleep)
    threads = [threading.Thread(target=lambda: [p.pace("contrib", MIB) for _ in range(5)])
               for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # 20 MiB at 10 MiB/s with 1 MiB of burst: the last in line waits 1.9 s, and every
    # slot 0.1 s apart is taken exactly once
    assert sorted(round(w, 6) for w in waits) == [round(0.1 * i, 6) for i in range(1, 20)]


def test_serve_flags_configure_the_process_pacer():
    a = build_parser().parse_args(["serve", "--peer-rate", "400MiB", "--peer-burst", "8MiB"])
    assert (a.peer_rate, a.peer_burst) == (400 * MIB, 8 * MIB)
    try:
        pacing.configure(a.peer_rate, a.peer_burst)
        s = pacing.PACER.status()
        assert s["rate_bytes_s"] == 400 * MIB and s["burst_bytes"] == 8 * MIB
    finally:
        pacing.configure(0, 0)
    assert pacing.PACER.rate_bytes_s is None
    a = build_parser().parse_args(["serve"])
    assert a.peer_rate == 0  # off unless asked


@pytest.mark.parametrize("flag", [["--peer-rate", "fast"], ["--peer-burst", "-3"]])
def test_bad_flags_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *flag])
    assert "peer-" in capsys.readouterr().err


def test_peer_dscp_marks_new_peer_sockets():
    import zmq

    from snapshotd.node.peer import PeerClient, PeerServer

    a = build_parser().parse_args(["serve", "--peer-dscp", "8"])
    assert a.peer_dscp == 8
    try:
        pacing.configure(0, 0, a.peer_dscp)
        assert pacing.peer_tos() == 0x20  # CS1 in the TOS byte
        c = PeerClient("tcp://127.0.0.1:9", "a", "b", None)
        server = PeerServer("tcp://127.0.0.1:0", "b", None, None, lambda *r: None)
        try:
            assert c._socket().getsockopt(zmq.TOS) == 0x20
            assert server._sock.getsockopt(zmq.TOS) == 0x20
        finally:
            c.close()
            server.stop()
    finally:
        pacing.configure(0, 0)
    assert pacing.peer_tos() == 0
    c = PeerClient("tcp://127.0.0.1:9", "a", "b", None)
    try:
        assert c._socket().getsockopt(zmq.TOS) == 0  # unmarked by default
    finally:
        c.close()


@pytest.mark.parametrize("value", ["64", "-1", "cs1"])
def test_bad_dscp_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--peer-dscp", value])
    assert "DSCP" in capsys.readouterr().err
    with pytest.raises(ValueError):
        pacing.configure(0, 0, 64)
    assert pacing.peer_tos() == 0


def test_real_client_and_server_pace_only_bulk_payloads(monkeypatch):
    """The hooks in PeerClient and PeerServer: a contribution's block waits for the
    process's PACER before it is sent, a fetch reply's block before it is queued; a ping,
    a vote and an announce do not (a real server and client on loopback; the pacer's
    clock and sleep are fakes so nothing here depends on timing)."""
    from snapshotd.node.peer import PeerClient, PeerServer, peer_pb2 as ppb

    t = FakeTime()
    lock = threading.Lock()
    slept = []

    def sleep(s):
        with lock:
            slept.append(s)

    monkeypatch.setattr(pacing.PACER, "_clock", t.clock)
    monkeypatch.setattr(pacing.PACER, "_sleep", sleep)
    pacing.PACER.set_rate(MIB, MIB)  # 1 MiB/s, 1 MiB of burst, at fake time 0 forever
    base = pacing.PACER.status()["paced_bytes"]

    def handler(sender, req, payload):
        op = req.WhichOneof("op")
        if op == "ping":
            return ppb.PeerReply(ping=ppb.PingReply()), None
        if op == "fetch":
            return ppb.PeerReply(ack=ppb.Ack()), b"f" * MIB
        return ppb.PeerReply(ack=ppb.Ack()), None

    server = PeerServer("tcp://127.0.0.1:0", "srv", None, None, handler, inline_ops={"ping"}).start()
    c = PeerClient(server.endpoint, "cli", "srv", None)
    try:
        block = b"c" * MIB
        contrib = ppb.PeerRequest(contrib=ppb.ContribRequest(job="j", version=1, stripe=0, row=0,
                                                             position=0, block_counts=[1]))
        c.call(ppb.PeerRequest(ping=ppb.PingRequest()))
        c.call(ppb.PeerRequest(vote=ppb.VoteRequest(job="j", version=1)))
        c.call(ppb.PeerRequest(announce=ppb.AnnounceRequest(job="j", version=1, node="cli",
                                                            block_count=1)), b"m" * MIB)
        assert slept == [] and pacing.PACER.status()["paced_bytes"] == base
        c.call(contrib, block)  # the burst
        c.call(contrib, block)  # 1 MiB behind: waits 1 s
        assert slept == [pytest.approx(1.0)]
        _, got = c.call(ppb.PeerRequest(fetch=ppb.FetchRequest(job="j", version=1,
                                                               kind=ppb.BLOCK_KIND_DATA, block_index=0)))
        assert bytes(got) == b"f" * MIB
        assert slept == [pytest.approx(1.0), pytest.approx(2.0)]  # the reply queued behind it
        assert pacing.PACER.status()["paced_bytes"] == base + 3 * MIB
    finally:
        c.close()
        server.stop()
        pacing.configure(0, 0)
