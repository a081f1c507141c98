"""``model.state_dict()`` without its walk, for a module tree that stays as it was.

Every save reads the model's state with ``state_dict()``: a recursive walk over every
module (prefixes, hooks, a ``detach()`` per tensor) that, for a model whose structure does
not change between saves, yields the same keys over the same tensors each time (~0.1 ms
for a small GPT, more for deep models). ``ModelState`` walks once as ``state_dict`` does
and keeps the recipe: the modules in walk order and what the walk read from each. Each
later call checks, with a few C-level list comparisons, that nothing the walk read has
changed -- each module's class and ``_version``; the identity of its ``_parameters``,
``_buffers`` and ``_modules`` dicts, their keys, and the identity of every value in them;
its non-persistent buffer names; that no module has state_dict hooks -- and then returns
the recipe's keys over the current tensors. On any difference it walks again.

The result equals ``state_dict()``'s (an OrderedDict with ``_metadata``; the same keys in
the same order over the same storages) with one difference: a value is the parameter or
buffer itself instead of a ``detach()``-ed alias of it (a tensor under two keys, such as
tied weights, is detached at its second key, so the values stay distinct objects as
``state_dict()``'s are). The Snapshotter only reads them, under ``no_grad``.

Models it does not cover get ``state_dict()`` at every call, as before: any module whose
class (or instance) overrides ``state_dict``, ``_save_to_state_dict`` or
``get_extra_state``, or that has state_dict pre- or post-hooks (FSDP, quantization
observers, ...), and models holding tensor subclasses (DTensor parameters, ...).
``hits`` / ``misses`` count the calls served from the recipe / walked.

Training thread only (the thread that changes the model).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import chain
from operator import itemgetter

import torch

from snapshotd_client.tensors import PLAIN_TYPES

__all__ = ["ModelState"]

_Module = torch.nn.Module
# read from each module's instance __dict__: attribute lookups on a Module cost ~5x more
_DICTS = itemgetter("_parameters", "_buffers", "_modules")
_HOOKS = itemgetter("_state_dict_pre_hooks", "_state_dict_hooks")
_NONPERSISTENT = itemgetter("_non_persistent_buffers_set")
_chain = chain.from_iterable
_OVERRIDABLE = ("state_dict", "_save_to_state_dict", "get_extra_state")


def _plain(m: _Module) -> bool:
    """Does ``m``'s part of state_dict() come from _save_to_state_dict's plain loop?"""
    tp = type(m)
    if any(getattr(tp, n, None) is not getattr(_Module, n) for n in _OVERRIDABLE):
        return False
    d = m.__dict__
    if any(n in d for n in _OVERRIDABLE):
        return False
    return not any(map(len, _HOOKS(d)))


class _Recipe:
    __slots__ = ("mods", "dicts", "types", "lens", "dict_ids", "keys_all", "value_ids",
                 "nonpersistent", "pick", "keys", "detach_at", "metadata")


def _build(model: _Module) -> _Recipe | None:
    """The recipe of ``model``'s state_dict now, or None when a module is not plain."""
    mods, keys, pick, metadata = [], [], [], OrderedDict()
    pos = 0  # position in the concatenated values of every walked module's three dicts

    def walk(m: _Module, prefix: str) -> bool:
        nonlocal pos
        if not _plain(m):
            return False
        mods.append(m)
        metadata[prefix[:-1]] = {"version": m._version}
        for name, p in m._parameters.items():
            if p is not None:
                keys.append(prefix + name)
                pick.append(pos)
            pos += 1
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                keys.append(prefix + name)
                pick.append(pos)
            pos += 1
        pos += len(m._modules)  # values() of _parameters, _buffers, _modules, module by module
        for name, sub in m._modules.items():
            if sub is not None and not walk(sub, prefix + name + "."):
                return False
        return True

    try:
        if not walk(model, ""):
            return None
    except RecursionError:
        return None
    r = _Recipe()
    r.mods = mods
    r.dicts = [m.__dict__ for m in mods]
    r.types = list(map(type, mods))
    r.lens = list(map(len, r.dicts))
    trio = list(_chain(map(_DICTS, r.dicts)))
    if not all(isinstance(x, dict) for x in trio):
        return None  # a ScriptModule's wrappers, ...
    r.dict_ids = list(map(id, trio))
    r.keys_all = list(_chain(trio))
    values = list(_chain(map(dict.values, trio)))
    r.value_ids = list(map(id, values))
    r.nonpersistent = [frozenset(x) for x in map(_NONPERSISTENT, r.dicts)]
    if any(type(values[i]) not in PLAIN_TYPES for i in pick):
        return None  # DTensor and other subclasses: as state_dict() gives them (detached)
    r.pick, r.keys, r.metadata = pick, keys, metadata
    seen: set[int] = set()
    r.detach_at = []
    for j, i in enumerate(pick):
        if id(values[i]) in seen:
            r.detach_at.append(j)
        seen.add(id(values[i]))
    return r


class ModelState:
    """``state_dict()`` of one model, from a recipe while the model stays as it was."""

    def __init__(self, model: _Module) -> None:
        self.model = model
        self._recipe: _Recipe | None = None
        self._uncovered = False
        self.hits = 0
        self.misses = 0

    def __call__(self) -> OrderedDict:
        r = self._recipe
        if r is not None:
            try:
                values = self._values(r)
            except Exception:  # an attribute the walk reads is gone: walk again
                values = None
            if values is not None:
                self.hits += 1
                sd = OrderedDict(zip(r.keys, values))
                sd._metadata = r.metadata
                return sd
        self.misses += 1
        sd = self.model.state_dict()
        if not self._uncovered:  # a model found not plain once is walked by state_dict() from then on
            try:
                self._recipe = _build(self.model) if isinstance(self.model, _Module) else None
            except Exception:  # a module unlike nn.Module's own (a ScriptModule, ...): not covered
                self._recipe = None
            self._uncovered = self._recipe is None
        return sd

    @staticmethod
    def _values(r: _Recipe) -> list | None:
        """The state's values in key order if nothing the recipe read has changed.

        A module's instance ``__dict__`` of another length (an attribute added or removed:
        an instance-level ``state_dict`` override, another ``_version``) or another class
        is a difference; so are other dict objects, keys or values (by identity) in any
        module's ``_parameters`` / ``_buffers`` / ``_modules``, other non-persistent names,
        and any state_dict hook."""
        ds = r.dicts
        if list(map(type, r.mods)) != r.types or list(map(len, ds)) != r.lens:
            return None
        trio = list(_chain(map(_DICTS, ds)))
        if list(map(id, trio)) != r.dict_ids or any(map(len, _chain(map(_HOOKS, ds)))):
            return None
        values = list(_chain(map(dict.values, trio)))
        if (list(map(id, values)) != r.value_ids or list(_chain(trio)) != r.keys_all
                or list(map(_NONPERSISTENT, ds)) != r.nonpersistent):
            return None
        out = [values[i] for i in r.pick]
        for j in r.detach_at:
            out[j] = out[j].detach()
        return out
