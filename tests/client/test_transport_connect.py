"""The client's gRPC channel waits for a daemon that is slow to answer a new connection.

Found by the 2-hour chaos soak under load: a relaunched rank's first call (RegisterJob, at
restore) failed at once with "connection attempt timed out before receiving SETTINGS
frame", so the restore was skipped on every rank (the job would have started over). The
channel set ``grpc.min_reconnect_backoff_ms`` to 200, which gRPC uses as the minimum
*connect timeout*: a daemon whose HTTP/2 handshake took longer than 200 ms (a loaded
machine, a busy daemon) made the channel fail, and a fail-fast call fails at once. A
call must wait for the daemon up to its own deadline.

Real daemon, real gRPC: the daemon is SIGSTOPped while a fresh client connects (the
kernel accepts the UNIX connection, the daemon answers nothing until SIGCONT).
"""

from __future__ import annotations

import signal
import threading
import time


def _wait_stopped(pid: int, timeout_s: float = 30.0) -> None:
    """Until the kernel reports the process stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.01)


def test_a_daemon_slow_to_answer_a_new_connection_is_waited_for_not_reported_unreachable(daemon):
    import grpc

    c = daemon.client(timeout_s=30)  # the import and the channel, before the clock starts
    daemon.proc.send_signal(signal.SIGSTOP)
    _wait_stopped(daemon.proc.pid)
    states: list = []
    c.channel.subscribe(states.append, try_to_connect=True)
    deadline = time.monotonic() + 30
    while grpc.ChannelConnectivity.CONNECTING not in states:  # the first attempt has begun
        assert time.monotonic() < deadline, f"the channel never tried to connect: {states}"
        time.sleep(0.005)
    # The attempt meets a frozen daemon for 1 s: longer than the 200 ms the old channel
    # options allowed a connection to take.
    resume = threading.Timer(1.0, daemon.proc.send_signal, args=(signal.SIGCONT,))
    resume.start()
    try:
        r = c.stats()
    finally:
        resume.cancel()
        daemon.proc.send_signal(signal.SIGCONT)
        c.channel.unsubscribe(states.append)
        c.close()
    assert r.node_id == daemon.node_id
    assert r.pid == daemon.proc.pid
    assert grpc.ChannelConnectivity.TRANSIENT_FAILURE not in states, states


def test_an_absent_daemon_is_still_reported_unavailable_within_the_deadline(tmp_path):
    from snapshotd.wire import errors
    from snapshotd_client.transport import DaemonClient

    c = DaemonClient.for_socket(str(tmp_path / "nobody.sock"), timeout_s=2)
    try:
        try:
            c.stats()
        except errors.DaemonUnavailableError:
            pass  # refused at once (no socket), or DEADLINE_EXCEEDED: both map here
        else:
            raise AssertionError("a call to a socket nobody listens on succeeded")
    finally:
        c.close()
