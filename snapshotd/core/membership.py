"""Peer liveness, decided purely: who counts as alive, given when each peer was last heard.

The I/O side (``snapshotd.node.cluster.membership``) records the clock reading of every
reply or request from a peer and asks :func:`alive` with the current clock reading; the
clock is an argument, so the rule is tested without waiting.
"""

from __future__ import annotations

from typing import Mapping


def alive(last_seen: Mapping[str, float], now: float, timeout_ms: int) -> set[str]:
    """The peers heard from at most ``timeout_ms`` before ``now`` (both clock readings in
    seconds, from one monotonic clock). A peer never heard from is not alive."""
    limit_s = timeout_ms / 1000
    return {node for node, t in list(last_seen.items()) if now - t <= limit_s}
