"""Generated protobuf/gRPC modules (built from proto/ by setup.py, not committed)."""

try:
    from snapshotd.wire._proto import snapshotd_pb2, snapshotd_pb2_grpc  # noqa: F401
except ImportError as exc:  # pragma: no cover - only without an install
    raise ImportError(
        "snapshotd's generated gRPC code is missing: install the package "
        "(pip install -e .) so that setup.py generates it from proto/"
    ) from exc
