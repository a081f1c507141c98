"""The durable tier's storage and layout, shared by the daemon (writes) and the client (reads).

Layout under the durable URL (``--durable-url``), one folder per job and version::

    URL/JOB/v000000000012/.metadata              DCP's Metadata (pickle: DCP's own format)
    URL/JOB/v000000000012/__3_0.distcp           rank 3's items, as FileSystemWriter writes them
    URL/JOB/v000000000012/parts/NODE.json        one node's part record (JSON)
    URL/JOB/v000000000012/snapshotd_index.json   the commit: every file, its size and xxh3 (JSON)
    URL/JOB/latest.json                          a hint: the newest complete version (JSON)

A version is *complete* only once its index exists, and the index is written last, after
every file it names is durable; a reader trusts an index only when every file it names has
the size and xxh3 the index gives (:func:`verify_version`). ``latest.json`` is a hint for
people and stock tools; readers scan the indexes (:func:`newest_verified`).

Stores (:func:`open_store`): :class:`PosixStore` for a local or NFS directory (a file is
written to a temporary name, fsynced, renamed into place and its folder fsynced), and
:class:`FsspecStore` for any other fsspec URL (s3:// through s3fs: an object appears whole
when its upload completes, or not at all). Both are thread-safe for distinct paths.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Iterable

import xxhash

from snapshotd.wire import config as c
from snapshotd.wire.errors import ChecksumMismatchError, SnapshotdError, VersionNotFoundError

FORMAT = "snapshotd-durable/1"
INDEX = "snapshotd_index.json"
METADATA = ".metadata"
PARTS = "parts"
LATEST = "latest.json"
_VERSION_RE = re.compile(r"^v(\d{12})$")
_READ_CHUNK = 8 << 20


def version_dir(version: int) -> str:
    return f"v{version:012d}"


def rank_file(rank: int) -> str:
    """The file of one rank's items: DCP's FileSystemWriter names them ``__{rank}_{n}.distcp``."""
    return f"__{rank}_0.distcp"


@dataclass(frozen=True)
class FileDigest:
    nbytes: int
    xxh3: str  # hex of xxh3_64

    def to_json(self) -> dict:
        return {"bytes": self.nbytes, "xxh3": self.xxh3}


class DurableStore:
    """A durable URL's files by relative path ("JOB/v.../name"). See the module docstring."""

    url: str

    def write_with(self, rel: str, produce) -> FileDigest:  # pragma: no cover - interface
        """Write ``rel`` so that it exists whole or not at all: ``produce(write)`` calls
        ``write(bytes-like)`` for each piece, in order (each piece is written, and may be
        reused by the caller, once ``write`` returns)."""
        raise NotImplementedError

    def write(self, rel: str, chunks: Iterable) -> FileDigest:
        """Write ``rel`` from ``chunks`` (bytes-like), whole or not at all."""
        return self.write_with(rel, lambda w: [w(c) for c in chunks])

    def write_bytes(self, rel: str, data: bytes) -> FileDigest:
        return self.write(rel, [data])

    def read_bytes(self, rel: str) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def read_chunks(self, rel: str):  # pragma: no cover - interface
        raise NotImplementedError

    def listdir(self, rel: str) -> list[str]:  # pragma: no cover - interface
        """Names in folder ``rel`` ([] if it does not exist)."""
        raise NotImplementedError

    def size(self, rel: str) -> int | None:  # pragma: no cover - interface
        raise NotImplementedError

    def remove_tree(self, rel: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def local_path(self, rel: str) -> str | None:
        """A path stock tools can open (``dcp.load(checkpoint_id=...)``), or None."""
        return None


class PosixStore(DurableStore):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root
        os.makedirs(self.root, exist_ok=True)

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def local_path(self, rel: str) -> str | None:
        return self._p(rel)

    def write_with(self, rel: str, produce) -> FileDigest:
        path = self._p(rel)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        h, n = xxhash.xxh3_64(), 0
        try:
            with open(tmp, "wb") as f:
                def write(chunk) -> None:
                    nonlocal n
                    mv = memoryview(chunk).cast("B")
                    h.update(mv)
                    f.write(mv)
                    n += len(mv)

                produce(write)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(folder)
        return FileDigest(n, h.hexdigest())

    def read_bytes(self, rel: str) -> bytes:
        with open(self._p(rel), "rb") as f:
            return f.read()

    def read_chunks(self, rel: str):
        with open(self._p(rel), "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                yield chunk

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, rel: str) -> int | None:
        try:
            return os.stat(self._p(rel)).st_size
        except FileNotFoundError:
            return None

    def remove_tree(self, rel: str) -> None:
        import shutil

        shutil.rmtree(self._p(rel), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsspecStore(DurableStore):
    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write_with(self, rel: str, produce) -> FileDigest:
        h, n = xxhash.xxh3_64(), 0
        with self.fs.open(self._p(rel), "wb") as f:  # the object appears on close, whole
            def write(chunk) -> None:
                nonlocal n
                mv = memoryview(chunk).cast("B")
                h.update(mv)
                f.write(bytes(mv))  # fsspec buffers what it is given
                n += len(mv)

            produce(write)
        return FileDigest(n, h.hexdigest())

    def read_bytes(self, rel: str) -> bytes:
        self.fs.invalidate_cache(self._p(rel))  # another node may have replaced it
        return self.fs.cat_file(self._p(rel))

    def read_chunks(self, rel: str):
        self.fs.invalidate_cache(self._p(rel))
        with self.fs.open(self._p(rel), "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                yield chunk

    def listdir(self, rel: str) -> list[str]:
        try:
            names = self.fs.ls(self._p(rel), detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def size(self, rel: str) -> int | None:
        self.fs.invalidate_cache(self._p(rel))
        try:
            return int(self.fs.info(self._p(rel))["size"])
        except FileNotFoundError:
            return None

    def remove_tree(self, rel: str) -> None:
        try:
            self.fs.rm(self._p(rel), recursive=True)
        except FileNotFoundError:
            pass


def s3_options() -> dict:
    """fsspec options for s3:// from the environment: the endpoint of an S3-compatible
    store (``SNAPSHOTD_DURABLE_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``)."""
    endpoint = os.environ.get(c.ENV_DURABLE_S3_ENDPOINT) or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def open_store(url: str, storage_options: dict | None = None) -> DurableStore:
    """The store of ``url``: a path or file:// URL (PosixStore), or any fsspec URL."""
    if not url:
        raise ValueError("no durable URL given")
    if url.startswith("file://"):
        return PosixStore(url[len("file://"):])
    if "://" not in url:
        return PosixStore(url)
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")) and not opts:
        opts = s3_options()
    return FsspecStore(url, opts)


# -- reading checkpoints back -----------------------------------------------------------
def versions(store: DurableStore, job: str) -> list[int]:
    """Versions with a folder under ``job`` (complete or not), oldest first."""
    out = []
    for name in store.listdir(job):
        m = _VERSION_RE.match(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def complete_versions(store: DurableStore, job: str) -> list[int]:
    """Versions whose index exists (not yet verified), oldest first."""
    return [v for v in versions(store, job)
            if INDEX in store.listdir(f"{job}/{version_dir(v)}")]


def read_index(store: DurableStore, job: str, version: int) -> dict:
    rel = f"{job}/{version_dir(version)}/{INDEX}"
    try:
        idx = json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        raise VersionNotFoundError(f"durable {store.url}/{rel}: no index (version incomplete)") from None
    except ValueError as exc:
        raise ChecksumMismatchError(f"durable {store.url}/{rel}: not JSON ({exc})") from None
    if not isinstance(idx, dict) or idx.get("format") != FORMAT or idx.get("version") != version \
            or idx.get("job") != job or not isinstance(idx.get("files"), dict):
        raise ChecksumMismatchError(f"durable {store.url}/{rel}: not a {FORMAT} index of "
                                    f"{job} version {version}")
    return idx


def check_file(store: DurableStore, rel: str, want: dict, data: bytes | None = None) -> None:
    """ChecksumMismatchError unless file ``rel`` (or ``data``, its bytes already read) has
    the size and xxh3 of ``want`` (an index entry)."""
    h, n = xxhash.xxh3_64(), 0
    try:
        for chunk in ([data] if data is not None else store.read_chunks(rel)):
            h.update(chunk)
            n += len(chunk)
    except FileNotFoundError:
        raise ChecksumMismatchError(f"durable {store.url}/{rel}: missing") from None
    if n != want.get("bytes") or h.hexdigest() != want.get("xxh3"):
        raise ChecksumMismatchError(
            f"durable {store.url}/{rel}: {n} bytes with xxh3 {h.hexdigest()}, the index "
            f"says {want.get('bytes')} bytes with xxh3 {want.get('xxh3')} (corrupt)")


def verify_version(store: DurableStore, job: str, version: int, names=None) -> dict:
    """The index of ``version`` once every file it names (or those of ``names``) has its
    size and xxh3 (ChecksumMismatchError naming the first that does not; VersionNotFoundError:
    no index)."""
    idx = read_index(store, job, version)
    base = f"{job}/{version_dir(version)}"
    for name in sorted(idx["files"] if names is None else names):
        want = idx["files"].get(name)
        if want is None:
            raise ChecksumMismatchError(f"durable {store.url}/{base}: the index names no {name}")
        check_file(store, f"{base}/{name}", want)
    return idx


def newest_verified(store: DurableStore, job: str, not_above: int | None = None
                    ) -> tuple[int, dict, list[str]]:
    """(version, index, why each newer version was passed over) of the newest complete
    version whose files all verify; version 0 and an empty index when there is none."""
    skipped: list[str] = []
    for v in reversed(versions(store, job)):
        if not_above is not None and v > not_above:
            continue
        try:
            return v, verify_version(store, job, v), skipped
        except SnapshotdError as exc:
            skipped.append(f"v{v}: {exc}")
    return 0, {}, skipped
