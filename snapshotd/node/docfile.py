"""A small document the daemon rewrites at every commit, in one write, never torn.

The durable index (``state_dir/index.json``) and each job's round record
(``state_dir/cluster/<job>.rec``; ``<job>.json`` before) used to be written to a temporary file and renamed
over the old one. On ext4 that costs ~120 us of CPU and ~200 us of wall time per file
(a new inode, and the rename of a written file over another starts its write-back),
twice per save (issue 16). :class:`DocFile` keeps the document in two slot files
instead, ``<path>.a`` and ``<path>.b``, each overwritten in place with one ``pwrite``
of a header line and the JSON text::

    snapshotd-doc 1 <seq> <length> <crc32 of "<seq> <length>\\n" + text, 8 hex digits>
    {"format": 1, ...}

Each save goes to the slot *not* holding the newest document, with the next sequence
number, so a write torn by a kill leaves the previous document whole in the other slot;
:meth:`DocFile.load` takes the newest slot whose checksum and length match (bytes past
the length are left-overs of a longer earlier document). A save returns only after its
write did, so what a caller acknowledges after it (a commit) is what a restarted daemon
reads. As before, nothing is fsynced: the files serve a daemon that died and restarts on
the same machine (a machine crash takes /dev/shm, so the segments they name, with it).

The index stays readable text for operators (skip the first line); :meth:`DocFile.save_bytes`
and :meth:`DocFile.load_body` take any bytes (a round record's file is a JSON line and the
record message, see :mod:`snapshotd.node.cluster.records`). A path written
by an earlier version (the plain JSON file ``<path>``) is read when no slot holds a
document, and removed after the first save in the new form.

Call order: :meth:`load` once (it finds the slot the next save goes to), then
:meth:`save` any number of times, :meth:`delete` to remove every file. Thread-safety:
none; callers serialise the calls on one DocFile (the store's lock, the job table's).
"""

from __future__ import annotations

import json
import logging
import os
import zlib

log = logging.getLogger("snapshotd.store")

MAGIC = b"snapshotd-doc 1 "
SLOT_SUFFIXES = (".a", ".b")


def _crc(seq: int, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(b"%d %d\n" % (seq, len(body))))


def encode(seq: int, body: bytes) -> bytes:
    """One slot's bytes: the header line and ``body``."""
    return MAGIC + b"%d %d %08x\n" % (seq, len(body), _crc(seq, body)) + body


def decode(raw: bytes) -> tuple[int, bytes] | None:
    """(seq, body) of a slot's bytes, or None when they are not a whole document."""
    if not raw.startswith(MAGIC):
        return None
    end = raw.find(b"\n")
    if end < 0:
        return None
    try:
        seq_s, len_s, crc_s = raw[len(MAGIC):end].split(b" ")
        seq, n, crc = int(seq_s), int(len_s), int(crc_s, 16)
    except ValueError:
        return None
    body = raw[end + 1:end + 1 + n]
    if len(body) != n or _crc(seq, body) != crc:
        return None
    return seq, body


class DocFile:
    """One document in two slot files beside ``path`` (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.slots = tuple(path + s for s in SLOT_SUFFIXES)
        self._seq = 0  # of the newest document on disk
        self._sizes = [0, 0]  # bytes in each slot file
        self._legacy = False  # the plain file of an earlier version may still be there
        self._loaded = False

    def load(self):
        """The newest whole document (parsed JSON), or None when there is none. A plain
        file of an earlier version is parsed as it is (ValueError if it is not JSON)."""
        body = self.load_body()
        if body is not None:
            return json.loads(body)
        if self._legacy:
            with open(self.path) as f:
                return json.load(f)
        return None

    def load_body(self) -> bytes | None:
        """The bytes of the newest whole document in the slots (None when there is none;
        the plain file of an earlier version is not read here, see :meth:`load`). For a
        document that is not JSON (:meth:`save_bytes`)."""
        best, self._loaded = None, True
        for i, slot in enumerate(self.slots):
            try:
                with open(slot, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue
            self._sizes[i] = len(raw)
            got = decode(raw)
            if got is None:
                log.warning("%s: not a whole document (a write torn by a kill?); ignored", slot)
                continue
            if best is None or got[0] > best[0]:
                best = got
        self._legacy = os.path.exists(self.path)
        if best is None:
            return None
        self._seq = best[0]
        return best[1]

    def save(self, doc) -> None:
        """Write ``doc`` (JSON-able) over the older slot; returns once it is written."""
        self.save_bytes(json.dumps(doc).encode())

    def save_bytes(self, body: bytes) -> None:
        """Write ``body`` (any bytes: read back by :meth:`load_body`) over the older slot."""
        if not self._loaded:  # the next slot and number follow the newest document on disk
            self.load_body()  # (a plain file of an earlier version, damaged or not, is replaced)
        seq = self._seq + 1
        i = seq & 1
        data = encode(seq, body)
        fd = os.open(self.slots[i], os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, memoryview(data)[done:], done)
            if self._sizes[i] > len(data):  # not to 0 (a truncation to 0 starts a write-back)
                os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        self._sizes[i] = len(data)
        self._seq = seq
        if self._legacy:
            self._unlink(self.path)
            self._legacy = False

    def delete(self) -> None:
        for p in (*self.slots, self.path):
            self._unlink(p)
        self._seq, self._sizes, self._legacy, self._loaded = 0, [0, 0], False, True

    @staticmethod
    def _unlink(p: str) -> None:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def read_doc(path: str):
    """The newest document of ``path`` (a DocFile's, or a plain JSON file), or None:
    for tools and tests that read the index or a round record."""
    return DocFile(path).load()
