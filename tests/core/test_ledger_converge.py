"""Ranks converge on a version they can all deliver (issue 15 item 5): versions that can
never commit are abandoned at once, and a rank whose slots wait for a local rank that is
behind or away skips its snapshot instead of waiting."""

from __future__ import annotations

import pytest

from snapshotd.core.ledger import JobLedger, SlotState
from snapshotd.wire.errors import SnapshotInFlightError, SnapshotSkippedError
from snapshotd.wire.ratelimit import WarningLimiter


def _stage(led: JobLedger, rank: int, version: int, nbytes: int = 8):
    """What the store does for one AcquireStaging: note, abandon the dead, acquire."""
    led.note_asked(rank, version)
    dead, freed = led.abandon_dead()
    plan = led.acquire(rank, version, nbytes)
    led.apply_staging(plan, version)
    return dead, freed


def _save(led: JobLedger, rank: int, version: int):
    dead, freed = _stage(led, rank, version)
    return led.deliver(rank, version), dead


def test_a_rank_that_reconnects_later_frees_the_versions_it_skipped():
    led = JobLedger("j", world_size=2)
    _save(led, 0, 1)
    assert _save(led, 1, 1)[0].committed
    # the daemon restarts; rank 0 is back at step 2, rank 1 only at step 4
    _save(led, 0, 2)
    _save(led, 0, 3)
    assert led.versions() == [1, 2, 3]
    # rank 0's slots are all busy with versions rank 1 has not even started: no wait
    with pytest.raises(SnapshotSkippedError, match="wait for rank"):
        _stage(led, 0, 4)
    assert led.versions() == [1, 2, 3], "a skip gives nothing up"
    # rank 1 asks for 5: 2, 3 (and the 4 rank 0 skipped) can never commit
    d, dead = _save(led, 1, 5)
    assert dead == [2, 3] and not d.committed
    assert led.versions() == [1, 5]
    assert all(s.state is SlotState.FREE for s in led.slots[0] if s.version in (2, 3))
    d, _ = _save(led, 0, 5)
    assert d.committed and led.committed_version == 5


def test_a_version_another_rank_moved_past_is_skipped_at_once():
    led = JobLedger("j", world_size=2)
    _save(led, 0, 7)
    with pytest.raises(SnapshotSkippedError, match="never commit"):
        _stage(led, 1, 6)  # rank 0 is past 6 and never delivered it
    assert led.versions() == [7] and led.committed_version == 0
    assert _save(led, 1, 7)[0].committed


def test_a_slow_rank_is_not_starved_by_a_fast_one():
    """Ranks not in lockstep: the fast one skips while its slots are full, never drops."""
    led = JobLedger("j", world_size=2)
    for v in (1, 2, 3):
        _save(led, 0, v)
    for v in (4, 5, 6):
        with pytest.raises(SnapshotSkippedError):
            _stage(led, 0, v)
    # rank 1 was slow, not away: what it delivers commits
    for v in (1, 2, 3):
        assert _save(led, 1, v)[0].committed and led.committed_version == v


def test_versions_waiting_for_other_nodes_or_a_hand_off_under_way_still_wait():
    # one rank on this node: its versions wait for the cluster, the client waits for them
    led = JobLedger("j", world_size=2, local_world_size=1, auto_commit=False)
    for v in (1, 2, 3):
        _save(led, 0, v)
    with pytest.raises(SnapshotInFlightError) as ei:
        _stage(led, 0, 4)
    assert not isinstance(ei.value, SnapshotSkippedError)
    # two local ranks, the other one staging the version right now: a short wait
    led = JobLedger("j", world_size=2, max_slots_per_rank=2)
    _save(led, 0, 1)
    _save(led, 1, 1)
    _save(led, 0, 2)
    _stage(led, 1, 2)  # rank 1's hand-off of 2 is under way
    with pytest.raises(SnapshotInFlightError) as ei:
        _stage(led, 0, 3)
    assert not isinstance(ei.value, SnapshotSkippedError)


def test_a_job_restart_and_a_rebuild_are_not_taken_for_dead_versions():
    led = JobLedger("j", world_size=2)
    _save(led, 0, 50)
    led.abandon_uncommitted()  # the job restarts from its committed version (0)
    _save(led, 0, 1)
    assert _save(led, 1, 1)[0].committed, "the old run's asks must not make 1 dead"
    # a new run without a fence: rank 0 asks for a lower version than before
    led = JobLedger("j", world_size=2)
    _save(led, 0, 9)
    _save(led, 0, 3)
    assert _save(led, 1, 3)[0].committed
    # a rebuild installs version 8 (committed elsewhere) while rank 1's trainer is at 9
    led = JobLedger("j", world_size=2, local_world_size=2, auto_commit=False)
    led.install_committed(0, 8, 16)
    led.note_asked(1, 9)
    assert led.abandon_dead() == ([], [])
    led.install_committed(1, 8, 16)
    assert led.commit(8).committed and led.committed_version == 8


def test_warning_limiter_lets_one_through_per_interval_and_counts_the_rest():
    now = [0.0]
    lim = WarningLimiter(10.0, clock=lambda: now[0])
    assert lim.allow("a") == (True, 0)
    assert [lim.allow("a")[0] for _ in range(5)] == [False] * 5
    assert lim.allow("b") == (True, 0)  # keys are independent
    now[0] = 10.0
    ok, held = lim.allow("a")
    assert ok and held == 5 and "5 more" in lim.held_note(held)
    assert lim.allow("a") == (False, 1)
