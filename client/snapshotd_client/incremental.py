"""Incremental snapshots, trainer side: which tensors need no copy into a reused segment.

The daemon hands each rank's staging segments out again and again (a ring of slots). With
each hand-out comes a content token (``AcquireStagingResponse.content_token``): the same
token as at this writer's previous acquire of that segment means nobody else wrote it
since (not the daemon, not another process; a restarted daemon, a new segment or another
writer gets a new token). Then the bytes this Snapshotter copied into it last time are
still there, and a tensor whose bytes provably did not change since need not be copied.

What "provably" means (docs/INCREMENTAL.md):

* Only *frozen parameters* are candidates: parameters of the model with
  ``requires_grad=False``, not in the Snapshotter's optimizer, on a storage that no
  trainable parameter, buffer or optimizer state shares. Everything else (trainable
  parameters, optimizer state, buffers, the rank's local state) is copied at every
  save, because torch does not bump
  the version counter for every kernel that writes them: the fused AdamW kernel on CPU
  leaves the counters of the parameters and moments it updates as they were, and
  BatchNorm's running statistics are updated without a bump (torch 2.13; both checked in
  ``tests/client/test_incremental.py``).
* A candidate is unchanged when (address, version counter, strides) equal those at its
  last copy into this segment. The record holds a reference to the tensor it copied, so
  that storage cannot be freed and a new one handed the same address meanwhile.
* When any tensor on a storage is copied, every candidate on it is copied too.

Not seen, so the user's promise when turning it on: a frozen parameter is written only
through itself or its views (in-place ops, ``load_state_dict``, ``copy_`` under
``no_grad``; all bump its counter), never through ``.data``, a numpy view, a raw pointer
or another process.

Per segment the tracker also keeps which blocks were written since the segment's last
successful adoption; the hand-off sends them (``IncrementalHint``) and the daemon hashes
only those blocks.

Call order: ``frozen_mask`` and ``plan`` (training thread, in save), the copy, then
``copied``, ``hint``; on the hand-off thread ``adopted`` after a successful adoption.
``save`` waits for the previous hand-off before it calls ``plan`` again, so the calls
never overlap and there is no lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snapshotd_client.tensors import PLAIN_TYPES

# Records kept: a rank's ring has 3 segments; one that leaves it (resized, released) keeps
# references to the tensors it recorded until it is dropped here.
_MAX_RECORDS = 4


def _fingerprint(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t._version, t.stride()


@dataclass
class _Record:
    """What this Snapshotter last wrote into one segment (under one content token)."""

    token: int
    lay: object  # the ShardLayout the bytes are laid out by
    fps: list  # per replicated tensor: its fingerprint at the last copy, or None
    refs: list  # the candidates copied (their storages stay allocated)
    dirty: set | None = None  # blocks written since base_version's adoption; None: unknown
    base_version: int = 0  # the last version adopted from this segment under ``token``


class IncrementalTracker:
    """Decides which replicated tensors a save may skip; see the module docstring."""

    def __init__(self, model: torch.nn.Module, optimizer=None):
        self.model, self.optimizer = model, optimizer
        self._recs: dict[str, _Record] = {}

    def frozen_mask(self, rep_tensors: list[torch.Tensor]) -> tuple[bool, ...]:
        """Per replicated tensor: may it be skipped when unchanged (a frozen parameter's
        bytes, alone on its storage with other such tensors)?"""
        in_opt = set()
        if self.optimizer is not None:
            in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        frozen, hot = set(), set()
        for p in self.model.parameters():
            if p.device.type != "cpu":
                continue
            sp = p.untyped_storage().data_ptr()
            (frozen if not p.requires_grad and id(p) not in in_opt else hot).add(sp)
        # A storage a buffer or any optimizer state shares is written by their kernels.
        hot.update(b.untyped_storage().data_ptr() for b in self.model.buffers()
                   if b.device.type == "cpu")
        if self.optimizer is not None:
            hot.update(v.untyped_storage().data_ptr() for st in self.optimizer.state.values()
                       for v in st.values() if torch.is_tensor(v) and v.device.type == "cpu")
        ok = frozen - hot
        if not ok:
            return (False,) * len(rep_tensors)
        sps = []
        for t in rep_tensors:
            sps.append(t.untyped_storage().data_ptr() if t.device.type == "cpu" else None)
        for t, sp in zip(rep_tensors, sps):
            if sp in ok and not _candidate(t):
                ok.discard(sp)  # a tensor on it we cannot vouch for: the storage is not frozen
        return tuple(sp is not None and sp in ok for sp in sps)

    def plan(self, name: str, lay, token: int, rep_tensors: list[torch.Tensor],
             mask: tuple[bool, ...]) -> frozenset[int]:
        """Indices of the replicated tensors whose bytes segment ``name`` already holds."""
        rec = self._recs.pop(name, None)
        if rec is None or not token or rec.token != token or rec.lay is not lay:
            n = len(rep_tensors)
            rec = _Record(token, lay, [None] * n, [None] * n)
        self._recs[name] = rec  # the most recently used last
        while len(self._recs) > _MAX_RECORDS:  # the oldest: a segment no longer in the ring
            self._recs.pop(next(iter(self._recs)))
        skip = {i for i, t in enumerate(rep_tensors)
                if mask[i] and rec.fps[i] is not None and _fingerprint(t) == rec.fps[i]}
        changed = {rep_tensors[i].untyped_storage().data_ptr()
                   for i in range(len(rep_tensors)) if mask[i] and i not in skip}
        if changed:
            skip = {i for i in skip if rep_tensors[i].untyped_storage().data_ptr() not in changed}
        return frozenset(skip)

    def copied(self, name: str, lay, rep_tensors: list[torch.Tensor], mask: tuple[bool, ...],
               skipped: frozenset[int], block_size: int) -> None:
        """The copy into ``name`` is done; ``skipped``: the tensors it did not copy."""
        rec = self._recs[name]
        for i, t in enumerate(rep_tensors):
            if i in skipped:
                continue
            rec.fps[i] = _fingerprint(t) if mask[i] else None
            rec.refs[i] = t if mask[i] else None
        if rec.dirty is None:
            return
        for i, slot in enumerate(lay.replicated):
            if i not in skipped:
                _mark(rec.dirty, slot.offset, slot.nbytes, block_size)
        for slot in lay.local:
            _mark(rec.dirty, slot.offset, slot.nbytes, block_size)

    def forget(self, name: str) -> None:
        """The segment's contents are unknown (a copy into it failed half way)."""
        self._recs.pop(name, None)

    def hint(self, name: str, payload_bytes: int, block_size: int):
        """(base version, token, dirty-block bitmap) for this save's adoption, or None
        when the blocks written since the last adoption are not known."""
        rec = self._recs.get(name)
        if rec is None or rec.dirty is None or not rec.base_version:
            return None
        nb = -(-payload_bytes // block_size)
        bitmap = bytearray((nb + 7) // 8)
        for b in rec.dirty:
            if b < nb:
                bitmap[b >> 3] |= 1 << (b & 7)
        return rec.base_version, rec.token, bytes(bitmap)

    def adopted(self, name: str, token: int, version: int) -> None:
        """Hand-off thread: the daemon adopted ``name`` as ``version``; its checksums are
        the base of the next hint."""
        rec = self._recs.get(name)
        if rec is not None and rec.token == token:
            rec.base_version, rec.dirty = version, set()

    def tracked(self) -> tuple[str, ...]:
        return tuple(self._recs)


def _candidate(t: torch.Tensor) -> bool:
    if type(t) not in PLAIN_TYPES or t.is_conj() or t.is_neg():
        return False
    try:
        t._version
    except RuntimeError:  # an inference tensor has no version counter
        return False
    return True


def _mark(dirty: set, offset: int, nbytes: int, block_size: int) -> None:
    if nbytes:
        dirty.update(range(offset // block_size, (offset + nbytes - 1) // block_size + 1))
