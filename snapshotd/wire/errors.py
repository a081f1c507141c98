"""Every error snapshotd reports, and the one table that names them on the wire.

Every error derives from :class:`SnapshotdError` and has two names:

* ``code``: a stable string naming the class itself (``"UNKNOWN_JOB"``). It travels
  beside the gRPC status (trailing metadata ``x-snapshotd-error``) and in peer-plane
  error replies, so the receiver raises the *same* class the sender raised, never a
  lossy guess from the status alone;
* ``grpc_code_name``: the ``grpc.StatusCode`` member the daemon answers with (a plain
  string: the core never imports grpc).

:data:`ERROR_CLASSES` is the table, code -> class; :func:`error_for` is its other
direction (class or instance -> code) and :func:`from_code` builds an error from a
code, falling back on the status when the code is missing or unknown (a status made by
grpc itself, such as UNAVAILABLE for a dead daemon, carries no code). The service
(:mod:`snapshotd.node.service`), the client (:mod:`snapshotd_client.transport`) and the
peer plane (:mod:`snapshotd.node.peer`) all go through these two functions.
"""

from __future__ import annotations


class SnapshotdError(Exception):
    """Base class. ``code`` names the class on the wire; ``grpc_code_name`` names a
    ``grpc.StatusCode`` member."""

    code = "SNAPSHOTD_ERROR"
    grpc_code_name = "INTERNAL"


class InvalidRequestError(SnapshotdError, ValueError):
    """Malformed input: bad manifest, overflowing offsets, unknown dtype, wrong length."""

    code = "INVALID_REQUEST"
    grpc_code_name = "INVALID_ARGUMENT"


class MalformedRequestError(InvalidRequestError):
    """A request message whose bytes do not parse as the method's protobuf type (raised
    from a streamed request's iterator; see ``snapshotd.node.server.RequestParseGuard``)."""

    code = "MALFORMED_REQUEST"


class ChecksumMismatchError(SnapshotdError):
    """Bytes do not match the checksum recorded for them."""

    code = "CHECKSUM_MISMATCH"
    grpc_code_name = "DATA_LOSS"


class UnknownJobError(SnapshotdError, KeyError):
    code = "UNKNOWN_JOB"
    grpc_code_name = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class UnknownRankError(UnknownJobError):
    code = "UNKNOWN_RANK"


class VersionNotFoundError(UnknownJobError):
    code = "VERSION_NOT_FOUND"


class NotHeldError(UnknownJobError):
    """A peer does not hold (or not yet: it is still rebuilding) what was asked of it."""

    code = "NOT_HELD"


class ConflictError(SnapshotdError):
    """The request contradicts the current state (e.g. re-registering a job differently)."""

    code = "CONFLICT"
    grpc_code_name = "FAILED_PRECONDITION"


class InsufficientShardsError(ConflictError):
    """Too few blocks survive to decode (more than m erasures in a stripe)."""

    code = "INSUFFICIENT_SHARDS"


class CheckFreeUnavailableError(ConflictError):
    """The stage's shard is lost and CheckFree cannot rebuild it either (the reason says why)."""

    code = "CHECKFREE_UNAVAILABLE"


class SnapshotInFlightError(ConflictError):
    """Every slot of the rank is busy with versions not yet committed: this snapshot
    is skipped (the older ones must commit first, or nothing ever would)."""

    code = "SNAPSHOT_IN_FLIGHT"
    grpc_code_name = "ABORTED"


class SnapshotSkippedError(SnapshotInFlightError):
    """This snapshot is skipped at once, and waiting would not help: its version can
    never commit (another rank moved past it), or the rank's slots wait for a rank of
    the node that has not started those versions (behind, or away). Nothing changed."""

    code = "SNAPSHOT_SKIPPED"


class MemoryBudgetExceededError(SnapshotdError):
    """Accepting the request would exceed the daemon's memory budget."""

    code = "MEMORY_BUDGET_EXCEEDED"
    grpc_code_name = "RESOURCE_EXHAUSTED"


class AuthenticationError(SnapshotdError):
    code = "AUTHENTICATION"
    grpc_code_name = "UNAUTHENTICATED"


class JobAccessDeniedError(SnapshotdError):
    """The request names a job bound to a job token it does not carry."""

    code = "JOB_ACCESS_DENIED"
    grpc_code_name = "PERMISSION_DENIED"


class BackendUnavailableError(SnapshotdError):
    """A requested erasure backend (e.g. ISA-L) cannot be loaded."""

    code = "BACKEND_UNAVAILABLE"
    grpc_code_name = "UNAVAILABLE"


class DaemonUnavailableError(SnapshotdError):
    """Client side: the local daemon cannot be reached (or did not answer in time)."""

    code = "DAEMON_UNAVAILABLE"
    grpc_code_name = "UNAVAILABLE"


class DaemonError(SnapshotdError):
    """Client side: the daemon answered a status no specific class stands for."""

    code = "DAEMON_ERROR"
    grpc_code_name = "UNKNOWN"


class PeerUnavailableError(SnapshotdError):
    """Peer plane: the peer did not answer in time, is down, or the client was closed."""

    code = "PEER_UNAVAILABLE"
    grpc_code_name = "UNAVAILABLE"


class PeerAuthError(SnapshotdError):
    """Peer plane: a message failed authentication (missing/wrong MAC, unexpected sender)."""

    code = "PEER_AUTH"
    grpc_code_name = "UNAUTHENTICATED"


class PeerProtocolError(SnapshotdError):
    """Peer plane: a message violates the wire format (framing, header, payload
    length/checksum)."""

    code = "PEER_PROTOCOL"
    grpc_code_name = "INVALID_ARGUMENT"


class RemoteError(SnapshotdError):
    """Peer plane: the peer answered with an error reply.

    ``error_code`` is the remote error's code (a key of :data:`ERROR_CLASSES`),
    ``message`` its message; :attr:`error_class` is the class that code names and
    ``grpc_code_name`` that class's status.
    """

    code = "REMOTE"

    def __init__(self, error_code: str, message: str, peer_id: str | None = None):
        self.error_code = str(error_code)
        self.message = str(message)
        self.peer_id = peer_id
        self.grpc_code_name = self.error_class.grpc_code_name
        where = f" from {peer_id}" if peer_id else ""
        super().__init__(f"remote {self.error_code}{where}: {self.message}")

    @property
    def error_class(self) -> type[SnapshotdError]:
        return ERROR_CLASSES.get(self.error_code, SnapshotdError)

    def is_a(self, *classes: type[BaseException]) -> bool:
        """The remote error is (a subclass of) one of ``classes``."""
        return issubclass(self.error_class, classes)


# The table: code -> class. Every SnapshotdError subclass defined above, in order; the
# first class listed for a gRPC status is the one a status without a code turns into.
ERROR_CLASSES: dict[str, type[SnapshotdError]] = {}
for _cls in (SnapshotdError, InvalidRequestError, MalformedRequestError, ChecksumMismatchError,
             UnknownJobError, UnknownRankError, VersionNotFoundError, NotHeldError,
             ConflictError, InsufficientShardsError, CheckFreeUnavailableError,
             SnapshotInFlightError, SnapshotSkippedError, MemoryBudgetExceededError, AuthenticationError,
             JobAccessDeniedError, DaemonUnavailableError, BackendUnavailableError, DaemonError,
             PeerUnavailableError, PeerAuthError, PeerProtocolError, RemoteError):
    if _cls.code in ERROR_CLASSES:
        raise AssertionError(f"error code {_cls.code} is used twice")
    ERROR_CLASSES[_cls.code] = _cls

# A status that arrives without a code (made by grpc itself, or by an older daemon).
_BY_STATUS: dict[str, type[SnapshotdError]] = {}
for _cls in ERROR_CLASSES.values():
    if _cls not in (SnapshotdError, RemoteError):
        _BY_STATUS.setdefault(_cls.grpc_code_name, _cls)
_BY_STATUS["DEADLINE_EXCEEDED"] = DaemonUnavailableError
_BY_STATUS["INTERNAL"] = DaemonError


def error_for(exc: BaseException | type) -> str:
    """The code of an error (instance or class); a foreign exception is ``SNAPSHOTD_ERROR``."""
    cls = exc if isinstance(exc, type) else type(exc)
    if isinstance(exc, RemoteError):
        return exc.error_code
    for c in cls.__mro__:
        if c in ERROR_CLASSES.values():
            return c.code
    return SnapshotdError.code


def from_code(code: str | None, message: str, grpc_code_name: str | None = None) -> SnapshotdError:
    """An instance of the class ``code`` names (else the class for the status, else
    :class:`DaemonError`), with ``message``."""
    cls = ERROR_CLASSES.get(code or "")
    if cls is None or cls is RemoteError:
        cls = _BY_STATUS.get(grpc_code_name or "", DaemonError)
    return cls(message)
