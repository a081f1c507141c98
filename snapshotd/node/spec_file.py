"""Reading the cluster spec from a file (the pure parsing is :func:`snapshotd.core.spec.parse_spec`)."""

from __future__ import annotations

from snapshotd.core.spec import ClusterSpec, parse_spec
from snapshotd.wire.errors import InvalidRequestError


def load_spec(path: str) -> ClusterSpec:
    """Read and validate a YAML cluster spec file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InvalidRequestError(f"cannot read cluster spec {path}: {e.strerror or e}") from None
    try:
        return parse_spec(text)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{path}: {e}") from None
