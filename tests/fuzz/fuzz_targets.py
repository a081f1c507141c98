"""Fuzz targets for the parsers that take bytes from outside the process (issue 18).

Each target is a ``TestOneInput(data: bytes)`` for atheris (see ``fuzz_runner.py``) that
also runs as a plain function (the regression tests and the seed check call it). A target
returns normally when the input was accepted or refused with one of the parser's
documented errors; anything else it raises is a crash:

* ``peer`` (:func:`peer_server`, :func:`peer_client`): one multipart message into the real
  ``PeerServer._process`` (a fake socket records what it would send) and the real
  ``PeerClient._decode_reply`` + ``check_reply``. The server must never raise, and must
  either refuse (``refused`` counted, an error reply) or hand the handler a request that
  passes ``check_request``; the client raises only ``SnapshotdError`` subclasses.
* ``manifest``: ``validate_manifest`` raises only ``InvalidRequestError``; a manifest it
  accepts is one the client can view: every tensor entry maps onto the payload.
* ``handoff``: the frames of the same-host hand-off channel (``snapshotd.wire.handoff``):
  ``decode_request`` (the daemon's side) and ``decode_reply`` (the client's) raise only
  ``MalformedRequestError``; a request they accept encodes back to one that decodes to
  the same values, a reply is an id with either a body or an error code and message;
  the daemon's scan of a request body for the manifest's bytes
  (``snapshotd.wire.handoff.manifest_bytes``) finds none or exactly the parsed manifest's.
* ``state_meta``: the client's decoding of the state metadata a daemon hands back in a
  manifest (``loads_meta``, ``unflatten_state``, then ``restore_rng_state`` on an ``rng``
  entry) raises only ``ValueError`` (and restore_rng_state its documented RuntimeError:
  CUDA states, no CUDA here); a refused RNG state leaves the RNGs as they were.

The gRPC servicer target lives in ``fuzz_service.py``. Inputs of the multi-part targets
are a flags byte then length-prefixed parts (:func:`split_parts`, :func:`join_parts`), so
the seed corpus (``fuzz_seeds.py``) can be built from real messages.
"""

from __future__ import annotations

import logging
import struct

MAX_PARTS = 16


def split_parts(data: bytes) -> tuple[int, list[bytes]]:
    """(flags, parts) of an input: byte 0 is the flags, then parts as <u16 length><bytes>;
    a length running past the end takes what is left."""
    if not data:
        return 0, []
    flags, pos, parts = data[0], 1, []
    while pos < len(data) and len(parts) < MAX_PARTS:
        if pos + 2 > len(data):
            parts.append(data[pos:])
            break
        (n,) = struct.unpack_from("<H", data, pos)
        parts.append(data[pos + 2:pos + 2 + n])
        pos += 2 + n
    return flags, parts


def join_parts(flags: int, parts: list[bytes]) -> bytes:
    return bytes([flags]) + b"".join(struct.pack("<H", len(p)) + p for p in parts)


class FakeFrame:
    """What the peer plane reads of a ``zmq.Frame``: ``bytes``, ``buffer`` and ``len``."""

    def __init__(self, raw: bytes):
        self.bytes = raw
        self.buffer = memoryview(raw)

    def __len__(self) -> int:
        return len(self.bytes)


class RecordingSocket:
    """Stands in for the server's ROUTER socket: keeps what would have been sent."""

    def __init__(self):
        self.sent: list[list] = []

    def send_multipart(self, frames, flags=0, copy=True):
        self.sent.append([bytes(f) for f in frames])

    def close(self, linger=None):
        pass


# -- the peer plane --------------------------------------------------------------------

PEER_KEY = b"fuzz-peer-key-0123456789abcdef"
SENDER = "peer-a"
SERVER_ID = "node-b"
_peer: dict = {}


def _peer_setup():
    if _peer:
        return _peer
    import zmq

    from snapshotd.node.peer.client import PeerClient
    from snapshotd.node.peer.server import PeerServer
    from snapshotd.wire._proto import peer_pb2 as ppb

    logging.disable(logging.CRITICAL)
    seen, invalid = [], []

    def handler(sender, request, payload):
        from snapshotd.node.peer.checks import REPLY_OF, check_request
        from snapshotd.wire.errors import PeerProtocolError
        try:
            op = check_request(request)  # the server let it through: it must be valid
        except PeerProtocolError as e:
            invalid.append(e)  # recorded, not raised: the server would turn it into a reply
            raise
        seen.append(op)
        form = REPLY_OF[op]
        return ppb.PeerReply(**{form: getattr(ppb, {"ack": "Ack", "ping": "PingReply",
                                                    "jobs": "JobsReply", "round": "RoundReply"}[form])()}), None

    servers = {}
    for signed in (False, True):
        s = PeerServer("inproc://fuzz-peer-%d" % signed, SERVER_ID, PEER_KEY if signed else None,
                       [SENDER] if signed else None, handler, max_payload_bytes=1 << 16)
        s._sock.close(linger=0)
        s._sock = RecordingSocket()
        servers[signed] = s
    clients = {signed: PeerClient("inproc://fuzz-nowhere", SENDER, SERVER_ID,
                                  PEER_KEY if signed else None, max_payload_bytes=1 << 16)
               for signed in (False, True)}
    _peer.update(servers=servers, clients=clients, seen=seen, invalid=invalid, zmq=zmq, ppb=ppb)
    return _peer


def sign(parts: list[bytes]) -> list[bytes]:
    """Replace the MAC frame of a message (magic, sender, rid, header, mac[, payload])
    with the right one, so mutated headers get past authentication."""
    from snapshotd.node.peer.framing import frame_mac
    if len(parts) >= 5:
        parts = list(parts)
        parts[4] = frame_mac(PEER_KEY, parts[1], parts[2], parts[3])
    return parts


def peer_server(data: bytes) -> None:
    """flags bit 0: the server has a key (and the harness signs); parts: the frames
    after the routing identity."""
    p = _peer_setup()
    flags, parts = split_parts(data)
    signed = bool(flags & 1)
    server = p["servers"][signed]
    if signed:
        parts = sign(parts)
    sock = server._sock
    before_sent, before_refused, before_served = len(sock.sent), sum(server.refused.values()), server.served
    del p["seen"][:], p["invalid"][:]
    server._process([FakeFrame(b"ident")] + [FakeFrame(x) for x in parts])
    refused = sum(server.refused.values()) - before_refused
    served = server.served - before_served
    sent = sock.sent[before_sent:]
    del sock.sent[:]
    if refused + served != 1:
        raise AssertionError(f"refused {refused}, served {served}: not exactly one outcome")
    if served:
        assert p["seen"] or p["invalid"], "served but the handler never ran"
    assert not p["invalid"], f"the server handed its handler an invalid request: {p['invalid'][0]}"
    for out in sent:  # every reply sent is one well-formed reply message
        assert out[0] == b"ident" and out[1] == b"SD2" and len(out) in (6, 7), out[:3]


def peer_client(data: bytes) -> None:
    """flags bit 0: the client has a key (the harness signs); bits 1-4: the op whose reply
    this is; parts: the reply frames (magic, sender, rid, header, mac[, payload])."""
    p = _peer_setup()
    from snapshotd.node.peer.checks import REPLY_OF, check_reply
    from snapshotd.wire.errors import SnapshotdError

    flags, parts = split_parts(data)
    signed = bool(flags & 1)
    ops = sorted(REPLY_OF)
    op = ops[(flags >> 1) % len(ops)]
    if signed:
        parts = sign(parts)
    rid = parts[2] if len(parts) > 2 and len(parts[2]) == 8 else b"\0" * 8
    client = p["clients"][signed]
    try:
        reply, payload = client._decode_reply([FakeFrame(x) for x in parts], rid)
        check_reply(op, reply)
    except SnapshotdError:
        return
    assert isinstance(reply, p["ppb"].PeerReply)


# -- manifests -------------------------------------------------------------------------

_VIEW_LIMIT = 1 << 20


def manifest(data: bytes) -> None:
    """flags bit 0: require_checksums; bit 1: a segment size of payload_bytes + 4096 is
    given; part 0: a serialised ShardManifest."""
    from google.protobuf.message import DecodeError

    from snapshotd.wire import manifest as mf
    from snapshotd.wire._proto import snapshotd_pb2 as pb
    from snapshotd.wire.errors import ChecksumMismatchError, InvalidRequestError

    flags, parts = split_parts(data)
    m = pb.ShardManifest()
    try:
        m.ParseFromString(parts[0] if parts else b"")
    except DecodeError:
        return  # never reaches the daemon (RequestParseGuard) or the client (grpc)
    seg = m.payload_bytes + 4096 if flags & 2 else None
    try:
        mf.validate_manifest(m, segment_bytes=seg, require_checksums=bool(flags & 1))
    except InvalidRequestError:
        return
    # Accepted: everything the manifest says must map onto the payload.
    nb = mf.num_blocks(m.payload_bytes, m.block_size_bytes)
    assert not m.block_checksums or len(m.block_checksums) == nb
    for t in m.tensors:
        assert t.offset + t.nbytes <= m.payload_bytes, t
    for t in m.replicated_tensors:
        assert t.offset + t.nbytes <= m.replicated_bytes, t
    if m.payload_bytes <= _VIEW_LIMIT and m.replicated_bytes <= _VIEW_LIMIT:
        _view_all(m)
        if m.block_checksums:
            try:
                mf.verify_checksums(bytearray(m.payload_bytes), m)
            except ChecksumMismatchError:
                pass


def _view_all(m) -> None:
    """View every tensor of an accepted manifest out of zeroed payloads, as restore does."""
    from snapshotd.wire.dtypes import DTYPE_ITEMSIZE
    from snapshotd_client import layout as lo
    from snapshotd_client import tensors as tz

    for buf, entries in ((bytearray(m.payload_bytes), m.tensors),
                         (bytearray(m.replicated_bytes), m.replicated_tensors)):
        for t in entries:
            try:
                tz.torch_dtype(t.dtype)
            except ValueError:
                assert t.dtype in DTYPE_ITEMSIZE
                continue  # a dtype this torch build lacks: restore refuses it by name
            v = tz.view_from(buf, lo.slot_of(t))
            assert v.numel() * v.element_size() == t.nbytes, t


# -- the client's state metadata -------------------------------------------------------

_state: dict = {}


def _state_tensors():
    if not _state:
        import torch
        _state["tensors"] = [torch.arange(6, dtype=torch.float32).view(2, 3),
                             torch.arange(5, dtype=torch.int64), torch.zeros(0, dtype=torch.uint8),
                             torch.ones(1, dtype=torch.bool), torch.zeros(2, dtype=torch.bfloat16),
                             torch.zeros((), dtype=torch.complex64)]
        # an RNG capture's tensors (numpy's keys, torch's state): see fuzz_seeds.state_meta_seeds
        import numpy as np
        _state["tensors"] += [torch.from_numpy(np.random.RandomState(1).get_state()[1]),
                              torch.Generator().manual_seed(1).get_state()]
    return _state["tensors"]


def state_meta(data: bytes) -> None:
    """The whole input is the manifest's meta_json (as bytes: the client gets a str from
    protobuf, which is valid UTF-8; bytes test both)."""
    from snapshotd_client import state as st

    tensors = _state_tensors()
    try:
        meta = st.loads_meta(data)
    except ValueError:
        return
    parts = [meta] if isinstance(meta, dict) and "format" in meta else (
        [v for k, v in meta.items() if k in ("replicated", "local")] if isinstance(meta, dict) else [meta])
    for part in parts:
        try:
            state = st.unflatten_state(part, tensors)
        except ValueError:
            continue
        if isinstance(state, dict) and "rng" in state:  # what restore loads into the RNGs
            _restore_rng(st, state["rng"])


def _restore_rng(st, rng) -> None:
    """restore_rng_state raises only ValueError, and then leaves every RNG as it was."""
    saved = st.capture_rng_state()
    try:
        st.restore_rng_state(rng)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "CUDA is not available" not in str(e):
            raise  # the one documented RuntimeError: CUDA states, no CUDA here
        after = st.capture_rng_state()
        assert _rng_equal(after, saved), "a refused RNG state changed the RNGs"
    finally:
        st.restore_rng_state(saved)


def _rng_equal(a: dict, b: dict) -> bool:
    import numpy as np
    return (a["python"] == b["python"] and a["numpy"][0] == b["numpy"][0]
            and np.array_equal(a["numpy"][1], b["numpy"][1]) and a["numpy"][2:] == b["numpy"][2:]
            and bool((a["torch"] == b["torch"]).all()))


def prepare(target: str) -> None:
    """Import (under instrumentation, when the runner calls it) and build what ``target``
    uses, so no input pays for a first import (it would count against the time limit).
    The peer and service targets never import torch (a slow start)."""
    if target == "peer":
        _peer_setup()
    elif target == "handoff":
        import snapshotd.wire.handoff  # noqa: F401
    elif target in ("manifest", "state_meta"):
        import snapshotd.wire.manifest  # noqa: F401
        import snapshotd_client.layout  # noqa: F401
        import snapshotd_client.state  # noqa: F401
        import snapshotd_client.tensors  # noqa: F401
        _state_tensors()


def handoff(data: bytes) -> None:
    """flags bit 0: the frames are a reply (the client's decode_reply), else a request
    (the daemon's decode_request); parts: the frames."""
    from snapshotd.wire import handoff as hw
    from snapshotd.wire.errors import MalformedRequestError

    flags, frames = split_parts(data)
    try:
        got = hw.decode_reply(frames) if flags & 1 else hw.decode_request(frames)
    except MalformedRequestError:
        return
    rid = got[0]
    assert type(rid) is int and 0 <= rid < 1 << 64
    if flags & 1:
        _, body, code, msg = got
        assert (body is None) != (code is None) and type(msg) is str
        assert body is None or type(body) is bytes
    else:
        _, body, tok, jtok = got
        assert type(body) is bytes and tok != "" and jtok != ""
        assert hw.decode_request(hw.encode_request(rid, body, tok, jtok)) == got
        _manifest_field(body)


def _manifest_field(body: bytes) -> None:
    """The daemon's scan for the manifest's bytes in a request body (the layout check's
    shortcut): None, or exactly the bytes the parsed request's manifest came from."""
    from google.protobuf.message import DecodeError

    from snapshotd.wire.handoff import manifest_bytes
    from snapshotd.wire._proto import snapshotd_pb2 as pb

    raw = manifest_bytes(body)
    if raw is None:
        return
    assert type(raw) is bytes
    try:
        req = pb.AdoptShardRequest.FromString(body)
    except DecodeError:
        return  # the daemon refuses such a body before it looks for the field
    assert req.HasField("manifest") and pb.ShardManifest.FromString(raw) == req.manifest


def peer(data: bytes) -> None:
    """flags bit 7 set: the reply side (:func:`peer_client`), else the server's."""
    (peer_client if data[:1] and data[0] & 0x80 else peer_server)(data)


TARGETS = {
    "peer": peer,
    "handoff": handoff,
    "manifest": manifest,
    "state_meta": state_meta,
}
