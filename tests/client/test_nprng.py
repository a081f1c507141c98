"""nprng.LegacyStateReader: numpy's global RNG state read from memory must be exactly
``np.random.get_state(legacy=True)`` after anything a training script may do -- draws,
a cached Gaussian made, consumed, or put back by ``set_state`` with the same key, a
reseed, another bit generator -- and fall back to ``get_state`` when its checks fail."""

from __future__ import annotations

import numpy as np
import pytest

from snapshotd_client import nprng
from snapshotd_client.nprng import LegacyStateReader


@pytest.fixture(autouse=True)
def _global_rng_kept():
    rand = np.random.mtrand._rand
    bg, state = rand._bit_generator, np.random.get_state()
    yield
    rand._bit_generator = bg
    np.random.set_state(state)


def _same(got, want) -> None:
    assert got[0] == want[0] and got[1].dtype == want[1].dtype and np.array_equal(got[1], want[1])
    assert got[2:4] == want[2:4] and type(got[2]) is int and type(got[3]) is int
    assert np.float64(got[4]).tobytes() == np.float64(want[4]).tobytes() and type(got[4]) is float


def _gauss_put_back():
    np.random.seed(11)
    np.random.randn()  # a pair drawn: one cached
    kept = np.random.get_state()
    assert kept[3] == 1
    np.random.randn()  # the cached one consumed: the MT state as it was, has_gauss 0
    return kept


def test_every_change_reads_as_get_state():
    r = LegacyStateReader()
    assert r.fast  # this numpy's layout was recognised (else the test of the product is moot)
    steps = [lambda: None, np.random.randn, np.random.randn, lambda: np.random.rand(3),
             lambda: np.random.seed(3), lambda: np.random.seed(3), lambda: np.random.normal(size=5),
             lambda: np.random.set_state(("MT19937", np.random.get_state()[1], 7, 1, -0.0)),
             lambda: np.random.set_state(("MT19937", np.random.get_state()[1], 7, 1, 2.5))]
    for step in steps:
        step()
        _same(r(), np.random.get_state(legacy=True))
        _same(r(), np.random.get_state(legacy=True))


def test_a_cached_gaussian_put_back_at_the_same_position_is_seen():
    r = LegacyStateReader()
    kept = _gauss_put_back()
    _same(r(), np.random.get_state())
    np.random.set_state(kept)  # same key and pos as now, has_gauss 1 again
    _same(r(), kept)


def test_unchanged_state_hands_back_the_same_tuple():
    r = LegacyStateReader()
    a = r()
    assert r() is a
    np.random.rand()
    assert r() is not a


def test_another_bit_generator_falls_back_to_get_state():
    r = LegacyStateReader()
    np.random.mtrand._rand._bit_generator = np.random.MT19937(5)
    _same(r(), np.random.get_state(legacy=True))


def test_an_unrecognised_layout_falls_back_to_get_state(monkeypatch):
    monkeypatch.setattr(nprng, "_find_offsets", lambda rs: None)
    r = LegacyStateReader()
    assert not r.fast
    np.random.randn()
    _same(r(), np.random.get_state(legacy=True))


def test_offsets_that_do_not_check_out_are_not_used(monkeypatch):
    real = nprng._find_offsets

    def off_by_one_word(rs):
        x, aug = real(rs)
        return x, aug + 8
    monkeypatch.setattr(nprng, "_find_offsets", off_by_one_word)
    r = LegacyStateReader()
    assert not r.fast
    _gauss_put_back()
    _same(r(), np.random.get_state(legacy=True))


def test_a_failing_read_falls_back_for_good(monkeypatch):
    r = LegacyStateReader()
    assert r.fast

    def broken(*a):
        raise OSError("unreadable")
    monkeypatch.setattr(r, "_raw", broken)
    np.random.rand()
    _same(r(), np.random.get_state(legacy=True))
    assert not r.fast
