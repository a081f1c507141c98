"""Peer plane: request/response transport between the snapshotd daemons of a group.

Daemons exchange erasure-coded blocks of several MiB (parity contributions, rebuild
reads) plus small control messages and heartbeats. The transport is ZeroMQ over TCP:
every daemon runs one :class:`PeerServer` (a ROUTER socket, :mod:`.server`; a daemon
answers pings on its serving thread and every other op on a bulk thread, so bulk work
never delays a heartbeat) and holds :class:`PeerClient` s (DEALER sockets,
:mod:`.client`) per peer it talks to: one for heartbeats, one for bulk traffic. One schema: ``proto/peer.proto`` (package ``snapshotd.peer``,
generated into ``snapshotd.wire._proto.peer_pb2``).

Modules: :mod:`.framing` (frame header codec, HMAC, payload checks), :mod:`.checks`
(what a request and a reply must carry beyond what protobuf parsing checks),
:mod:`.server`, :mod:`.client`, :mod:`.curve` (optional CURVE encryption), :mod:`.malloc`.
The cluster builds the requests and serves them: :mod:`snapshotd.node.cluster.peer_ops`.

Operations (``PeerRequest.op``, one message per op; this table is the one place they
are listed beside the schema itself). Fields marked * are required (:mod:`.checks`
refuses a request without them); the reply is ``Ack`` unless named. Every payload is raw
bytes or a message of the schema (``RoundRecord``, ``snapshotd.v1.ShardManifest``); a
payload, unlike the header, is not bounded at 64 KiB:

  ==============  =========================================================  ================
  op              request fields                                             reply
  ==============  =========================================================  ================
  announce        job*, version*, node*, block_count*, ranks,                Ack
                  manifest_sizes_bytes, delta_base (the base offered for
                  delta parity); payload: the manifests
  contrib         job*, version*, stripe*, row*, position*, block_counts,    Ack (idempotent)
                  forwarded, delta_base, unchanged; payload: one block (sent
                  with its stored xxh3), a parity row, or (delta_base) a
                  change; none when unchanged
  vote            job*, version*, ranks, step (a vote, a report or the       Ack
                  commit word: the commit tree, core/protocol.py)
  ping            committed_versions {job: version}                          PingReply
                                                                             {committed_versions}
  round           job*, version*                                             RoundReply
                                                                             {record_bytes};
                                                                             payload: a
                                                                             RoundRecord
  fetch           job*, version*, kind* (BLOCK_KIND_DATA: block_index*;      Ack; payload:
                  BLOCK_KIND_PARITY: stripe* + row*)                         the block
  jobs            (none)                                                     JobsReply {jobs:
                                                                             {job: JobSummary}}
  suspect         as fetch: that block of the receiver arrived corrupt       Ack
  fence           job*                                                       Ack
  rank_manifest   job*, version*, rank*                                      Ack; payload:
                                                                             ShardManifest
  rank_block      job*, version*, rank*, block_index*                        Ack; payload:
                                                                             the block
  ==============  =========================================================  ================

Wire format (version "SD2")
---------------------------
A request (DEALER -> ROUTER) and a reply (ROUTER -> DEALER) are both one ZeroMQ
multipart message of 5 or 6 frames (the ROUTER additionally sees/sends the routing
identity in front, which is not part of the protocol)::

    [0] magic       b"SD2"
    [1] sender      sender's node id, UTF-8, 1..255 bytes (a reply carries the server's id)
    [2] request_id  8 bytes, chosen by the client; the reply echoes it
    [3] header      a PeerFrameHeader (protobuf), at most 64 KiB: PeerRequest, PeerReply
                    or PeerError, plus payload_bytes / payload_xxh3 when [5] is present
    [4] mac         32 bytes HMAC-SHA256, or empty when no key is configured
    [5] payload     optional, raw bytes (may be empty: b"" is distinct from "no payload")

* A message that has a payload frame carries ``payload_bytes`` and ``payload_xxh3``
  (``xxhash.xxh3_64_intdigest(payload)``, or the sender's stored checksum passed as
  ``payload_xxh3``, flagged ``payload_xxh3_stored``); the receiver checks both (the server
  replies with a ``PEER_PROTOCOL`` error; the client raises :class:`PeerProtocolError`).
  This module sets them; callers need not.
* When a key is configured, ``mac = HMAC-SHA256(key, b"SD2" + sender + request_id +
  header)``. The payload is covered only through its length + xxh3 in the header.
  The server signs its replies the same way (sender = its node id) and the client
  checks that the replying sender equals the expected ``peer_id``.
* An error reply is a ``PeerError {code, message}`` without payload, the code from
  :mod:`snapshotd.wire.errors` (:func:`remote_error_code`); the client raises
  :class:`RemoteError`, whose ``error_class`` is the remote class.
* A header that does not parse, has fields the schema lacks (or known fields of the
  wrong wire type), or a request that fails :mod:`.checks` (no known op, a required
  field missing, a negative version, an unknown block kind) is refused as
  ``malformed`` (counted in ``PeerServer.refused``, answered ``PEER_PROTOCOL``).

Security notes: the MAC authenticates the sender and the header. It does NOT make the
payload tamper-proof against an active attacker: xxh3 is a fast non-cryptographic
hash (chosen because HMAC/SHA-256 over the payload runs at ~1.8 GB/s, slower than the
wire), so it detects corruption, not forgery. There is no encryption and no replay
protection. Run the peer plane on a trusted network, or pass ``curve`` (a
:class:`snapshotd.node.peer.curve.CurvePeers`; spec ``peer_encryption: curve``): every
frame is then encrypted and authenticated by ZeroMQ CURVE and only the spec's nodes
connect. ``ZMQ_MAXMSGSIZE`` is set to ``max_payload_bytes + 128 KiB`` so a forged length
cannot make ZeroMQ allocate arbitrary memory (a bigger frame drops the connection; the
client then times out).

Zero copy: frames are received with ``copy=False``; handlers and callers get
memoryviews of the ZeroMQ frame buffers (they keep the frame alive as long as they are
referenced). Payloads are sent with ``copy=False``: the buffer (e.g. a memoryview of an
mmap) is handed to ZeroMQ and must not be modified until the send completes (it is
referenced until then; mutating it earlier is caught by the receiver's xxh3 check).
Bulk readers should pass ``on_reply`` to :meth:`PeerClient.call_many` so received
blocks are released as they are consumed; daemons moving multi-MiB blocks should call
:func:`tune_malloc_for_bulk_transfers` once at start-up (see its docstring).
"""

from __future__ import annotations

from snapshotd.node.peer.checks import REPLY_OF, check_reply, check_request
from snapshotd.node.peer.client import PeerClient, Reply
from snapshotd.node.peer.framing import (
    DEFAULT_MAX_PAYLOAD,
    MAC_BYTES,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_NODE_ID_BYTES,
    MAXMSGSIZE_SLACK,
    RID_BYTES,
    Deferred,
    frame_mac,
)
from snapshotd.node.peer.malloc import tune_malloc_for_bulk_transfers
from snapshotd.node.peer.server import Handler, PeerServer, remote_error_code
from snapshotd.wire._proto import peer_pb2
from snapshotd.wire.errors import (  # re-exported: the peer plane's errors
    PeerAuthError,
    PeerProtocolError,
    PeerUnavailableError,
    RemoteError,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "Deferred",
    "Handler",
    "MAC_BYTES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_NODE_ID_BYTES",
    "MAXMSGSIZE_SLACK",
    "PeerAuthError",
    "PeerClient",
    "PeerProtocolError",
    "PeerServer",
    "PeerUnavailableError",
    "REPLY_OF",
    "RID_BYTES",
    "RemoteError",
    "Reply",
    "check_reply",
    "check_request",
    "frame_mac",
    "peer_pb2",
    "remote_error_code",
    "tune_malloc_for_bulk_transfers",
]
