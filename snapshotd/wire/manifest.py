"""Validation and checksums of shard manifests (pure: no I/O).

A shard is one rank's state for one version: a payload of raw tensor bytes plus a
``ShardManifest`` (proto/snapshotd.proto) that says where each tensor lives and holds
one xxh3-64 checksum per ``block_size_bytes`` block of the payload. Everything here
works on plain buffers (mmap, memoryview, bytes) and raises
:class:`~snapshotd.wire.errors.InvalidRequestError` / :class:`ChecksumMismatchError`.
"""

from __future__ import annotations

import math
import re

import xxhash

from snapshotd.wire.dtypes import DTYPE_ITEMSIZE
from snapshotd.wire.errors import ChecksumMismatchError, InvalidRequestError

CHECKSUM_ALGO = "xxh3_64"
DEFAULT_BLOCK_SIZE_BYTES = 4 << 20
MIN_BLOCK_SIZE_BYTES = 4 << 10
MAX_BLOCK_SIZE_BYTES = 1 << 30
MAX_PAYLOAD_BYTES = 1 << 46  # 64 TiB: bounds arithmetic long before any budget does
MAX_TENSORS = 1 << 20
MAX_NDIM = 64
MAX_NAME_CHARS = 4096
MAX_META_JSON_CHARS = 64 << 20
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
        raise InvalidRequestError(
            f"invalid job id {job_id!r}: use 1-64 characters of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return job_id


def num_blocks(payload_bytes: int, block_size_bytes: int) -> int:
    return (payload_bytes + block_size_bytes - 1) // block_size_bytes


def validate_manifest(m, *, segment_bytes: int | None = None, require_checksums: bool = False) -> None:
    """Check a ShardManifest for internal consistency and against its segment size."""
    _validate_fields(m, segment_bytes, require_checksums)
    _validate_entries(m)


def _validate_fields(m, segment_bytes: int | None, require_checksums: bool) -> None:
    """Every check of :func:`validate_manifest` but the walks over the tensor entries."""
    validate_job_id(m.job_id)
    if m.version < 1:
        raise InvalidRequestError(f"manifest version must be >= 1, got {m.version}")
    if m.payload_bytes > MAX_PAYLOAD_BYTES:
        raise InvalidRequestError(
            f"payload of {m.payload_bytes} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}"
        )
    if segment_bytes is not None and m.payload_bytes > segment_bytes:
        raise InvalidRequestError(
            f"payload of {m.payload_bytes} bytes does not fit the {segment_bytes}-byte segment"
        )
    bs = m.block_size_bytes
    if not (MIN_BLOCK_SIZE_BYTES <= bs <= MAX_BLOCK_SIZE_BYTES) or bs & (bs - 1):
        raise InvalidRequestError(
            f"block_size_bytes must be a power of two in [{MIN_BLOCK_SIZE_BYTES}, "
            f"{MAX_BLOCK_SIZE_BYTES}], got {bs}"
        )
    if m.checksum_algo != CHECKSUM_ALGO:
        raise InvalidRequestError(
            f"unsupported checksum_algo {m.checksum_algo!r} (supported: {CHECKSUM_ALGO!r})"
        )
    nb = num_blocks(m.payload_bytes, bs)
    if m.block_checksums or require_checksums:
        if len(m.block_checksums) != nb:
            raise InvalidRequestError(
                f"{len(m.block_checksums)} block checksums for {nb} blocks "
                f"({m.payload_bytes} bytes in blocks of {bs})"
            )
    if len(m.tensors) > MAX_TENSORS:
        raise InvalidRequestError(f"{len(m.tensors)} tensors exceed the limit of {MAX_TENSORS}")
    if len(m.meta_json) > MAX_META_JSON_CHARS:
        raise InvalidRequestError("meta_json is larger than 64 MiB")
    if m.replicated_bytes > MAX_PAYLOAD_BYTES or len(m.replicated_tensors) > MAX_TENSORS:
        raise InvalidRequestError("replicated payload or tensor count over the limit")
    if m.slice_offset > m.replicated_bytes or m.slice_bytes > m.replicated_bytes - m.slice_offset:
        raise InvalidRequestError(
            f"slice [{m.slice_offset}, {m.slice_offset + m.slice_bytes}) overflows the "
            f"{m.replicated_bytes}-byte replicated payload")
    if m.slice_bytes > m.payload_bytes:
        raise InvalidRequestError(f"slice of {m.slice_bytes} bytes exceeds the payload")
    if m.replicated_bytes and not m.dp_ranks:
        raise InvalidRequestError("a replicated payload needs dp_ranks")


def _validate_entries(m) -> None:
    """The walks over the tensor entries (their checks depend on the entries and on
    ``payload_bytes`` / ``replicated_bytes`` only)."""
    for t in m.tensors:
        _validate_tensor(t, m.payload_bytes)
    for t in m.replicated_tensors:
        _validate_tensor(t, m.replicated_bytes)


# The fields a trainer changes from one save to the next without changing its layout.
_PER_SAVE_FIELDS = ("version", "block_checksums", "meta_json")


class LayoutCache:
    """:func:`validate_manifest` for a stream of manifests that mostly repeat a layout.

    A trainer sends the same tensor entries at every save; only the version, the block
    checksums and ``meta_json`` change. :meth:`validate` runs every check of
    :func:`validate_manifest` on each manifest, but the walk over the tensor entries
    only when the manifest, with those three fields cleared, is not byte for byte the
    one last validated in full under the same key (e.g. ``(job, rank)``): the walk's
    checks read nothing else (the entries, ``payload_bytes``, ``replicated_bytes``), so
    an equal layout passes them as the cached one did. A differing layout is validated
    in full and, only if it passes, remembered in place of the previous one.

    The manifest as it came off the wire (``raw``, when the caller has it) spares the
    copy and serialisation that comparison costs (~20 us per save for the demo GPT's
    118 entries; issue 16). The client writes a save's manifest as its layout's bytes
    followed by the per-save fields (proto3 parses that as the merged message). Once a
    key's layout passed and ``raw`` began with exactly that layout's serialisation, a
    later ``raw`` that begins with the same bytes and whose rest holds nothing but the
    per-save fields, each once and in canonical form (:func:`_only_per_save`), has the
    same layout by construction: the rest cannot add to or override a layout field.
    Anything else takes the comparison above.

    Thread-safety: callers may share one cache across threads without a lock; what a
    key maps to is only ever a layout that passed in full, so a race costs at most a
    walk. At most ``max_keys`` keys are kept (the oldest half forgotten when full).
    """

    def __init__(self, max_keys: int = 4096):
        self._known: dict = {}
        self._prefix: dict = {}  # key -> the passed layout's bytes, seen as a raw manifest's prefix
        self._max_keys = max_keys

    @staticmethod
    def layout_of(m) -> bytes:
        """The bytes that identify ``m``'s layout (the manifest less its per-save fields)."""
        x = type(m)()
        x.CopyFrom(m)
        for f in _PER_SAVE_FIELDS:
            x.ClearField(f)
        return x.SerializeToString(deterministic=True)

    def validate(self, key, m, *, segment_bytes: int | None = None,
                 require_checksums: bool = False, raw: bytes | None = None) -> None:
        _validate_fields(m, segment_bytes, require_checksums)
        if raw is not None:
            prefix = self._prefix.get(key)
            if prefix is not None and raw.startswith(prefix) and _only_per_save(type(m), raw, len(prefix)):
                return
        layout = self.layout_of(m)
        if self._known.get(key) != layout:
            _validate_entries(m)
            if len(self._known) >= self._max_keys:
                for k in list(self._known)[:len(self._known) // 2]:
                    self._known.pop(k, None)
                    self._prefix.pop(k, None)
            self._known[key] = layout
        if raw is not None:
            if raw.startswith(layout):
                self._prefix[key] = layout
            else:
                self._prefix.pop(key, None)

    def forget(self, match) -> None:
        """Drop the keys for which ``match(key)`` is true (e.g. a dropped job's)."""
        for k in [k for k in list(self._known) if match(k)]:
            self._known.pop(k, None)
            self._prefix.pop(k, None)


def _only_per_save(cls, raw: bytes, start: int) -> bool:
    """``raw[start:]`` is nothing but per-save fields of message class ``cls``: each at
    most once, in canonical form (its re-serialisation is exactly those bytes: no field
    encoded at its default value, no unknown field, no duplicate, no overlong varint)."""
    rest = raw[start:]
    try:
        x = cls.FromString(rest)
    except Exception:  # not even a message
        return False
    if any(f.name not in _PER_SAVE_FIELDS for f, _ in x.ListFields()):
        return False
    x.DiscardUnknownFields()
    return x.SerializeToString() == rest


def _validate_tensor(t, payload_bytes: int) -> None:
    where = f"tensor {t.name[:200]!r}"
    if not t.name or len(t.name) > MAX_NAME_CHARS:
        raise InvalidRequestError(f"{where}: name must be 1-{MAX_NAME_CHARS} characters")
    if t.dtype not in DTYPE_ITEMSIZE:
        raise InvalidRequestError(
            f"{where}: unknown dtype {t.dtype[:64]!r} (known: {', '.join(sorted(DTYPE_ITEMSIZE))})"
        )
    if len(t.shape) > MAX_NDIM or any(d < 0 for d in t.shape):
        raise InvalidRequestError(f"{where}: invalid shape {list(t.shape)[:8]}")
    if not _strides_fit(t.shape):
        raise InvalidRequestError(f"{where}: shape {list(t.shape)[:8]} too large for a tensor's strides")
    expected = math.prod(t.shape) * DTYPE_ITEMSIZE[t.dtype]
    if expected != t.nbytes:
        raise InvalidRequestError(
            f"{where}: nbytes {t.nbytes} != {expected} (shape {list(t.shape)} of {t.dtype})"
        )
    if t.offset > payload_bytes or t.nbytes > payload_bytes - t.offset:
        raise InvalidRequestError(
            f"{where}: bytes [{t.offset}, {t.offset + t.nbytes}) overflow the "
            f"{payload_bytes}-byte payload"
        )
    if t.global_shape or t.global_offset:
        if len(t.global_shape) != len(t.shape) or len(t.global_offset) not in (0, len(t.shape)):
            raise InvalidRequestError(f"{where}: global_shape/global_offset rank mismatch")
        for i, (g, d) in enumerate(zip(t.global_shape, t.shape)):
            off = t.global_offset[i] if t.global_offset else 0
            if g < 0 or off < 0 or off + d > g:
                raise InvalidRequestError(f"{where}: shard exceeds its global shape on dim {i}")
        if not _strides_fit(t.global_shape):
            raise InvalidRequestError(f"{where}: global_shape {list(t.global_shape)[:8]} too large "
                                      "for a tensor's strides")


def _strides_fit(shape) -> bool:
    """Can torch make a tensor of ``shape``? Its contiguous strides multiply the dims
    (a 0 counted as 1), so a tensor of no elements may still overflow int64 there: the
    client viewing such an entry would fail (fuzzer, regressions/manifest-stride-overflow)."""
    return math.prod(max(d, 1) for d in shape) < 1 << 63


def block_checksums(buf, payload_bytes: int, block_size_bytes: int) -> list[int]:
    """xxh3-64 of each block of ``buf[:payload_bytes]`` (last block may be short)."""
    mv = memoryview(buf).cast("B")
    return [
        xxhash.xxh3_64_intdigest(mv[off : min(off + block_size_bytes, payload_bytes)])
        for off in range(0, payload_bytes, block_size_bytes)
    ]


def verify_checksums(buf, m, *, what: str = "shard") -> None:
    """Raise ChecksumMismatchError naming the blocks whose bytes do not match."""
    got = block_checksums(buf, m.payload_bytes, m.block_size_bytes)
    bad = [i for i, (a, b) in enumerate(zip(got, m.block_checksums)) if a != b]
    if bad or len(got) != len(m.block_checksums):
        raise_mismatch(m, bad, len(got), what)


def covering_blocks(m, offset: int, length: int) -> tuple[int, int]:
    """Blocks [b0, b1) of ``m`` that cover payload bytes [offset, offset + length)
    (``length`` 0: to the end). InvalidRequestError for a range outside the payload."""
    n, bs = m.payload_bytes, m.block_size_bytes
    end = n if length == 0 else offset + length
    if offset < 0 or length < 0 or end > n or offset > end or bs <= 0:
        raise InvalidRequestError(f"bytes [{offset}, {end}) are not within the {n}-byte payload "
                                  f"of job {m.job_id!r} rank {m.rank} version {m.version}")
    return offset // bs, num_blocks(end, bs)


def verify_blocks(data, m, b0: int, what: str) -> None:
    """Check ``data``, the bytes of blocks b0, b0+1, ... of ``m``'s payload (from block
    b0's start), against those blocks' checksums only (ChecksumMismatchError)."""
    bs = m.block_size_bytes
    got = block_checksums(data, len(memoryview(data).cast("B")), bs)
    want = list(m.block_checksums[b0:b0 + len(got)])
    bad = [b0 + i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    if len(want) != len(got):
        raise ChecksumMismatchError(f"{what}: blocks {b0}..{b0 + len(got) - 1} are not all in the "
                                    f"manifest ({len(m.block_checksums)} checksums)")
    if bad:
        raise_mismatch(m, bad, len(m.block_checksums), what)


def raise_mismatch(m, bad: list[int], nblocks: int, what: str) -> None:
    if nblocks != len(m.block_checksums):
        raise ChecksumMismatchError(f"{what}: {nblocks} blocks but {len(m.block_checksums)} checksums")
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise ChecksumMismatchError(
            f"{what} (job {m.job_id!r} rank {m.rank} version {m.version}): "
            f"checksum mismatch in {len(bad)} of {nblocks} blocks: {shown}"
        )
