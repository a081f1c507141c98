"""The checks on peer messages that protobuf parsing alone does not make, in one place.

The schema is proto/peer.proto; the op table (what each op carries, what it answers) is
documented once, in :mod:`snapshotd.node.peer`. Parsing already refuses a header that
is not a ``PeerFrameHeader``, and :func:`~.framing.decode_header` one with fields the
schema lacks or of the wrong wire type. What is left is checked here, on the messages:

* a request carries exactly one op this node knows (:data:`REQUIRED` names them);
* the fields its op needs are set (:data:`REQUIRED`; a fetch or suspect of a data block
  needs ``block_index``, of a parity block ``stripe`` and ``row``);
* a ``version`` (or ``delta_base``) is not negative, a ``kind`` is ``BLOCK_KIND_DATA`` or
  ``BLOCK_KIND_PARITY`` (an enum is open: any number parses);
* a reply's body is the form its request's op answers (:data:`REPLY_OF`).

Unsigned fields cannot be negative (protobuf refuses to set them), and the header's
64 KiB bound caps every repeated field. Block counts are bounded by the receiving
node's memory budget, which only it knows (``RoundRecords.bounded_counts``); so is the
``round`` reply's payload, a ``RoundRecord`` checked whole by ``RoundRecords.parse_record``.

A failed check is a :class:`PeerProtocolError`: the client raises it before anything is
sent (or on a reply that fails), the server refuses the message as ``malformed``. Pure:
no I/O; thread-safe.
"""

from __future__ import annotations

from snapshotd.wire._proto import peer_pb2 as ppb
from snapshotd.wire.errors import PeerProtocolError

_JV = ("job", "version")

# op -> the singular fields it must carry (the ops are PeerRequest's oneof "op")
REQUIRED: dict[str, tuple[str, ...]] = {
    "announce": _JV + ("node", "block_count"),
    "contrib": _JV + ("stripe", "row", "position"),
    "vote": _JV,
    "ping": (),
    "round": _JV,
    "fetch": _JV + ("kind",),
    "jobs": (),
    "suspect": _JV + ("kind",),
    "fence": ("job",),
    "rank_manifest": _JV + ("rank",),
    "rank_block": _JV + ("rank", "block_index"),
}

# op -> the PeerReply body that answers it (Ack unless named)
REPLY_OF: dict[str, str] = {op: (op if op in ("ping", "jobs", "round") else "ack") for op in REQUIRED}

# where a block is, by kind (fetch, suspect)
BLOCK_AT: dict[int, tuple[str, ...]] = {
    ppb.BLOCK_KIND_DATA: ("block_index",),
    ppb.BLOCK_KIND_PARITY: ("stripe", "row"),
}


def check_request(request) -> str:
    """The op of a valid request; PeerProtocolError when it is not one."""
    if not isinstance(request, ppb.PeerRequest):
        raise PeerProtocolError(f"a request must be a PeerRequest, not {type(request).__name__}")
    op = request.WhichOneof("op")
    if op is None or op not in REQUIRED:
        raise PeerProtocolError("request carries no operation this node knows")
    msg = getattr(request, op)
    missing = [f for f in REQUIRED[op] if not msg.HasField(f)]
    if "kind" in REQUIRED[op] and not missing:
        if msg.kind not in BLOCK_AT:
            raise PeerProtocolError(f"op {op!r}: unknown block kind {msg.kind}")
        missing = [f for f in BLOCK_AT[msg.kind] if not msg.HasField(f)]
    if missing:
        raise PeerProtocolError(f"op {op!r} lacks {', '.join(missing)}")
    if "version" in REQUIRED[op] and msg.version < 0:
        raise PeerProtocolError(f"op {op!r}: version {msg.version} is negative")
    if op in ("announce", "contrib") and msg.delta_base < 0:
        raise PeerProtocolError(f"op {op!r}: delta_base {msg.delta_base} is negative")
    return op


def check_reply(op: str, reply) -> None:
    """A reply to request ``op`` is a PeerReply of the form that op answers."""
    if not isinstance(reply, ppb.PeerReply):
        raise PeerProtocolError(f"a reply must be a PeerReply, not {type(reply).__name__}")
    form = reply.WhichOneof("body")
    if form != REPLY_OF[op]:
        raise PeerProtocolError(f"reply to {op!r} must be {REPLY_OF[op]!r}, not {form!r}")
