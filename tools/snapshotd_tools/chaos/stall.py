"""The ``stall_server`` fault of ``snapshotd chaos``: a daemon's peer serving thread stalled
past the heartbeat timeout while a version is in flight (issue 18).

The daemons of a chaos session are started with ``SNAPSHOTD_TEST_STALL_PEER_SERVER=@DIR``
(``arm_sessions``, DIR the session's cluster directory): a test-only hook of the peer
server (``snapshotd.node.peer.server``) that arms nothing at start, and is armed at run
time by a file ``DIR/stall-peer-server.<node>`` which the node reads and deletes at its
next peer request. Without that variable (any daemon not started by the harness) no
file is ever looked at.

``stall_serving_thread`` writes that file (``NODE:contrib:SECONDS:1:MODE``), waits for
the node to take it, then for the stall to begin (the node's own log line, logged as the
first contribution of the next version reaches it), folds the job's events while the
node is stalled and records whether its peers took it for dead; then it waits for the
trainers to be told that a version newer than every one handed over when the stall
began has committed. That time, counted from the end of the stall, is judged by
``invariants.commit_through_stall`` against the commit bound. Runs on the harness's
thread.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from snapshotd.node.peer.server import STALL_ENV
from snapshotd_tools.chaos.timeouts import PHASE_TIMEOUT_S

if TYPE_CHECKING:
    from snapshotd_tools.chaos.invariants import Observation
    from snapshotd_tools.chaos.runner import Harness

STALL_LINE = "TEST FAULT: serving thread stalls"


def arm_sessions(cluster_dir: str) -> None:
    """Let the daemons started from now on (this process's children) be stalled at run
    time through trigger files in ``cluster_dir``."""
    os.environ[STALL_ENV] = "@" + os.path.abspath(cluster_dir)


def trigger_path(cluster_dir: str, node: str) -> str:
    return os.path.join(os.path.abspath(cluster_dir), f"stall-peer-server.{node}")


def _log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _logged_since(path: str, offset: int, text: str) -> bool:
    return _count_since(path, offset, text) > 0


def _count_since(path: str, offset: int, text: str) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().count(text.encode())
    except OSError:
        return 0


def stall_serving_thread(h: Harness, node: str, seconds: float, mode: str, obs: Observation,
                         detected: list[str]) -> str:
    """Stall ``node``'s peer serving thread for ``seconds`` at the next version's first
    contribution; fills ``obs.stall`` and ``detected``; returns the fault's description."""
    rig, g = h.rig, h.g
    if os.environ.get(STALL_ENV) != "@" + os.path.abspath(rig.d):
        raise RuntimeError(f"the daemons were not started with {STALL_ENV}=@{rig.d}: cannot stall one")
    logs = {n: os.path.join(rig.d, f"{n}.log") for n in rig.nodes}
    marks = {n: _log_size(p) for n, p in logs.items()}
    log, mark = logs[node], marks[node]
    path = trigger_path(rig.d, node)
    with open(path + ".tmp", "w") as f:
        f.write(f"{node}:contrib:{seconds:g}:1:{mode}")
    os.replace(path + ".tmp", path)  # whole, or not there: the daemon never reads half a spec

    def wait(pred, what: str) -> None:
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while not pred():
            if time.monotonic() > deadline:
                if os.path.exists(path):
                    os.unlink(path)
                raise RuntimeError(f"{what} not seen within {PHASE_TIMEOUT_S:.0f} s: the fault "
                                   "could not be injected")
            g.pump(0.05)

    t_armed = time.monotonic()
    h.say(f"    {node}: stall trigger written (job at step {max(g.last.values())})")
    wait(lambda: not os.path.exists(path), f"{node} taking the stall trigger")
    wait(lambda: _logged_since(log, mark, STALL_LINE), f"{node}'s serving thread stalling")
    t_stall = time.monotonic()
    h.say(f"    {node}: serving thread stalled {t_stall - t_armed:.1f} s after the trigger "
          f"(job at step {max(g.last.values())})")
    h.drain(g, running_s=0.1)
    # Every version handed over so far was out when the stall began (some with their
    # contributions to the stalled node still unsent): the next one must commit.
    target = min(max(g.last.values()) + 1, h.steps)
    dead_after = None
    observer = next(n for n in rig.nodes if n != node)
    while time.monotonic() - t_stall < seconds:
        g.pump(0.1)
        if dead_after is None and rig.sees_dead(observer, node):
            dead_after = time.monotonic() - t_stall
    t_clear = time.time()
    deadline = time.monotonic() + obs.commit_bound_s + 1
    seen: list[float] = []
    via = "the trainers' record"
    while not seen and time.monotonic() < deadline and not any(rc != 0 for rc in g.ended.values()):
        g.pump(0.1)
        seen = [t for t, _, v in g.commits if v >= target]
        if not seen and len(g.ended) == h.n and rig.whole(target):
            # The epoch ended at the stalled version: no later hand-off can report it, so
            # the daemons' word (the restart drill then restores it, judged bit-exact).
            seen, via = [time.time()], "the daemons (the epoch ended at it)"
    obs.stall = {"node": node, "target": target, "via": via,
                 "after_s": round(max(0.0, min(seen) - t_clear), 2) if seen else None}
    # What the peers felt: requests to the stalled node that timed out (the daemons' words).
    failed = sum(_count_since(logs[n], marks[n], f" to {node} not acknowledged") for n in rig.nodes if n != node)
    pings = sum(_count_since(logs[n], marks[n], f"heartbeat to {node} failed") for n in rig.nodes if n != node)
    detected.append(f"{node} logged the stall; peers: {failed} delivery(ies) to it not acknowledged "
                    f"(re-sent), {pings} heartbeat failure(s) logged; " + (
                        f"{observer} saw it dead after {dead_after:.1f}s" if dead_after is not None
                        else f"{observer} never marked it dead"))
    return (f"{node}'s peer serving thread stalled {seconds:g}s ({mode}) at the first contribution "
            f"of the next version (job at step {target - 1})")
