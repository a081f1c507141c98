"""SnapshotterConfig.when_busy: what a save does when every staging slot holds a version
that has not committed (the pipeline behind: parity on a shared link, a slow peer).

A real 2-node cluster (m=0): rank 0 saves on node n0, rank 1 (on n1) never does, so no
version commits and rank 0's three staging slots fill up with pending versions."""

from __future__ import annotations

import os

import pytest
import torch

from snapshotd_client import Snapshotter
from snapshotd.wire.errors import SnapshotInFlightError
from snapshotd_tools import localcluster as lc


@pytest.fixture(scope="module")
def n0_socket(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("busy") / "cluster")
    info = lc.up(d, 2, 0, block_size="64KiB", budget="256MiB", tie_to_parent=True)
    try:
        yield info["nodes"]["n0"]["socket"]
    finally:
        lc.down(d)


def _snap(sock, job, **kw):
    torch.manual_seed(0)
    return Snapshotter(torch.nn.Linear(16, 16), job_id=job, socket_path=sock, rank=0,
                       world_size=2, local_world_size=1, on_daemon_unavailable="raise", **kw)


def _fill(snap) -> None:
    for v in (1, 2, 3):
        assert snap.save(v) is not None
        snap.wait()


def _in_flight(snap, job) -> str:
    """What the daemon says when asked for one more slot: names the pending versions."""
    with pytest.raises(SnapshotInFlightError) as ei:
        snap.client.acquire_staging(job, 0, 99, 64)
    return str(ei.value)


def test_skip_returns_at_once_and_keeps_the_versions_in_flight(n0_socket):
    snap = _snap(n0_socket, "busy-skip", when_busy="skip", inflight_wait_s=600)
    _fill(snap)
    assert snap.save(4) is None  # "wait" would wait up to 600 s here
    assert snap.save(5) is None
    assert (snap.skipped, snap.skipped_busy) == (2, 2)
    # nothing was given up: a forced acquire would have freed version 1's slot
    assert "versions [1, 2, 3]" in _in_flight(snap, "busy-skip")
    snap.close()


def test_wait_gives_up_the_oldest_after_inflight_wait(n0_socket):
    snap = _snap(n0_socket, "busy-wait", inflight_wait_s=0.2)
    _fill(snap)
    assert snap.save(4) is not None  # waited 0.2 s, then forced version 1 out
    snap.wait()
    assert (snap.skipped, snap.skipped_busy) == (0, 0)
    assert "versions [2, 3, 4]" in _in_flight(snap, "busy-wait")
    snap.close()


def test_unknown_mode_is_refused(n0_socket):
    with pytest.raises(ValueError, match="when_busy"):
        _snap(n0_socket, "busy-bad", when_busy="never")


def test_mode_from_the_environment(n0_socket, monkeypatch):
    monkeypatch.setenv("SNAPSHOTD_WHEN_BUSY", "skip")
    snap = _snap(n0_socket, "busy-env")
    assert snap.cfg.when_busy == "skip"
    snap.close()


def test_one_save_may_wait_under_skip_and_skip_under_wait(n0_socket):
    # the last save of a run under "skip" must not be skipped: save(step, when_busy="wait")
    snap = _snap(n0_socket, "busy-call", when_busy="skip", inflight_wait_s=0.2)
    _fill(snap)
    assert snap.save(4) is None  # the configured mode
    assert snap.save(5, when_busy="wait") is not None  # waited 0.2 s, forced version 1 out
    snap.wait()
    assert "versions [2, 3, 5]" in _in_flight(snap, "busy-call")
    with pytest.raises(ValueError, match="when_busy"):
        snap.save(6, when_busy="never")
    assert "versions [2, 3, 5]" in _in_flight(snap, "busy-call")  # a bad argument changed nothing
    assert (snap.skipped, snap.skipped_busy) == (1, 1)
    snap.close()
    snap = _snap(n0_socket, "busy-call-w", inflight_wait_s=600)  # "wait" would wait 600 s
    _fill(snap)
    assert snap.save(4, when_busy="skip") is None
    assert (snap.skipped, snap.skipped_busy) == (1, 1)
    assert "versions [1, 2, 3]" in _in_flight(snap, "busy-call-w")
    snap.close()
