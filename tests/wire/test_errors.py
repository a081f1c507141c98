"""One map, both directions: every error class crosses a wire and comes back as itself.

* gRPC: a real server on port 0 answers through the daemon's own mapping
  (``snapshotd.node.service._abort``); the client reads the status through its own
  translation (``snapshotd_client.transport._translate``) and must get an instance of
  exactly the class that was raised, with its message.
* A status without a code (made by grpc itself) or with a code nobody knows falls back
  on the status.
* Peer plane: ``remote_error_code`` on the server, ``RemoteError(code, ...)`` on the
  client names the class again (as a function pair and over a real ZeroMQ peer).
* The table itself: codes unique, every class listed, ``error_for`` / ``from_code``
  inverse on it.
"""

from __future__ import annotations

import inspect
import time
from concurrent import futures

import grpc
import pytest

from snapshotd.node.peer import PeerClient, PeerServer, peer_pb2, remote_error_code
from snapshotd.node.service import _abort
from snapshotd.wire import errors
from snapshotd.wire.errors import (
    ERROR_CLASSES,
    RemoteError,
    SnapshotdError,
    error_for,
    from_code,
)
from snapshotd.wire.limits import ERROR_METADATA_KEY
from snapshotd_client.transport import _translate

METHOD = "/snapshotd.test.Errors/Raise"
CALL_TIMEOUT_S = 5.0
NO_PROXY = [("grpc.enable_http_proxy", 0)]  # as the client sets it

# Every concrete class a sender may raise (the base class and the peer plane's wrapper
# are not raised as themselves).
RAISED = sorted((c for c in ERROR_CLASSES.values() if c not in (SnapshotdError, RemoteError)),
                key=lambda c: c.code)


def message_for(cls: type) -> str:
    return f"{cls.__name__} raised on purpose: job j1, rank 3"


# -- a tiny gRPC server: the request names what to answer -----------------------------------
def _handle(request: bytes, context):
    """Request "raise:<CODE>": raise that class through the daemon's mapping.
    "status:<STATUS>:<metadata code or ''>": abort with a bare status (and that code).
    "sleep:<seconds>": answer late."""
    kind, _, rest = request.decode().partition(":")
    if kind == "raise":
        cls = ERROR_CLASSES[rest]
        _abort(context, cls(message_for(cls)))
    if kind == "status":
        status, _, code = rest.partition(":")
        if code:
            context.set_trailing_metadata(((ERROR_METADATA_KEY, code),))
        context.abort(getattr(grpc.StatusCode, status), f"bare {status}")
    if kind == "sleep":
        time.sleep(float(rest))
    return b"ok"


class _Handler(grpc.GenericRpcHandler):
    def service(self, handler_call_details):
        if handler_call_details.method == METHOD:
            return grpc.unary_unary_rpc_method_handler(_handle)  # bytes in, bytes out
        return None


@pytest.fixture(scope="module")
def call():
    """call(request) -> the error the client's translation makes of the answer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY)
    stub = channel.unary_unary(METHOD)

    def _call(request: str, timeout_s: float = CALL_TIMEOUT_S) -> SnapshotdError:
        try:
            stub(request.encode(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return _translate(exc, "Raise")
        raise AssertionError(f"{request}: the call succeeded")

    yield _call
    channel.close()
    server.stop(None)


@pytest.mark.parametrize("cls", RAISED, ids=lambda c: c.code)
def test_every_class_survives_a_grpc_status(call, cls):
    err = call(f"raise:{cls.code}")
    assert type(err) is cls, f"{cls.__name__} came back as {type(err).__name__}: {err}"
    assert str(err) == f"Raise: {message_for(cls)}"
    assert err.grpc_code == getattr(grpc.StatusCode, cls.grpc_code_name)


@pytest.mark.parametrize("status, expected", [
    ("UNAVAILABLE", errors.DaemonUnavailableError),
    ("DEADLINE_EXCEEDED", errors.DaemonUnavailableError),
    ("INTERNAL", errors.DaemonError),
    ("UNKNOWN", errors.DaemonError),
    ("NOT_FOUND", errors.UnknownJobError),
    ("FAILED_PRECONDITION", errors.ConflictError),
    ("RESOURCE_EXHAUSTED", errors.MemoryBudgetExceededError),
    ("OUT_OF_RANGE", errors.DaemonError),  # a status no class stands for
])
@pytest.mark.parametrize("code", ["", "NO_SUCH_CODE", RemoteError.code],
                         ids=["no-code", "unknown-code", "remote-code"])
def test_a_status_without_a_known_code_falls_back_on_the_status(call, status, expected, code):
    err = call(f"status:{status}:{code}")
    assert type(err) is expected, f"{status}/{code!r} came back as {type(err).__name__}: {err}"
    assert str(err) == f"Raise: bare {status}"
    assert err.grpc_code == getattr(grpc.StatusCode, status)


def test_grpcs_own_deadline_is_daemon_unavailable(call):
    err = call("sleep:2", timeout_s=0.2)
    assert type(err) is errors.DaemonUnavailableError
    assert err.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_grpcs_own_unavailable_is_daemon_unavailable(tmp_path):
    """Nobody listens on the socket: grpc itself answers UNAVAILABLE, with no code beside
    it. (A unix socket, as the local daemon is reached: a closed TCP port may instead
    time out, depending on the host's firewall.)"""
    target = f"unix:{tmp_path / 'nobody.sock'}"
    with grpc.insecure_channel(target, options=NO_PROXY) as channel:
        with pytest.raises(grpc.RpcError) as ei:
            channel.unary_unary(METHOD)(b"raise:UNKNOWN_JOB", timeout=CALL_TIMEOUT_S)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    err = _translate(ei.value, "Raise")
    assert type(err) is errors.DaemonUnavailableError


# -- peer plane -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", RAISED, ids=lambda c: c.code)
def test_every_class_survives_a_peer_error_reply(cls):
    code = remote_error_code(cls("m"))
    remote = RemoteError(code, "m", peer_id="n1")
    assert remote.error_class is cls
    assert remote.is_a(cls) and remote.grpc_code_name == cls.grpc_code_name
    assert isinstance(remote, SnapshotdError)


def test_foreign_handler_errors_have_codes_of_their_own():
    assert RemoteError(remote_error_code(KeyError("x")), "m").error_class is errors.NotHeldError
    assert (RemoteError(remote_error_code(ValueError("x")), "m").error_class
            is errors.InvalidRequestError)
    assert RemoteError(remote_error_code(RuntimeError("x")), "m").error_class is SnapshotdError
    # A RemoteError passed on names the remote class, not itself.
    inner = RemoteError(errors.ChecksumMismatchError.code, "m")
    assert RemoteError(remote_error_code(inner), "m").error_class is errors.ChecksumMismatchError


def test_every_class_survives_a_real_peer():
    """The same round trip over ZeroMQ: a handler raising each class in turn. (The
    request is a plain "fence" op whose job names the class to raise: any op of the
    peer schema would do.)"""

    def handler(sender, request, payload):
        cls = ERROR_CLASSES[request.fence.job]
        raise cls(message_for(cls))

    server = PeerServer("tcp://127.0.0.1:0", "srv", None, None, handler).start()
    client = PeerClient(f"tcp://127.0.0.1:{server.port}", "cli", "srv", None, timeout_ms=3000)
    try:
        for cls in RAISED:
            with pytest.raises(RemoteError) as ei:
                client.call(peer_pb2.PeerRequest(fence=peer_pb2.FenceRequest(job=cls.code)))
            e = ei.value
            assert e.error_class is cls, (cls, e.error_code)
            assert e.error_code == cls.code and e.message == message_for(cls) and e.peer_id == "srv"
    finally:
        client.close()
        server.stop()


# -- the table ------------------------------------------------------------------------------
def test_every_error_class_is_in_the_table_once():
    defined = {obj for _, obj in inspect.getmembers(errors, inspect.isclass)
               if issubclass(obj, SnapshotdError) and obj.__module__ == errors.__name__}
    assert defined == set(ERROR_CLASSES.values())
    codes = [c.code for c in ERROR_CLASSES.values()]
    assert len(codes) == len(set(codes))
    # Every subclass names its own code (none inherits its parent's).
    for cls in ERROR_CLASSES.values():
        assert "code" in vars(cls), f"{cls.__name__} inherits its code"
        assert isinstance(getattr(grpc.StatusCode, cls.grpc_code_name), grpc.StatusCode)


@pytest.mark.parametrize("code, cls", sorted(ERROR_CLASSES.items()),
                         ids=lambda x: getattr(x, "__name__", x))
def test_error_for_and_from_code_are_inverse(code, cls):
    assert error_for(cls) == code
    if cls is RemoteError:  # a RemoteError names the remote class; REMOTE itself travels never
        remote = RemoteError(errors.UnknownJobError.code, "m")
        assert error_for(remote) == errors.UnknownJobError.code
        assert type(from_code(code, "m", "NOT_FOUND")) is errors.UnknownJobError
        return
    assert error_for(cls("m")) == code
    err = from_code(code, "m", "OUT_OF_RANGE")
    assert type(err) is cls and str(err) == "m"
    assert error_for(err) == code


def test_foreign_exceptions_are_the_base_code():
    assert error_for(RuntimeError("x")) == SnapshotdError.code
    assert type(from_code(None, "m")) is errors.DaemonError
    assert type(from_code("", "m", "UNAVAILABLE")) is errors.DaemonUnavailableError
