"""Finding and loading ISA-L for the erasure code: the file and environment lookups core
must not do. Core (:mod:`snapshotd.core.erasure`) binds an already loaded library.

Library search order (first that loads, has the symbols and passes a tiny self-check):
  1. ``$SNAPSHOTD_ISAL_LIB`` (:data:`snapshotd.wire.config.ENV_ISAL_LIB`) -- an explicit
     path; if set and unusable this is an error (BackendUnavailableError naming it), never
     a silent fallback, even for backend "auto";
  2. the system library: ``ctypes.util.find_library("isal")``, then ``libisal.so.2``;
  3. the copy bundled in the pyeclib wheel (``site-packages/pyeclib.libs/libisal*.so*``),
     found with importlib.util.find_spec, without importing pyeclib.
:func:`isal_library_path` says which one is in use.

    code = erasure_code(4, 2)            # "auto": ISA-L if loadable, else numpy
    backend = make_backend("isal")       # or hand a backend to ErasureCode(k, m, backend)

Thread-safety: loading is cached per explicit path (one load per process); the cache is a
plain dict, so two first callers at once may both load (harmless: the same library).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os

from snapshotd.core.erasure import ErasureCode, IsalBackend, IsalLibrary, NumpyBackend
from snapshotd.wire.config import ENV_ISAL_LIB
from snapshotd.wire.errors import BackendUnavailableError, InvalidRequestError

BACKENDS = ("auto", "isal", "numpy")


def _pyeclib_candidates() -> list[str]:
    try:
        spec = importlib.util.find_spec("pyeclib")
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    out: list[str] = []
    for d in dirs:
        libs = os.path.join(os.path.dirname(os.path.abspath(d)), "pyeclib.libs")
        out.extend(sorted(glob.glob(os.path.join(libs, "libisal*.so*"))))
    return out


def candidate_paths() -> list[str]:
    """Non-explicit candidates in search order (system first, then pyeclib's copy)."""
    out: list[str] = []
    found = ctypes.util.find_library("isal")
    if found:
        out.append(found)
    out.append("libisal.so.2")
    out.extend(_pyeclib_candidates())
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def open_library(path: str) -> IsalLibrary:
    """dlopen ``path`` and bind it (symbols and self-check: core's IsalLibrary)."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise BackendUnavailableError(f"cannot load ISA-L library {path!r}: {e}") from e
    return IsalLibrary(lib, path)


_cache: dict[str | None, IsalLibrary | BackendUnavailableError] = {}


def load_library(explicit: str | None = None) -> IsalLibrary:
    """Load ISA-L. ``explicit`` (default: $SNAPSHOTD_ISAL_LIB) overrides the search."""
    if explicit is None:
        explicit = os.environ.get(ENV_ISAL_LIB) or None
    key = explicit
    hit = _cache.get(key)
    if hit is None:
        hit = _load_uncached(explicit)
        _cache[key] = hit
    if isinstance(hit, BackendUnavailableError):
        raise BackendUnavailableError(str(hit))
    return hit


def _load_uncached(explicit: str | None) -> IsalLibrary | BackendUnavailableError:
    if explicit is not None:
        try:
            return open_library(explicit)
        except BackendUnavailableError as e:
            return BackendUnavailableError(f"{ENV_ISAL_LIB}={explicit!r} is not usable: {e}")
    errors = []
    for path in candidate_paths():
        try:
            return open_library(path)
        except BackendUnavailableError as e:
            errors.append(str(e))
    return BackendUnavailableError(
        f"ISA-L not found (set {ENV_ISAL_LIB}, install libisal2, or pip install pyeclib): "
        + "; ".join(errors)
    )


def isal_library_path() -> str | None:
    """Path (or soname) of the ISA-L library the backend uses, or None if unavailable."""
    try:
        return load_library().path
    except BackendUnavailableError:
        return None


def isal_available() -> bool:
    return isal_library_path() is not None


def make_backend(backend: str = "auto"):
    """Backend object for a name; 'auto' prefers ISA-L and falls back to numpy.

    An explicitly configured but broken $SNAPSHOTD_ISAL_LIB is an error even for 'auto'.
    """
    if backend not in BACKENDS:
        raise InvalidRequestError(f"unknown erasure backend {backend!r}; choose one of {BACKENDS}")
    if backend == "numpy":
        return NumpyBackend()
    try:
        return IsalBackend(load_library())
    except BackendUnavailableError:
        if backend == "isal" or os.environ.get(ENV_ISAL_LIB):
            raise
        return NumpyBackend()


def erasure_code(k: int, m: int, backend: str = "auto") -> ErasureCode:
    """``ErasureCode(k, m)`` on the backend named (see :func:`make_backend`)."""
    return ErasureCode(k, m, backend=make_backend(backend))
