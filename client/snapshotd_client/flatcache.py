"""``state.flatten_state`` cached across saves, for a state whose structure stays put.

A save flattens the same model and optimizer state every time: the same containers,
keys and leaf kinds; only tensor objects (``state_dict()`` detaches afresh) and a few
scalars (an LR a scheduler moves) differ. ``FlatCache.flatten(obj)`` checks ``obj``
against the template of its last full walk with a few C-level list comparisons per
container -- container types, keys and their types, the types of all values (so which
leaves are tensors and which scalars), the pattern of tensors met twice -- and on a
match returns the last walk's tensor names with this call's tensors, and metadata whose
JSON text (``MetaText.json()``) is the template's with this call's scalar leaves written
in. Anything else (a new key or param group, a tensor where a scalar was, a scalar of
another type, keys that are not str/int/bool/None, dict subclasses) is a full
``flatten_state`` walk, which also raises its errors, and a new template.

The result always equals what ``flatten_state`` gives for ``obj`` now: the same
(name, tensor) pairs, and ``MetaText.json() == dumps_meta(meta)``. A template is kept
only if, when built, its text equals ``dumps_meta`` of that full walk's metadata.

Thread-safety: ``flatten`` on one thread (the training thread); ``MetaText.json()`` on
any (a template is never changed once built, and a MetaText holds its own values).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from itertools import chain
from operator import is_ as _is
from typing import Any

import numpy as np
import torch

from snapshotd_client import state as st

__all__ = ["FlatCache", "MetaText", "compose_meta_json"]

_HOLE = object()  # a scalar leaf's place in a template's text
_T, _S = "T", "S"  # a tensor leaf, a scalar leaf
_I64 = 1 << 63
_SCALARS = frozenset({type(None), bool, str, int, float, bytes})
_KEYS = frozenset({type(None), bool, str, int})
_enc_str = json.encoder.encode_basestring  # json.dumps(ensure_ascii=False) of a str
_chain = chain.from_iterable
_FLOAT_WORDS = {float("inf"): "Infinity", float("-inf"): "-Infinity"}


class _Arr:
    """A numpy array leaf of dtype ``dt`` (its ``dtype.str``): a new tensor at every walk."""

    __slots__ = ("dt",)

    def __init__(self, dt: str) -> None:
        self.dt = dt


class _Unsupported(Exception):
    """A structure the template does not cover (every call takes the full walk)."""


def _scalar_json(v: Any) -> str:
    """dumps_meta of ``flatten_state``'s encoding of the scalar leaf ``v``."""
    tp = type(v)
    if tp is int and -_I64 <= v < _I64:
        return int.__repr__(v)
    if tp is float and v == v:
        return _FLOAT_WORDS.get(v) or float.__repr__(v)
    if tp is str:
        return _enc_str(v)
    if tp is bool:
        return "true" if v else "false"
    if v is None:
        return "null"
    return st.dumps_meta(st._Flattener().enc(v, ()))  # NaN, big ints, bytes, numpy scalars


class MetaText:
    """The metadata of one flatten, written as JSON text on demand (``json()``).

    ``memo``: a one-item list shared by the MetaTexts of one template, holding the
    scalar values and their texts of the last ``json()``; a value that is the very same
    object as the last one's at its position (an unchanged LR, the param-group indices,
    flags) reuses its text, so only the values that changed are written. An identical
    object is an identical immutable scalar of the same type, so its text is the same;
    the memo holds the objects, so their ids are not reused meanwhile."""

    __slots__ = ("_meta", "_parts", "_vals", "_memo")

    def __init__(self, meta: dict | None = None, parts: tuple = (), vals: list | None = None,
                 memo: list | None = None):
        self._meta, self._parts, self._vals, self._memo = meta, parts, vals, memo

    def json(self) -> str:
        if self._meta is not None:
            return st.dumps_meta(self._meta)
        parts, vals, memo = self._parts, self._vals, self._memo
        last = memo[0] if memo is not None else None
        if last is not None and len(last[0]) == len(vals):
            texts = [t if same else _scalar_json(v)
                     for v, t, same in zip(vals, last[1], map(_is, vals, last[0]))]
        else:
            texts = list(map(_scalar_json, vals))
        if memo is not None:
            memo[0] = (vals, texts)  # one assignment: another thread sees the old or the new pair
        out = [None] * (2 * len(vals) + 1)
        out[0::2] = parts
        out[1::2] = texts
        return "".join(out)


def compose_meta_json(rep: MetaText, local: MetaText, world_size: int) -> str:
    """The manifest's meta_json: ``dumps_meta({"replicated": ..., "local": ...,
    "world_size": ...})`` with the two parts' text from their MetaText."""
    return ('{"replicated":' + rep.json() + ',"local":' + local.json()
            + ',"world_size":' + _scalar_json(world_size) + "}")


class _Builder:
    """Walks a state as ``_Flattener.enc`` does, writing the template: its nodes, its
    text (str pieces and _HOLE), and the tensors met (every occurrence, in order)."""

    def __init__(self) -> None:
        self.out: list = []
        self.occ: list[torch.Tensor] = []
        self.index: dict[int, int] = {}
        self.vals: list = []

    def walk(self, x: Any):
        tp = type(x)
        if isinstance(x, torch.Tensor):
            i = self.index.setdefault(id(x), len(self.index))
            self.occ.append(x)
            self.out.append('{"__tensor__":%d}' % i)
            return _T
        if tp is np.ndarray:
            i = len(self.index)
            self.index[-1 - i] = i  # never an id: an array's tensor is new at every walk
            self.occ.append(None)
            self.out.append('{"__ndarray__":%d,"dtype":%s}' % (i, _enc_str(x.dtype.str)))
            return _Arr(x.dtype.str)
        if tp is list or tp is tuple:
            return self.seq(x, tp)
        if tp is dict or tp is OrderedDict:  # subclasses: the full walk every time
            return self.mapping(x, tp)
        if tp in _SCALARS or (isinstance(x, np.generic) and tp is not np.ndarray):
            self.vals.append(x)
            self.out.append(_HOLE)
            return _S
        raise _Unsupported(tp)

    def seq(self, x, tp):
        self.out.append("[" if tp is list else '{"__tuple__":[')
        kids = []
        for j, v in enumerate(x):
            if j:
                self.out.append(",")
            kids.append(self.walk(v))
        self.out.append("]" if tp is list else "]}")
        return _node("s", tp, None, None, list(map(type, x)), kids, None)

    def mapping(self, x, tp):
        keys = list(x)
        ktypes = list(map(type, keys))
        if any(kt not in _KEYS or (kt is int and not -_I64 <= k < _I64)
               for k, kt in zip(keys, ktypes)):
            raise _Unsupported("key type")
        odict = isinstance(x, OrderedDict)
        kids = []
        if not odict and all(kt is str and k not in st._TAGS for k, kt in zip(keys, ktypes)):
            self.out.append("{")
            for j, (k, v) in enumerate(x.items()):
                self.out.append(("," if j else "") + _enc_str(k) + ":")
                kids.append(self.walk(v))
            self.out.append("}")
            return _node("m", tp, keys, ktypes, list(map(type, x.values())), kids, None)
        self.out.append('{"__odict__":[' if odict else '{"__dict__":[')
        for j, (k, v) in enumerate(x.items()):
            self.out.append(("," if j else "") + "[" + json.dumps(k, ensure_ascii=False) + ",")
            kids.append(self.walk(v))
            self.out.append("]")
        self.out.append("]")
        md = getattr(x, "_metadata", None) if odict else None
        md_spec = None
        if md is not None:
            self.out.append(',"_metadata":')
            md_spec = (type(md), self.walk(md))
        self.out.append("}")
        return _node("o" if odict else "m", tp, keys, ktypes, list(map(type, x.values())),
                     kids, md_spec)


def _node(kind, tp, keys, ktypes, vtypes, kids, md):
    flag = "T" if all(k is _T for k in kids) else "S" if all(k is _S for k in kids) else ""
    bulk = None
    if kids and not flag and all(type(k) is tuple and k[0] == "m" and k[1] is dict
                                 and k[6] == kids[0][6] in ("T", "S") for k in kids):
        # children that are all plain dicts of tensors only (or scalars only), such as
        # the optimizer's per-parameter states: checked together, a few passes in C
        flag = "H" + kids[0][6]
        bulk = ([tuple(k[2]) for k in kids], [t for k in kids for t in k[3]],
                [t for k in kids for t in k[4]])
    return (kind, tp, keys, ktypes, vtypes, tuple(kids), flag, md, bulk)


def _match(x: Any, node, occ: list, vals: list) -> bool:
    """Does ``x`` have ``node``'s structure? Appends its tensors and scalar leaves."""
    kind, tp, keys, ktypes, vtypes, kids, flag, md, bulk = node
    if type(x) is not tp:
        return False
    if kind == "s":
        vs = x
        if len(vs) != len(vtypes) or list(map(type, vs)) != vtypes:
            return False
    else:
        if len(x) != len(keys):
            return False
        ks = list(x)
        if ks != keys or list(map(type, ks)) != ktypes:
            return False
        vs = list(x.values())
        if list(map(type, vs)) != vtypes:
            return False
        if kind == "o":
            m = getattr(x, "_metadata", None)
            if md is None:
                if m is not None:
                    return False
            elif type(m) is not md[0]:
                return False
    if flag == "T":
        occ.extend(vs)
    elif flag == "S":
        vals.extend(vs)
    elif flag:  # "HT" / "HS": every value a plain dict of tensors / of scalars
        ks = list(map(tuple, vs))
        if ks != bulk[0] or list(map(type, _chain(ks))) != bulk[1]:
            return False
        leaves = list(_chain(map(dict.values, vs)))
        if list(map(type, leaves)) != bulk[2]:
            return False
        (occ if flag == "HT" else vals).extend(leaves)
    else:
        for v, k in zip(vs, kids):
            if k is _T:
                occ.append(v)
            elif k is _S:
                vals.append(v)
            elif not _other(v, k, occ, vals):
                return False
    if kind == "o" and md is not None:
        return _other(x._metadata, md[1], occ, vals)
    return True


def _other(v: Any, k, occ: list, vals: list) -> bool:
    if k is _T:
        occ.append(v)
    elif k is _S:
        vals.append(v)
    elif type(k) is _Arr:
        if v.dtype.str != k.dt:
            return False
        occ.append(st._ndarray_tensor(v, ()))
    else:
        return _match(v, k, occ, vals)
    return True


class FlatCache:
    """``flatten_state`` with the last full walk's template kept (module docstring).
    ``hits`` / ``misses`` count the calls that matched it / walked in full."""

    def __init__(self) -> None:
        # (root node, text parts, names, pattern of the tensor occurrences or None when
        # each tensor occurs once, the MetaTexts' memo)
        self._tmpl: tuple | None = None
        self.hits = 0
        self.misses = 0

    def flatten(self, obj: Any) -> tuple[MetaText, list[tuple[str, torch.Tensor]]]:
        """(metadata, [(name, tensor), ...]) as ``flatten_state`` gives them."""
        meta, names, tensors = self.split(obj)
        return meta, list(zip(names, tensors))

    def split(self, obj: Any) -> tuple[MetaText, tuple[str, ...], list[torch.Tensor]]:
        """``flatten`` with the names and the tensors apart; while the template holds,
        the names are the same tuple object at every call."""
        t = self._tmpl
        if t is not None:
            occ: list = []
            vals: list = []
            try:
                ok = _match(obj, t[0], occ, vals)
            except RecursionError:
                ok = False
            if ok:
                tensors = self._tensors(t, occ)
                if tensors is not None:
                    self.hits += 1
                    return MetaText(parts=t[1], vals=vals, memo=t[4]), t[2], tensors
        self.misses += 1
        meta, named = st.flatten_state(obj)  # raises what a fresh walk raises
        self._tmpl = tmpl = _template(obj, meta, named)
        names = tmpl[2] if tmpl is not None else tuple(n for n, _ in named)
        return MetaText(meta=meta), names, [x for _, x in named]

    @staticmethod
    def _tensors(t, occ: list):
        """The distinct tensors of ``occ`` (every tensor met, in order), or None when
        the tensors met more than once are not those of the template."""
        pattern = t[3]
        if pattern is None:
            if len(set(map(id, occ))) != len(occ):
                return None  # a tensor now met twice
            return occ
        first: dict[int, int] = {}
        pat = [first.setdefault(id(x), len(first)) for x in occ]
        if pat != pattern:
            return None
        uniq = [None] * len(first)
        for i, x in zip(pat, occ):
            uniq[i] = x
        return uniq


def _template(obj: Any, meta: dict, named: list) -> tuple | None:
    """The template of ``obj`` (just walked in full: ``meta``, ``named``), or None
    when it is not one the cache covers or its text would not be ``dumps_meta``'s."""
    b = _Builder()
    try:
        root = b.walk(obj)
    except (_Unsupported, RecursionError):
        return None
    if not isinstance(root, tuple):
        return None
    pieces, cur = [], ['{"format":' + _enc_str(st.FORMAT) + ',"num_tensors":%d,"root":' % len(b.index)]
    for p in b.out + ["}"]:
        if p is _HOLE:
            pieces.append("".join(cur))
            cur = []
        else:
            cur.append(p)
    pieces.append("".join(cur))
    parts = tuple(pieces)
    if len(named) != len(b.index) or any(
            k >= 0 and k != id(x) for k, (_, x) in zip(b.index, named)):
        return None
    first: dict[int, int] = {}
    pattern = [first.setdefault(id(x) if x is not None else -1 - j, len(first))
               for j, x in enumerate(b.occ)]
    if MetaText(parts=parts, vals=b.vals).json() != st.dumps_meta(meta):
        return None
    names = tuple(n for n, _ in named)
    return (root, parts, names, None if len(first) == len(pattern) else pattern, [None])
