"""Block checksums of shard payloads, hashed on several cores at once.

:meth:`PayloadVerifier.checksums` computes a payload's per-block xxh3 checksums (the
manifest's ``block_checksums``); :meth:`PayloadVerifier.verify_payload` checks a payload
against its manifest and raises ChecksumMismatchError naming the bad blocks. xxhash
releases the GIL, so large payloads are cut into one piece per worker of a small pool.

Thread-safety: both may be called from any thread at once; no lock is taken, so callers
hash outside their own locks. ``close()`` once, at the end.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from snapshotd.wire import manifest as mf

log = logging.getLogger("snapshotd.store")
# Test-only: a deliberately broken build for the chaos harness (tests/chaos).
# "1" turns off every checksum check of held and fetched blocks. Never set it in use.
ENV_UNSAFE_SKIP_VERIFY = "SNAPSHOTD_UNSAFE_SKIP_VERIFY"


class PayloadVerifier:
    """Checksums and checks of shard payloads (see the module docstring)."""

    def __init__(self, workers: int | None = None, unsafe_skip_verify: bool | None = None):
        if unsafe_skip_verify is None:
            unsafe_skip_verify = os.environ.get(ENV_UNSAFE_SKIP_VERIFY) == "1"
        self.unsafe_skip_verify = unsafe_skip_verify
        if self.unsafe_skip_verify:
            log.warning("!!! %s=1: CHECKSUM VERIFICATION IS OFF; corrupt blocks WILL be restored. "
                        "This is a test-only broken build; never use it for training. !!!",
                        ENV_UNSAFE_SKIP_VERIFY)
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._hashers = ThreadPoolExecutor(self.workers, thread_name_prefix="snapshotd-hash")

    def checksums(self, buf, m) -> list[int]:
        """Per-block checksums of ``m.payload_bytes`` bytes of ``buf`` in ``m``'s blocks."""
        bs, n = m.block_size_bytes, m.payload_bytes
        nblocks = mf.num_blocks(n, bs)
        workers = self.workers
        if nblocks < 2 * workers:
            return mf.block_checksums(buf, n, bs)
        per = -(-nblocks // workers)
        mv = memoryview(buf)
        parts = [self._hashers.submit(mf.block_checksums, mv[i * per * bs:min((i + 1) * per * bs, n)],
                                      min((i + 1) * per * bs, n) - i * per * bs, bs)
                 for i in range(workers) if i * per * bs < n]
        return [c for p in parts for c in p.result()]

    def checksums_of(self, buf, m, blocks: list[int]) -> list[int]:
        """Checksums of the given blocks only (in that order), runs of consecutive blocks
        hashed as one piece each, large runs on several cores."""
        bs, n = m.block_size_bytes, m.payload_bytes
        mv = memoryview(buf)
        out: list[int] = []
        i = 0
        while i < len(blocks):
            j = i
            while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
                j += 1
            lo, hi = blocks[i] * bs, min((blocks[j] + 1) * bs, n)
            out.extend(self.checksums(mv[lo:hi], _Span(hi - lo, bs)))
            i = j + 1
        return out

    def verify_payload(self, buf, m, what: str) -> None:
        """Raise ChecksumMismatchError (naming ``what``) unless ``buf`` matches ``m``."""
        if self.unsafe_skip_verify:
            return
        got = self.checksums(buf, m)
        if got != list(m.block_checksums):
            bad = [i for i, (a, b) in enumerate(zip(got, m.block_checksums)) if a != b]
            mf.raise_mismatch(m, bad, len(got), what)

    def close(self) -> None:
        self._hashers.shutdown(wait=False)


class _Span:
    """Stands in for a manifest in ``checksums``: a run of blocks of a payload."""

    def __init__(self, payload_bytes: int, block_size_bytes: int):
        self.payload_bytes, self.block_size_bytes = payload_bytes, block_size_bytes
