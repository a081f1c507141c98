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
import json
import random
import struct
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch

FORMAT = "snapshotd.state/1"
_TAGS = frozenset({"__tensor__", "__ndarray__", "__npscalar__", "__tuple__", "__bytes__",
                   "__dict__", "__odict__", "__int__", "__float__"})
_CANON_NAN = struct.pack("<d", float("nan"))
_I64 = 1 << 63
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
    arrays share memory with their tensors."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown state format {meta.get('format')!r}, expected {FORMAT!r}")
    if len(tensors_by_index) < meta["num_tensors"]:
        raise ValueError(f"meta references {meta['num_tensors']} tensors, "
                         f"got {len(tensors_by_index)}")

    def dec(x: Any) -> Any:
        if type(x) is list:
            return [dec(v) for v in x]
        if type(x) is not dict:
            return x
        if "__tensor__" in x:
            return tensors_by_index[x["__tensor__"]]
        if "__ndarray__" in x:
            a = tensors_by_index[x["__ndarray__"]].numpy()
            dt = np.dtype(x["dtype"])
            return a if a.dtype == dt else a.astype(dt)
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {dec(k): dec(v) for k, v in x["__dict__"]}
        if "__odict__" in x:
            od = OrderedDict((dec(k), dec(v)) for k, v in x["__odict__"])
            if "_metadata" in x:
                od._metadata = dec(x["_metadata"])  # type: ignore[attr-defined]
            return od
        if "__bytes__" in x:
            return base64.b64decode(x["__bytes__"])
        if "__int__" in x:
            return int(x["__int__"], 16)
        if "__float__" in x:
            return struct.unpack("<d", bytes.fromhex(x["__float__"]))[0]
        if "__npscalar__" in x:
            return np.frombuffer(bytes.fromhex(x["hex"]), dtype=np.dtype(x["__npscalar__"]))[0]
        return {k: dec(v) for k, v in x.items()}

    return dec(meta["root"])


def dumps_meta(meta: dict) -> str:
    """JSON text of ``meta`` (NaN/Infinity allowed). Key order is the insertion order,
    which flatten_state makes deterministic and which round trips dict order exactly."""
    return json.dumps(meta, allow_nan=True, separators=(",", ":"), ensure_ascii=False)


def loads_meta(text: str | bytes) -> dict:
    """Parse ``dumps_meta`` output."""
    return json.loads(text)


def capture_rng_state() -> dict:
    """RNG states of python ``random``, numpy's legacy global RandomState, torch CPU,
    and every CUDA device (only if CUDA is available and already initialised)."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {"python": random.getstate(), "numpy": np.random.get_state(legacy=True),
            "torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(d: dict) -> None:
    """Set every RNG back to a ``capture_rng_state`` result (also after a
    flatten/JSON/unflatten round trip, or with lists where tuples were)."""
    version, inner, gauss = d["python"]
    random.setstate((int(version), tuple(int(v) for v in inner), gauss))
    name, keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos),
                         int(has_gauss), float(cached)))
    torch.set_rng_state(torch.as_tensor(d["torch"], dtype=torch.uint8).contiguous())
    cuda = list(d.get("cuda") or [])
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"snapshot holds RNG state for {len(cuda)} CUDA devices "
                               "but CUDA is not available here")
        torch.cuda.set_rng_state_all(
            [torch.as_tensor(s, dtype=torch.uint8).contiguous() for s in cuda])
