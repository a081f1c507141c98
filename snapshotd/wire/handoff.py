"""Frames of the same-host hand-off channel (AdoptShard without gRPC), both directions.

The daemon (:mod:`snapshotd.node.handoff`, a ZeroMQ ROUTER on an ``ipc://`` file beside
its Unix socket) and the client (:mod:`snapshotd_client.transport`, a DEALER) exchange
multipart messages; this module builds and checks them and holds no socket. Version 1:

* request, 4 frames: header (magic ``SDHO``, version, kind ``KIND_ADOPT``, request id),
  the daemon token (UTF-8, empty = none), the job token (UTF-8, empty = none): the values
  the gRPC metadata ``x-snapshotd-token`` / ``x-snapshotd-job-token`` would carry; the
  serialized ``AdoptShardRequest`` (protobuf; never pickle);
* reply, 2 frames: header (kind ``KIND_OK``, the request's id), the serialized
  ``AdoptShardResponse``; or 3 frames: header (kind ``KIND_ERROR``), the error's code
  from :data:`snapshotd.wire.errors.ERROR_CLASSES`, its message (UTF-8). The client
  raises the class the code names, as it does for a gRPC status with that code.

A request whose frames do not follow this is answered with ``KIND_ERROR`` and code
``MALFORMED_REQUEST`` (request id 0 when the header itself is unreadable). Pure
functions; thread-safe.
"""

from __future__ import annotations

import os
import struct

from snapshotd.wire.errors import MalformedRequestError
from snapshotd.wire.limits import MAX_MESSAGE_BYTES

MAGIC = b"SDHO"
VERSION = 1
KIND_ADOPT = 1  # request: AdoptShard
KIND_OK = 2  # reply: the response message
KIND_ERROR = 3  # reply: error code and message
HEADER = struct.Struct("!4sHHQ")  # magic, version, kind, request id
MAX_TOKEN_BYTES = 4096  # either token frame; longer is malformed
# The endpoint file sits beside the daemon's Unix socket, named after it.
ENDPOINT_SUFFIX = ".ho"
# "grpc": a daemon does not offer the channel, a client does not use it ("zmq": default).
ENV_HANDOFF = "SNAPSHOTD_HANDOFF"


def enabled(environ=os.environ) -> bool:
    """Whether ``$SNAPSHOTD_HANDOFF`` leaves the channel on (anything but "grpc")."""
    return environ.get(ENV_HANDOFF, "").strip().lower() != "grpc"


def endpoint_path(socket_path: str) -> str:
    """The channel's socket file for a daemon whose Unix socket is ``socket_path``."""
    return socket_path + ENDPOINT_SUFFIX


def header(kind: int, request_id: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, request_id)


def encode_request(request_id: int, body: bytes, token: str | None, job_token: str | None) -> list[bytes]:
    return [header(KIND_ADOPT, request_id), (token or "").encode(), (job_token or "").encode(), body]


def encode_ok(request_id: int, body: bytes) -> list[bytes]:
    return [header(KIND_OK, request_id), body]


def encode_error(request_id: int, code: str, message: str) -> list[bytes]:
    return [header(KIND_ERROR, request_id), code.encode(), message.encode("utf-8", "replace")]


def read_header(frame: bytes) -> tuple[int, int]:
    """(kind, request id) of a header frame; MalformedRequestError if it is not one of ours."""
    if len(frame) != HEADER.size:
        raise MalformedRequestError(f"hand-off frame: header of {len(frame)} bytes, "
                                    f"expected {HEADER.size}")
    magic, version, kind, rid = HEADER.unpack(frame)
    if magic != MAGIC:
        raise MalformedRequestError(f"hand-off frame: bad magic {magic!r}")
    if version != VERSION:
        raise MalformedRequestError(f"hand-off frame: version {version}, this side speaks {VERSION}")
    return kind, rid


def decode_request(frames: list[bytes]) -> tuple[int, bytes, str | None, str | None]:
    """(request id, request body, daemon token, job token); MalformedRequestError when the
    frames are not a version-1 request (the body is parsed by the caller)."""
    if not frames:
        raise MalformedRequestError("hand-off request: no frames")
    kind, rid = read_header(frames[0])
    if kind != KIND_ADOPT:
        raise MalformedRequestError(f"hand-off request: kind {kind}, expected {KIND_ADOPT} (AdoptShard)")
    if len(frames) != 4:
        raise MalformedRequestError(f"hand-off request: {len(frames)} frames, expected 4")
    _, tok, jtok, body = frames
    if len(tok) > MAX_TOKEN_BYTES or len(jtok) > MAX_TOKEN_BYTES:
        raise MalformedRequestError(f"hand-off request: a token frame over {MAX_TOKEN_BYTES} bytes")
    if len(body) > MAX_MESSAGE_BYTES:
        raise MalformedRequestError(f"hand-off request: body of {len(body)} bytes, at most "
                                    f"{MAX_MESSAGE_BYTES}")
    try:
        token, job_token = tok.decode(), jtok.decode("utf-8", "replace")
    except UnicodeDecodeError:
        raise MalformedRequestError("hand-off request: the daemon token is not UTF-8") from None
    return rid, body, token or None, job_token or None


def decode_reply(frames: list[bytes]) -> tuple[int, bytes | None, str | None, str]:
    """(request id, response body or None, error code or None, error message);
    MalformedRequestError when the frames are not a version-1 reply."""
    if not frames:
        raise MalformedRequestError("hand-off reply: no frames")
    kind, rid = read_header(frames[0])
    if kind == KIND_OK and len(frames) == 2:
        return rid, frames[1], None, ""
    if kind == KIND_ERROR and len(frames) == 3:
        return rid, None, frames[1].decode("ascii", "replace"), frames[2].decode("utf-8", "replace")
    raise MalformedRequestError(f"hand-off reply: kind {kind} with {len(frames)} frames")


# -- the request's manifest field, written and found by hand --------------------------------
# The client serializes a save's manifest in two parts (its layout once, then the save's own
# fields) and writes AdoptShardRequest field 2 around them; the daemon finds those bytes in a
# request body for its layout check. Protobuf's own varint helpers are internal API.
_MANIFEST_TAG = bytes([2 << 3 | 2])  # AdoptShardRequest.manifest: field 2, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def with_manifest(request_body: bytes, manifest: bytes) -> bytes:
    """A serialized AdoptShardRequest without a manifest, plus ``manifest`` (a serialized
    ShardManifest) as its field 2: what parses as the request with that manifest set."""
    return request_body + _MANIFEST_TAG + _varint(len(manifest)) + manifest


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def manifest_bytes(body: bytes) -> bytes | None:
    """The bytes of an AdoptShardRequest's ``manifest`` (field 2) as they came, when the
    field occurs exactly once in ``body`` (a request that parsed); else None. The daemon's
    side of :func:`with_manifest`: they let the layout check compare bytes instead of
    re-serialising the manifest (:class:`snapshotd.wire.manifest.LayoutCache`); None only
    costs that shortcut."""
    i, n, found = 0, len(body), None
    try:
        while i < n:
            tag, i = _read_varint(body, i)
            wire = tag & 7
            if wire == 0:
                _, i = _read_varint(body, i)
            elif wire == 2:
                size, i = _read_varint(body, i)
                if tag >> 3 == 2:
                    if found is not None:  # two: the parsed manifest is their merge
                        return None
                    found = (i, i + size)
                i += size
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                return None
    except IndexError:
        return None
    if i != n or found is None:
        return None
    return body[found[0]:found[1]]
