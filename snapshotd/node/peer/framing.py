"""Peer-plane framing: constants, the frame header codec, the HMAC, payload checks.

Pure helpers shared by :mod:`.server` and :mod:`.client` (no sockets, no threads). The
frame header (frame [3]) is a ``snapshotd.peer.PeerFrameHeader`` (proto/peer.proto);
the MAC covers ``MAGIC + sender + request id + header bytes`` exactly as sent.

A header is built in two parts so that a payload is hashed just before it is sent (the
hash overlaps the transfer of the previous request): :func:`encode_body` serialises the
body once, :func:`payload_fields` serialises the payload length/xxh3 as a second
``PeerFrameHeader``; the two byte strings are concatenated (protobuf merges
concatenated messages), so nothing is re-encoded.
"""

from __future__ import annotations

import hashlib
import hmac
import operator

import numpy as np
import xxhash
from google.protobuf.message import DecodeError

from snapshotd.wire._proto import peer_pb2 as ppb
from snapshotd.wire.errors import PeerProtocolError

MAGIC = b"SD2"  # "SD1" was the JSON header of snapshotd before the peer schema (issue 13)
RID_BYTES = 8
MAC_BYTES = 32
MAX_HEADER_BYTES = 64 * 1024
MAX_NODE_ID_BYTES = 255
MAX_ERROR_MESSAGE_CHARS = 16384
DEFAULT_MAX_PAYLOAD = 1 << 30
MAXMSGSIZE_SLACK = 128 * 1024

# A sender that already knows its payload's xxh3 (a stored block checksum) passes it as
# ``payload_xxh3=`` (a handler: as its reply's third item); it is sent as the header's
# payload_xxh3 (flagged payload_xxh3_stored) instead of hashing the payload again. The
# receiver still verifies, so bytes corrupted at rest are caught end to end.
_U64 = 1 << 64


def frame_mac(key: bytes, sender: bytes, rid: bytes, header: bytes) -> bytes:
    """HMAC-SHA256 of one message: ``MAGIC + sender + request id + header bytes``."""
    h = hmac.new(key, MAGIC, hashlib.sha256)
    h.update(sender)
    h.update(rid)
    h.update(header)
    return h.digest()


class Deferred:
    """A request payload made only when the client sends it (``make()`` returns a buffer):
    a batch of computed payloads (delta parity's changes) then holds at most a window
    of them in memory, not the whole batch. Made again if the request is sent again."""

    __slots__ = ("make",)

    def __init__(self, make) -> None:
        self.make = make


def as_byte_view(obj) -> memoryview:
    """A flat, C-contiguous, unsigned-byte memoryview of any buffer-protocol object."""
    try:
        mv = obj if isinstance(obj, memoryview) else memoryview(obj)
    except TypeError as e:
        raise PeerProtocolError(f"payload must support the buffer protocol, not {type(obj).__name__}") from e
    if not mv.c_contiguous:
        raise PeerProtocolError("payload must be C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


# payload_bytes (tag + 10-byte varint) + payload_xxh3 (tag + 8) + the stored flag (tag + 1)
# + payload_zero_tail (tag + 10-byte varint)
_PAYLOAD_FIELDS_MAX = 11 + 9 + 2 + 11

# A payload ending in at least this many zero bytes is sent without them (the padded
# last block of a rank, the parity of a stripe's padded blocks): the header says how
# many, the receiver puts them back (issue 16: bytes on the network).
ZERO_TAIL_MIN = 64 << 10
_SCAN = 64 << 10


def encode_body(which: str, body, with_payload: bool) -> bytes:
    """Serialise a header whose ``which`` (request, reply or error) is ``body``; size-checked
    leaving room for the payload fields when ``with_payload``, so a header that passes
    here is always sendable."""
    header = ppb.PeerFrameHeader()
    try:
        getattr(header, which).CopyFrom(body)
    except TypeError as e:
        raise PeerProtocolError(f"{which} must be a {type(getattr(header, which)).__name__}, "
                                f"not {type(body).__name__}") from None
    raw = header.SerializeToString()
    limit = MAX_HEADER_BYTES - (_PAYLOAD_FIELDS_MAX if with_payload else 0)
    if len(raw) > limit:
        raise PeerProtocolError(f"header is {len(raw)} bytes, over the {limit}-byte limit")
    return raw


def known_xxh3(value) -> int | None:
    """A stored checksum given for a payload: an unsigned 64-bit integer (numpy's too)."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        value = -1
    if not 0 <= value < _U64:
        raise PeerProtocolError("payload_xxh3 must be an unsigned 64-bit integer")
    return value


def payload_fields(payload: memoryview, stored_xxh3: int | None = None) -> bytes:
    """The payload's length and xxh3 as header bytes, to append to :func:`encode_body`'s;
    ``stored_xxh3`` (checked by :func:`known_xxh3`) is sent instead of hashing."""
    if stored_xxh3 is None:
        return ppb.PeerFrameHeader(payload_bytes=payload.nbytes,
                                   payload_xxh3=xxhash.xxh3_64_intdigest(payload)).SerializeToString()
    return ppb.PeerFrameHeader(payload_bytes=payload.nbytes, payload_xxh3=stored_xxh3,
                               payload_xxh3_stored=True).SerializeToString()


def zero_tail(payload: memoryview) -> int:
    """How many zero bytes end ``payload``, if at least :data:`ZERO_TAIL_MIN` (else 0).
    O(1) for a payload whose last byte is not zero; otherwise it reads the zeros, 64 KiB
    at a time from the end."""
    n = payload.nbytes
    if n < ZERO_TAIL_MIN or payload[n - 1] != 0:
        return 0
    arr = np.frombuffer(payload, np.uint8)
    end = n
    while end > 0:
        chunk = arr[max(0, end - _SCAN):end]
        nz = np.flatnonzero(chunk)
        if nz.size:
            end = end - chunk.size + int(nz[-1]) + 1
            break
        end -= chunk.size
    tail = n - end
    return tail if tail >= ZERO_TAIL_MIN else 0


def payload_frame(payload: memoryview, stored_xxh3: int | None = None) -> tuple[bytes, memoryview]:
    """(header bytes to append to :func:`encode_body`'s, the frame to send): the frame
    is the payload without its zero tail (:func:`zero_tail`); length and xxh3 in the
    header are those of the whole payload, which the receiver restores
    (:func:`check_payload`) before it verifies the xxh3."""
    tail = zero_tail(payload)
    fields = payload_fields(payload, stored_xxh3)
    if not tail:
        return fields, payload
    return fields + ppb.PeerFrameHeader(payload_zero_tail=tail).SerializeToString(), \
        payload[:payload.nbytes - tail]


def decode_header(raw: bytes) -> ppb.PeerFrameHeader:
    """Parse frame [3]. Refuses (PeerProtocolError) oversized or unparsable headers and any
    field this schema does not know (an unknown field number, or a known one sent with
    the wrong wire type, which protobuf would otherwise keep aside as unknown)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise PeerProtocolError(f"header is {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
    header = ppb.PeerFrameHeader()
    try:
        header.ParseFromString(raw)
    except (DecodeError, RecursionError) as e:
        raise PeerProtocolError(f"header is not a valid PeerFrameHeader: {type(e).__name__}") from None
    size = header.ByteSize()
    header.DiscardUnknownFields()
    if header.ByteSize() != size:
        raise PeerProtocolError("header has fields the peer schema does not know "
                                "(or known fields of the wrong type)")
    return header


def check_payload(header: ppb.PeerFrameHeader, payload: memoryview, max_payload: int) -> memoryview:
    """Check a received payload frame against its header; returns the payload, with
    its zero tail put back when the sender left one off (a copy, then)."""
    tail = header.payload_zero_tail
    n = payload.nbytes + tail
    if n > max_payload:
        raise PeerProtocolError(f"payload of {n} bytes is over the {max_payload}-byte limit")
    if not (header.HasField("payload_bytes") and header.HasField("payload_xxh3")):
        raise PeerProtocolError("a message with a payload needs payload_bytes and payload_xxh3 in its header")
    if header.payload_bytes != n:
        raise PeerProtocolError(f"payload is {n} bytes, header says {header.payload_bytes}")
    if not tail:
        return payload
    whole = bytearray(n)  # zeros
    whole[:payload.nbytes] = payload
    return memoryview(whole)


def payload_checksum_ok(header: ppb.PeerFrameHeader, payload: memoryview) -> bool:
    return xxhash.xxh3_64_intdigest(payload) == header.payload_xxh3


def checksum_mismatch(header: ppb.PeerFrameHeader, what: str) -> PeerProtocolError:
    """The error for a payload that failed its xxh3 (the text "xxh3 mismatch" is matched by
    snapshotd.node.cluster.peer_ops.is_corrupt_reply)."""
    where = " (the sender's stored checksum: corrupt at rest there)" if header.payload_xxh3_stored else ""
    return PeerProtocolError(f"{what}: xxh3 mismatch{where}")


def node_id_bytes(node_id: str, what: str) -> bytes:
    if not isinstance(node_id, str) or not node_id:
        raise ValueError(f"{what} must be a non-empty str")
    raw = node_id.encode("utf-8")
    if len(raw) > MAX_NODE_ID_BYTES:
        raise ValueError(f"{what} is longer than {MAX_NODE_ID_BYTES} bytes")
    return raw


def check_key(key: bytes | None) -> bytes | None:
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("key must be non-empty bytes or None")
    return bytes(key)
