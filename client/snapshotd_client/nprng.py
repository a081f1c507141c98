"""numpy's legacy global RNG state, read in ~2 us instead of ``np.random.get_state()``'s ~40.

A save records ``np.random.get_state(legacy=True)``: ``("MT19937", key, pos, has_gauss,
gauss)``. numpy builds ``key`` element by element (624 Python-level stores, ~40 us per
save). The same five values are plain memory: the MT19937 state struct ``{uint32
key[624]; int pos}`` at the bit generator's documented ``ctypes.state_address``, and
the RandomState's cached Gaussian (``has_gauss``, ``gauss``) in its ``_aug_state``
field, which no public API exposes.

``LegacyStateReader`` finds that field's place by looking at a private RandomState of
its own: the object holds a copy of the bit generator's ``bitgen_t`` (whose first word
is the state address) and ``_aug_state`` starts with a pointer to that copy. The offsets
found are used only after they were checked against ``get_state()`` on that private
generator in every case that matters (a Gaussian cached, consumed, set by
``set_state``); the global generator must be of the same classes, and before each read
its bit generator and state pointer are checked to still be the ones checked. Anything
unexpected -- another numpy layout, a replaced bit generator -- and it is
``np.random.get_state(legacy=True)`` at every call, as before.

Reads happen under the RandomState's own lock (numpy's draws hold it), so they are not
torn by a draw on another thread. The tuple is handed out again while nothing changed
(callers only read it).
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

__all__ = ["LegacyStateReader"]

log = logging.getLogger("snapshotd_client")

_KEY_WORDS = 624
_MT_BYTES = _KEY_WORDS * 4 + 4  # uint32 key[624]; int pos
_WORD = ctypes.sizeof(ctypes.c_void_p)


def _find_offsets(rs) -> tuple[int, int] | None:
    """(offset of the bitgen_t copy, offset of _aug_state) in a RandomState, or None."""
    size = type(rs).__basicsize__
    sa = rs._bit_generator.ctypes.state_address
    words = [int.from_bytes(ctypes.string_at(id(rs) + o, _WORD), "little")
             for o in range(0, size - _WORD + 1, _WORD)]
    at_state = [i * _WORD for i, w in enumerate(words) if w == sa]
    if len(at_state) != 1:
        return None
    x = at_state[0]
    at_aug = [i * _WORD for i, w in enumerate(words) if w == id(rs) + x]
    if len(at_aug) != 1 or at_aug[0] <= x or at_aug[0] + _WORD + 16 > size:
        return None
    return x, at_aug[0]


class LegacyStateReader:
    """``np.random.get_state(legacy=True)`` of numpy's global RandomState, fast when it can."""

    def __init__(self) -> None:
        self.fast = False
        self._last: tuple | None = None  # (raw bytes, the tuple made from them)
        try:
            self._setup()
        except Exception as exc:  # any surprise: the documented call at every save
            log.debug("snapshotd: numpy RNG state read with get_state(): %s", exc)
            self.fast = False

    def _setup(self) -> None:
        rand = getattr(np.random.get_state, "__self__", None)
        if rand is None or type(rand) is not np.random.RandomState:
            return
        probe = np.random.RandomState(20261207)
        if type(probe._bit_generator) is not type(rand._bit_generator) \
                or type(probe._bit_generator).__name__ != "MT19937":
            return
        offsets = _find_offsets(probe)
        if offsets is None:
            return
        self._x, self._aug = offsets
        checks = [lambda: None, probe.standard_normal, probe.standard_normal,
                  lambda: probe.random_sample(7),
                  lambda: probe.set_state(("MT19937", probe.get_state()[1], 17, 1, -1.25e-7)),
                  lambda: probe.standard_normal(3)]
        seen = set()  # the has_gauss values checked: both must have been
        for step in checks:
            step()
            ok, has_gauss = self._agrees(probe)
            if not ok:
                return
            seen.add(has_gauss)
        if seen != {0, 1}:
            return
        self._rand, self._bg = rand, rand._bit_generator
        self._sa = self._bg.ctypes.state_address
        self.fast = self._pointer_ok() and self._agrees(rand)[0]

    def _agrees(self, rs) -> tuple[bool, int]:
        """Does this reader give ``rs.get_state()``? (and its has_gauss)"""
        want = rs.get_state(legacy=True)
        got = self._tuple(self._raw(rs, rs._bit_generator.ctypes.state_address))
        return (got[0] == want[0] and got[1].dtype == want[1].dtype and np.array_equal(got[1], want[1])
                and got[2:4] == want[2:4]
                and np.float64(got[4]).tobytes() == np.float64(want[4]).tobytes()), want[3]

    def _raw(self, rs, sa: int) -> bytes:
        with rs._bit_generator.lock:  # numpy's draws hold it
            return (ctypes.string_at(sa, _MT_BYTES)
                    + ctypes.string_at(id(rs) + self._aug + _WORD, 4)
                    + ctypes.string_at(id(rs) + self._aug + _WORD + 8, 8))

    @staticmethod
    def _tuple(raw: bytes) -> tuple:
        key = np.frombuffer(raw, np.uint32, _KEY_WORDS).copy()
        pos = int(np.frombuffer(raw, np.int32, 1, _KEY_WORDS * 4)[0])
        has_gauss = int(np.frombuffer(raw, np.int32, 1, _MT_BYTES)[0])
        gauss = float(np.frombuffer(raw, np.float64, 1, _MT_BYTES + 4)[0])
        return ("MT19937", key, pos, has_gauss, gauss)

    def _pointer_ok(self) -> bool:
        rand = self._rand
        return (rand._bit_generator is self._bg
                and int.from_bytes(ctypes.string_at(id(rand) + self._x, _WORD), "little") == self._sa)

    def __call__(self) -> tuple:
        try:
            if not self.fast or not self._pointer_ok():
                return np.random.get_state(legacy=True)
            raw = self._raw(self._rand, self._sa)
        except Exception:  # never seen; the documented call from then on
            self.fast = False
            return np.random.get_state(legacy=True)
        last = self._last
        if last is not None and last[0] == raw:
            return last[1]
        t = self._tuple(raw)
        self._last = (raw, t)
        return t
