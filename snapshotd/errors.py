"""Error hierarchy for snapshotd.

Every error the daemon can report derives from :class:`SnapshotdError` and carries
one gRPC status code (``grpc_code_name``), so the service maps errors to statuses in
exactly one place (``snapshotd.service``) and the client maps them back.
The pure core raises these too; it never imports grpc, so the code is a plain name.
"""

from __future__ import annotations


class SnapshotdError(Exception):
    """Base class. ``grpc_code_name`` names a ``grpc.StatusCode`` member."""

    grpc_code_name = "INTERNAL"


class InvalidRequestError(SnapshotdError, ValueError):
    """Malformed input: bad manifest, overflowing offsets, unknown dtype, wrong length."""

    grpc_code_name = "INVALID_ARGUMENT"


class ChecksumMismatchError(SnapshotdError):
    """Bytes do not match the checksum recorded for them."""

    grpc_code_name = "DATA_LOSS"


class UnknownJobError(SnapshotdError, KeyError):
    grpc_code_name = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class UnknownRankError(UnknownJobError):
    grpc_code_name = "NOT_FOUND"


class VersionNotFoundError(UnknownJobError):
    grpc_code_name = "NOT_FOUND"


class ConflictError(SnapshotdError):
    """The request contradicts the current state (e.g. re-registering a job differently)."""

    grpc_code_name = "FAILED_PRECONDITION"


class SnapshotInFlightError(ConflictError):
    """Every slot of the rank is busy with versions not yet committed: this snapshot
    is skipped (the older ones must commit first, or nothing ever would)."""

    grpc_code_name = "ABORTED"


class MemoryBudgetExceededError(SnapshotdError):
    """Accepting the request would exceed the daemon's memory budget."""

    grpc_code_name = "RESOURCE_EXHAUSTED"


class AuthenticationError(SnapshotdError):
    grpc_code_name = "UNAUTHENTICATED"


class InsufficientShardsError(SnapshotdError):
    """Too few blocks survive to decode (more than m erasures in a stripe)."""

    grpc_code_name = "FAILED_PRECONDITION"


class BackendUnavailableError(SnapshotdError):
    """A requested erasure backend (e.g. ISA-L) cannot be loaded."""

    grpc_code_name = "UNAVAILABLE"


class DaemonUnavailableError(SnapshotdError):
    """Client side: the local daemon cannot be reached."""

    grpc_code_name = "UNAVAILABLE"
