"""The store's per-save fast paths (issue 16) do what the slow paths did.

An acquire plans on a copy of the job's ledger only when the budget could refuse it
(``TrainerStore._refuse_early``): with room to spare no copy is made, near the budget
it is, and a refusal still changes nothing.
"""

from __future__ import annotations

import copy
import os

import pytest

from snapshotd.node import store_trainer
from snapshotd.node.docfile import read_doc
from snapshotd.wire.errors import MemoryBudgetExceededError

from tests.node.test_store import deliver, make_store  # noqa: F401 (fixture)


class _CountingDeepcopy:
    def __init__(self):
        self.calls = 0
        self._deepcopy = copy.deepcopy

    def __call__(self, x, memo=None):
        self.calls += 1
        return self._deepcopy(x, memo)


@pytest.fixture
def counted(monkeypatch):
    c = _CountingDeepcopy()
    monkeypatch.setattr(store_trainer.copy, "deepcopy", c)
    return c


def test_acquire_with_room_makes_no_trial_copy(make_store, counted):
    s = make_store(budget=64 << 20)
    s.register_job("j", 1)
    for v in range(1, 6):  # the ring of 3 slots filled, then reused
        committed, _ = deliver(s, "j", 0, v, os.urandom(10_000))
        assert committed
    assert counted.calls == 0
    assert read_doc(os.path.join(s.state.state_dir, "index.json"))["jobs"]["j"]["committed_version"] == 5


def test_acquire_near_the_budget_is_planned_on_a_copy_and_refused_changing_nothing(make_store, counted):
    s = make_store(budget=25_000)
    s.register_job("j", 1)
    assert deliver(s, "j", 0, 1, os.urandom(10_000))[0]
    before = (s.stats(), s.list_versions("j"))
    n = counted.calls
    with pytest.raises(MemoryBudgetExceededError):
        s.acquire_staging("j", 0, 2, 20_000)  # 10_000 held + 20_000 > 25_000
    assert counted.calls > n  # the budget could refuse it: planned on a copy first
    after = (s.stats(), s.list_versions("j"))
    assert after[1] == before[1]
    assert after[0]["bytes_reserved"] == before[0]["bytes_reserved"]
    assert deliver(s, "j", 0, 2, os.urandom(10_000))[0]  # a fitting one still goes
