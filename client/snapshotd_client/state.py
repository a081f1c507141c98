"""Training state <-> (JSON-able metadata, list of tensors), and RNG state capture.

``flatten_state`` walks nested containers and replaces every tensor (and numpy array)
by a reference into a flat tensor list, so the structure crosses process boundaries as
JSON and the tensors as raw bytes (see ``tensors.py``). No pickle anywhere.

Encoding (JSON values): None/bool/str/list as themselves; ints in [-2**63, 2**63) as
JSON numbers, bigger ones as ``{"__int__": hex}``; floats as JSON numbers (NaN,
Infinity, -0.0 included), NaNs with a non-canonical bit pattern as
``{"__float__": bits}``; everything else as a one-tag object: ``__tensor__``,
``__ndarray__``, ``__npscalar__``, ``__tuple__``, ``__bytes__`` (base64), ``__dict__``
(key/value pairs, for dicts with a non-str or reserved key), ``__odict__``
(OrderedDict, with torch's ``_metadata`` kept). A tensor referenced twice (tied
weights) is stored once and comes back as one object.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
import struct
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch

from snapshotd_client.nprng import LegacyStateReader

FORMAT = "snapshotd.state/1"
_TAGS = frozenset({"__tensor__", "__ndarray__", "__npscalar__", "__tuple__", "__bytes__",
                   "__dict__", "__odict__", "__int__", "__float__"})
_CANON_NAN = struct.pack("<d", float("nan"))
_I64 = 1 << 63
_DTYPE_STR = re.compile(r"[<>|=]?[biufcmMSU][1-9][0-9]{0,5}(\[[0-9]{0,4}[a-zA-Z]{1,2}\])?\Z")  # numpy's dtype.str
_SUPPORTED = ("dict, list, tuple, torch.Tensor, numpy.ndarray (bool/int/uint/float/complex), "
              "numpy scalar, int, float, bool, None, str, bytes")


class _Flattener:
    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self._index: dict[int, int] = {}  # id(tensor) -> index
        self._names: set[str] = set()
        self._active: set[int] = set()  # containers on the current path (cycle check)

    def _add(self, path: tuple[str, ...], t: torch.Tensor) -> int:
        i = self._index.get(id(t))
        if i is None:
            name = "/".join(path) or "<root>"
            if name in self._names:
                name = f"{name}#{len(self.tensors)}"
            self._names.add(name)
            i = self._index[id(t)] = len(self.tensors)
            self.tensors.append((name, t))
        return i

    def enc(self, x: Any, path: tuple[str, ...]) -> Any:
        tp = type(x)
        if x is None or tp is bool or tp is str:
            return x
        if tp is int:
            return x if -_I64 <= x < _I64 else {"__int__": hex(x)}
        if tp is float:
            if x != x and struct.pack("<d", x) != _CANON_NAN:
                return {"__float__": struct.pack("<d", x).hex()}
            return x
        if isinstance(x, torch.Tensor):
            return {"__tensor__": self._add(path, x)}
        if tp is np.ndarray:
            return {"__ndarray__": self._add(path, _ndarray_tensor(x, path)), "dtype": x.dtype.str}
        if isinstance(x, np.generic) and x.dtype.kind in "biufcmMSU":
            return {"__npscalar__": x.dtype.str, "hex": x.tobytes().hex()}
        if tp is bytes:
            return {"__bytes__": base64.b64encode(x).decode("ascii")}
        if tp in (list, tuple) or isinstance(x, dict):
            if id(x) in self._active:
                raise ValueError(f"reference cycle at {_where(path)}")
            self._active.add(id(x))
            try:
                return self._container(x, tp, path)
            finally:
                self._active.discard(id(x))
        raise TypeError(f"cannot snapshot value at {_where(path)} of type "
                        f"{tp.__module__}.{tp.__qualname__}; supported: {_SUPPORTED}")

    def _container(self, x: Any, tp: type, path: tuple[str, ...]) -> Any:
        if tp is list:
            return [self.enc(v, path + (str(i),)) for i, v in enumerate(x)]
        if tp is tuple:
            return {"__tuple__": [self.enc(v, path + (str(i),)) for i, v in enumerate(x)]}
        def pairs() -> list:
            return [[self.enc(k, path + (f"<key {k!r}>",)), self.enc(v, path + (str(k),))]
                    for k, v in x.items()]

        if isinstance(x, OrderedDict):
            out: dict[str, Any] = {"__odict__": pairs()}
            md = getattr(x, "_metadata", None)
            if md is not None:
                out["_metadata"] = self.enc(md, path + ("_metadata",))
            return out
        if all(type(k) is str and k not in _TAGS for k in x):
            return {k: self.enc(v, path + (k,)) for k, v in x.items()}
        return {"__dict__": pairs()}


def _where(path: tuple[str, ...]) -> str:
    return repr("/".join(path)) if path else "the root"


def _ndarray_tensor(a: np.ndarray, path: tuple[str, ...]) -> torch.Tensor:
    if a.dtype.kind not in "biufc":
        raise TypeError(f"cannot snapshot numpy array at {_where(path)} of dtype {a.dtype}; "
                        "supported dtypes: bool, int, uint, float, complex")
    c = np.asarray(a, dtype=a.dtype.newbyteorder("="), order="C")  # keeps 0-d
    if not c.flags.writeable:
        c = c.copy()
    try:
        return torch.from_numpy(c)
    except TypeError as e:  # e.g. float128
        raise TypeError(f"cannot snapshot numpy array at {_where(path)}: {e}") from None


def flatten_state(obj: Any) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """Split ``obj`` into (JSON-able meta, [(path name, tensor), ...]).

    Tensor names are ``/``-joined paths such as ``"optimizer/state/0/exp_avg"``.
    Raises TypeError (naming the path and type) for unsupported values.
    """
    f = _Flattener()
    root = f.enc(obj, ())
    return {"format": FORMAT, "num_tensors": len(f.tensors), "root": root}, f.tensors


def unflatten_state(meta: dict, tensors_by_index: Sequence[torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``. Tensors are used as given (not copied); numpy
    arrays share memory with their tensors.

    ``meta`` comes from another process (a daemon's manifest): anything flatten_state
    could not have written (a wrong format, a tag with a value of the wrong type, a
    tensor reference out of range, an unhashable key, nesting too deep) raises
    ValueError naming it, never another exception."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"unknown state format {got!r}, expected {FORMAT!r}")
    n = meta.get("num_tensors")
    if type(n) is not int or n < 0 or "root" not in meta:
        raise ValueError("state metadata needs a non-negative int num_tensors and a root")
    if len(tensors_by_index) < n:
        raise ValueError(f"meta references {n} tensors, got {len(tensors_by_index)}")
    try:
        return _Decoder(tensors_by_index, n).dec(meta["root"])
    except RecursionError:
        raise ValueError("state metadata is nested too deeply") from None


def _bad(what: str, x: Any) -> ValueError:
    return ValueError(f"malformed state metadata: {what} in {str(x)[:120]}")


class _Decoder:
    """Decodes the JSON values of :func:`flatten_state`; refuses anything else (ValueError)."""

    def __init__(self, tensors: Sequence[torch.Tensor], n: int):
        self.tensors, self.n = tensors, n

    def tensor(self, i: Any, x: Any) -> torch.Tensor:
        if type(i) is not int or not 0 <= i < self.n:
            raise _bad(f"tensor reference {str(i)[:40]} is not in [0, {self.n})", x)
        return self.tensors[i]

    def pairs(self, items: Any, x: Any) -> list:
        if type(items) is not list or any(type(kv) is not list or len(kv) != 2 for kv in items):
            raise _bad("key/value pairs expected", x)
        out = [(self.dec(k), self.dec(v)) for k, v in items]
        for k, _ in out:
            try:
                hash(k)
            except TypeError:
                raise _bad(f"unhashable key of type {type(k).__name__}", x) from None
        return out

    @staticmethod
    def text(v: Any, x: Any) -> str:
        if type(v) is not str:
            raise _bad("a string expected", x)
        return v

    def dec(self, x: Any) -> Any:
        if type(x) is list:
            return [self.dec(v) for v in x]
        if type(x) is not dict:
            return x
        if "__tensor__" in x:
            return self.tensor(x["__tensor__"], x)
        if "__ndarray__" in x:
            return self.ndarray(x)
        if "__tuple__" in x:
            if type(x["__tuple__"]) is not list:
                raise _bad("__tuple__ needs a list", x)
            return tuple(self.dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return dict(self.pairs(x["__dict__"], x))
        if "__odict__" in x:
            od = OrderedDict(self.pairs(x["__odict__"], x))
            if "_metadata" in x:
                od._metadata = self.dec(x["_metadata"])  # type: ignore[attr-defined]
            return od
        if "__bytes__" in x:
            try:
                return base64.b64decode(self.text(x["__bytes__"], x), validate=True)
            except binascii.Error:
                raise _bad("__bytes__ is not base64", x) from None
        if "__int__" in x:
            return int(self.text(x["__int__"], x), 16)  # ValueError if not hex
        if "__float__" in x:
            raw = bytes.fromhex(self.text(x["__float__"], x))
            if len(raw) != 8:
                raise _bad("__float__ needs 8 bytes", x)
            return struct.unpack("<d", raw)[0]
        if "__npscalar__" in x:
            dt = self.dtype(x["__npscalar__"], "biufcmMSU", x)
            raw = bytes.fromhex(self.text(x.get("hex"), x))
            if dt.itemsize == 0 or len(raw) != dt.itemsize:
                raise _bad(f"{len(raw)} bytes for a scalar of {dt}", x)
            return np.frombuffer(raw, dtype=dt)[0]
        return {k: self.dec(v) for k, v in x.items()}

    def ndarray(self, x: dict) -> np.ndarray:
        t = self.tensor(x["__ndarray__"], x)
        dt = self.dtype(x.get("dtype"), "biufc", x)
        try:
            a = t.numpy()
        except TypeError as e:  # a dtype numpy lacks (bfloat16, ...): not one we wrote
            raise _bad(f"tensor {x['__ndarray__']} cannot be a numpy array ({e})", x) from None
        if a.dtype.kind != dt.kind or a.dtype.itemsize != dt.itemsize:
            raise _bad(f"tensor of {a.dtype} for an array of {dt}", x)
        return a if a.dtype == dt else a.astype(dt)

    def dtype(self, name: Any, kinds: str, x: Any) -> np.dtype:
        text = self.text(name, x)
        if not _DTYPE_STR.match(text):  # np.dtype parses far more (and raises anything)
            raise _bad(f"numpy dtype {text[:40]!r} is not one a snapshot holds", x)
        try:
            dt = np.dtype(text)
        except (TypeError, ValueError):
            raise _bad(f"unknown numpy dtype {str(name)[:40]!r}", x) from None
        if dt.kind not in kinds or dt.fields is not None or dt.subdtype is not None:
            raise _bad(f"numpy dtype {dt} is not one a snapshot holds", x)
        return dt


def dumps_meta(meta: dict) -> str:
    """JSON text of ``meta`` (NaN/Infinity allowed). Key order is the insertion order,
    which flatten_state makes deterministic and which round trips dict order exactly."""
    return json.dumps(meta, allow_nan=True, separators=(",", ":"), ensure_ascii=False)


def loads_meta(text: str | bytes) -> dict:
    """Parse ``dumps_meta`` output: a JSON object, else ValueError (as for invalid JSON,
    invalid UTF-8 or nesting too deep)."""
    try:
        meta = json.loads(text)
    except RecursionError:
        raise ValueError("state metadata is nested too deeply") from None
    if not isinstance(meta, dict):
        raise ValueError(f"state metadata must be a JSON object, not {type(meta).__name__}")
    return meta


def capture_rng_state(packed: bool = False, numpy_state=None) -> dict:
    """RNG states of python ``random``, numpy's legacy global RandomState, torch CPU,
    and every CUDA device (only if CUDA is available and already initialised).

    ``packed``: python's 625 state words as one int64 tensor instead of a tuple of ints
    (what ``Snapshotter.save`` records: it is copied as 5 KB of bytes rather than walked
    and written as 625 JSON numbers at every save). ``restore_rng_state`` takes both.
    ``numpy_state``: what reads numpy's state (default ``np.random.get_state(legacy=True)``;
    ``PackedRngCapture`` passes its ``nprng`` reader)."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    py = random.getstate()
    if packed:
        py = (py[0], torch.from_numpy(np.array(py[1], dtype=np.int64)), py[2])  # 3x torch.tensor's speed
    return {"python": py, "numpy": numpy_state() if numpy_state else np.random.get_state(legacy=True),
            "torch": torch.get_rng_state(), "cuda": cuda}


class PackedRngCapture:
    """``capture_rng_state(packed=True)``, with python's state words made into a tensor
    only when they changed since the last call (a loop that does not use ``random``
    leaves them as they are), and numpy's read from its memory (``nprng``). The tensor
    and the numpy tuple of an earlier call may be handed out again: callers only read
    them (the Snapshotter copies them into the staging segment)."""

    def __init__(self) -> None:
        self._words: tuple | None = None
        self._tensor: torch.Tensor | None = None
        self._numpy = LegacyStateReader()  # np.random.get_state(legacy=True), ~10x faster

    def __call__(self) -> dict:
        d = capture_rng_state(numpy_state=self._numpy)
        version, words, gauss = d["python"]
        if words != self._words:
            self._tensor = torch.from_numpy(np.array(words, dtype=np.int64))
            self._words = words
        d["python"] = (version, self._tensor, gauss)
        return d


def restore_rng_state(d: dict) -> None:
    """Set every RNG back to a ``capture_rng_state`` result (also after a
    flatten/JSON/unflatten round trip, or with lists where tuples were).

    All or nothing: a state that is not one (it came from a snapshot's metadata) raises
    ValueError and leaves every RNG as it was. RuntimeError when the snapshot holds CUDA
    RNG states and CUDA is not available."""
    if not isinstance(d, dict):
        raise ValueError(f"malformed RNG state in the snapshot: a dict expected, not {type(d).__name__}")
    cuda = d.get("cuda") or []
    if not isinstance(cuda, (list, tuple)):
        raise ValueError(f"malformed RNG state in the snapshot: cuda is a {type(cuda).__name__}")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"snapshot holds RNG state for {len(cuda)} CUDA devices "
                           "but CUDA is not available here")
    saved = capture_rng_state()
    try:
        _set_rng_state(d)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as e:
        _set_rng_state(saved)
        raise ValueError(f"malformed RNG state in the snapshot ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


def _set_rng_state(d: dict) -> None:
    version, inner, gauss = d["python"]
    if gauss is not None and type(gauss) is not float:
        raise TypeError("python gauss_next must be a float or None")
    if isinstance(inner, torch.Tensor):  # capture_rng_state(packed=True)
        if inner.dtype != torch.int64 or inner.dim() != 1:
            raise ValueError(f"python RNG state words: {inner.dtype} of shape {tuple(inner.shape)}")
        inner = inner.tolist()
    random.setstate((int(version), tuple(int(v) for v in inner), gauss))
    name, keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos),
                         int(has_gauss), float(cached)))
    state = torch.as_tensor(d["torch"], dtype=torch.uint8).contiguous()
    if state.shape != torch.get_rng_state().shape:
        raise ValueError(f"torch RNG state of shape {tuple(state.shape)}")
    torch.set_rng_state(state)
    cuda = list(d.get("cuda") or [])
    if cuda:
        torch.cuda.set_rng_state_all(
            [torch.as_tensor(s, dtype=torch.uint8).contiguous() for s in cuda])
