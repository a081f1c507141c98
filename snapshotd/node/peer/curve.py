"""Optional ZeroMQ CURVE encryption and authentication of the peer plane.

With ``peer_encryption: curve`` in the cluster spec every peer connection is a CURVE
session (Curve25519 key exchange, XSalsa20-Poly1305 for every frame): the payloads are
encrypted and tamper-proof on the wire, and only holders of an allowed key can connect.

Keys are not distributed: each node's keypair is derived from the spec's ``peer_key``
and its node id with HKDF-SHA256, so every node can compute every other node's public
key, and the server side admits exactly the spec's nodes' public keys (a ZAP handler).
Consequence (the same trust model as the HMAC): whoever knows ``peer_key`` can derive
any node's secret key and impersonate it. The peer key is the cluster's root secret;
CURVE adds confidentiality and per-frame integrity, not a finer trust boundary.

The HMAC of each header stays on under CURVE (it costs a few microseconds per message):
it binds the sender id inside the message to the key, independent of the transport.

Handshakes that fail (a wrong or unknown key) never reach the peer server's loop; they
are counted in :attr:`CurvePeers.denied` (read by the metrics) from a socket monitor
and logged (rate-limited). The caller sees its requests time out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading

import zmq
from zmq.utils import z85

log = logging.getLogger("snapshotd.peer")

_SALT = b"snapshotd-peer-curve-v1"


def _hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(_SALT, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def derive_keypair(peer_key: bytes, node_id: str) -> tuple[bytes, bytes]:
    """(public, secret) CURVE keys of ``node_id``, Z85-encoded, derived from ``peer_key``."""
    if not peer_key:
        raise ValueError("CURVE keys are derived from the peer key: the spec needs a peer_key")
    secret = z85.encode(_hkdf_sha256(bytes(peer_key), b"node:" + node_id.encode("utf-8")))
    return zmq.curve_public(secret), secret


def available() -> bool:
    return bool(zmq.has("curve"))


class _Provider:
    """ZAP credentials provider for one domain: the allowed client public keys."""

    def __init__(self, allowed: frozenset[bytes]):
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed


_auth_lock = threading.Lock()
_auth = None  # one ZAP handler per ZeroMQ context (the process-wide instance)


def _register_domain(domain: str, allowed: frozenset[bytes]) -> None:
    global _auth
    from zmq.auth.thread import ThreadAuthenticator

    with _auth_lock:
        if _auth is None:
            _auth = ThreadAuthenticator(zmq.Context.instance(), log=logging.getLogger("snapshotd.zap"))
            _auth.start()
        _auth.configure_curve_callback(domain, _Provider(allowed))


class CurvePeers:
    """CURVE setup for the sockets of one node of a cluster spec."""

    def __init__(self, peer_key: bytes, node_id: str, node_ids):
        if not available():
            raise ValueError("peer_encryption: curve needs libzmq built with CURVE "
                             "(pyzmq wheels have it; zmq.has('curve') is False here)")
        self.node_id = node_id
        self.public_of = {nid: derive_keypair(peer_key, nid)[0] for nid in node_ids}
        if node_id not in self.public_of:
            raise ValueError(f"node {node_id!r} is not in the spec")
        self.public, self.secret = derive_keypair(peer_key, node_id)
        allowed = frozenset(self.public_of.values())
        # One ZAP domain per set of allowed keys, so clusters in one process never mix.
        self.domain = "snapshotd-" + hashlib.sha256(b"".join(sorted(allowed))).hexdigest()[:16]
        self._allowed = allowed
        self.denied = 0
        self._monitors: list[threading.Thread] = []

    def setup_server(self, sock: zmq.Socket) -> None:
        """Call before ``bind``: the socket serves CURVE and admits only spec nodes."""
        _register_domain(self.domain, self._allowed)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_MONITOR_STOPPED)
        t = threading.Thread(target=self._watch, args=(mon,), name=f"peer-curve-{self.node_id}", daemon=True)
        t.start()
        self._monitors.append(t)

    def setup_client(self, sock: zmq.Socket, peer_id: str) -> None:
        """Call before ``connect``: the socket talks CURVE to ``peer_id`` as this node."""
        try:
            server_key = self.public_of[peer_id]
        except KeyError:
            raise ValueError(f"peer {peer_id!r} is not in the spec") from None
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def _watch(self, mon: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        try:
            while True:
                ev = recv_monitor_message(mon)
                if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                self.denied += 1
                if self.denied <= 10 or self.denied % 100 == 0:
                    log.warning("peer server %s: CURVE handshake refused from %s (%s; %d so far): "
                                "wrong peer_key or a host outside the spec", self.node_id,
                                ev.get("endpoint", b"?").decode("utf-8", "replace"),
                                "key not allowed" if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                else "cannot decrypt", self.denied)
        except zmq.ZMQError:
            return
        finally:
            mon.close(linger=0)
