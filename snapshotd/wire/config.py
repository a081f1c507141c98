"""Environment variables, defaults and size parsing shared by the daemon and the client."""

from __future__ import annotations

import os
import re
import socket

ENV_NODE_ID = "SNAPSHOTD_NODE_ID"
ENV_STATE_DIR = "SNAPSHOTD_STATE_DIR"
ENV_SOCKET = "SNAPSHOTD_SOCKET"
ENV_TCP = "SNAPSHOTD_TCP"
ENV_TOKEN = "SNAPSHOTD_TOKEN"
ENV_MEMORY_BUDGET = "SNAPSHOTD_MEMORY_BUDGET_BYTES"
ENV_JOB_ID = "SNAPSHOTD_JOB_ID"
ENV_ISAL_LIB = "SNAPSHOTD_ISAL_LIB"
ENV_JOB_TOKEN = "SNAPSHOTD_JOB_TOKEN"
ENV_SHM_DIR = "SNAPSHOTD_SHM_DIR"

# Fraction of available RAM a daemon may hold when no budget is given.
DEFAULT_BUDGET_FRACTION = 0.8

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]i?[bB]?|[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """'8GiB' -> 8589934592, '500M' -> 500000000, '1024' -> 1024."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 1048576, 512MiB, 8GiB, 2G)")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


def default_node_id() -> str:
    return os.environ.get(ENV_NODE_ID) or re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:63]


def default_state_dir(node_id: str | None = None) -> str:
    return os.environ.get(ENV_STATE_DIR) or os.path.join(
        f"/tmp/snapshotd-{os.getuid()}", node_id or default_node_id())


def default_socket_path(state_dir: str | None = None) -> str:
    return os.environ.get(ENV_SOCKET) or os.path.join(state_dir or default_state_dir(), "snapshotd.sock")


def default_memory_budget_bytes() -> int:
    env = os.environ.get(ENV_MEMORY_BUDGET)
    if env:
        return parse_size(env)
    import psutil

    return int(psutil.virtual_memory().available * DEFAULT_BUDGET_FRACTION)

# The durable tier (snapshotd.node.durable; docs/DURABLE.md): the daemon's flags' env vars,
# also read by Snapshotter.restore()'s durable rung (the URL and the S3 endpoint).
ENV_DURABLE_URL = "SNAPSHOTD_DURABLE_URL"
ENV_WHEN_BUSY = "SNAPSHOTD_WHEN_BUSY"  # client: "wait" (default) or "skip", SnapshotterConfig.when_busy
ENV_DURABLE_EVERY_VERSIONS = "SNAPSHOTD_DURABLE_EVERY_VERSIONS"
ENV_DURABLE_EVERY_S = "SNAPSHOTD_DURABLE_EVERY_S"
ENV_DURABLE_KEEP = "SNAPSHOTD_DURABLE_KEEP"
ENV_DURABLE_RATE = "SNAPSHOTD_DURABLE_RATE"
ENV_DURABLE_REPLICATED = "SNAPSHOTD_DURABLE_REPLICATED"
ENV_DURABLE_S3_ENDPOINT = "SNAPSHOTD_DURABLE_S3_ENDPOINT"
# Test hook: "mid-file" or "before-index" stalls every flush there (tests SIGKILL it).
ENV_DURABLE_TEST_STALL = "SNAPSHOTD_DURABLE_TEST_STALL"
DEFAULT_DURABLE_KEEP = 3
