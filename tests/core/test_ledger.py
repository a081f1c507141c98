"""The slot ledger (pure): commits, and committing the same version twice."""

from __future__ import annotations

from snapshotd.core.ledger import JobLedger, SlotState


def _committed(led: JobLedger) -> dict[int, int]:
    return {r: s.version for r, ss in led.slots.items() for s in ss if s.state is SlotState.COMMITTED}


def test_commit_frees_older_versions_and_keeps_the_new_one():
    led = JobLedger("j", 2, auto_commit=False)
    for v in (1, 2):
        for r in (0, 1):
            led.apply_staging(led.acquire(r, v, 10), v)
            led.deliver(r, v)
        led.commit(v)
    assert _committed(led) == {0: 2, 1: 2} and led.committed_version == 2
    assert led.committed_slot(0).version == 2


def test_committing_the_committed_version_again_keeps_its_slots():
    """A rebuild and a promotion of the same version can both commit it (seen in the chaos
    soak): the second commit used to free the slots the first one committed, leaving a
    committed version with no committed slot (OpenShard then failed with an AttributeError)."""
    led = JobLedger("j", 2, local_world_size=1, auto_commit=False)
    led.install_committed(1, 9, 100)
    assert led.commit(9).committed and _committed(led) == {1: 9}
    again = led.commit(9)
    assert again.committed and again.freed == ()
    assert _committed(led) == {1: 9} and led.committed_slot(1).version == 9
    # A slot of version 9 installed after the first commit is committed by the second.
    led.install_committed(0, 9, 100)
    led.commit(9)
    assert _committed(led) == {0: 9, 1: 9}
    # An older version never un-commits anything.
    assert not led.commit(8).committed and _committed(led) == {0: 9, 1: 9}


def test_a_job_restart_keeps_the_slots_a_rebuild_is_installing():
    """A trainer restarting on a replacement node fences the job while the node rebuilds
    a version committed elsewhere (seen in the chaos matrix): freeing those pending slots
    left the rebuild to commit a version with no slot for its rank."""
    led = JobLedger("j", 2, local_world_size=1, auto_commit=False)
    led.install_committed(1, 48, 100)
    led.apply_staging(led.acquire(0, 49, 10), 49)  # an uncommitted delivery: freed
    assert led.abandon_uncommitted(keep_version=48) == [(0, 0)]
    led.commit(48)
    assert _committed(led) == {1: 48} and led.committed_slot(1).version == 48
    # Without a version to keep, every pending slot goes.
    led.install_committed(0, 50, 100)
    assert led.abandon_uncommitted() == [(0, 0)]
