"""Node blocks <-> rank blocks: the one walk between a node's data and its ranks.

A node's *data* for a version is the concatenation, in rank order, of its local ranks'
payloads, each cut into ``block_size`` blocks (a rank's last block is zero-padded), so
node block j means the same bytes on every node that reasons about it. This module is
the only place that walks that layout; the store (reading block j), the commit driver
(counting blocks), the scrubber (block j -> rank), the repairer (rank block -> node
block) and the degraded read (a rank's blocks in its owner's data) all ask it.

Pure: it sees only (rank, payload_bytes) pairs, never a segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


def num_blocks(payload_bytes: int, block_size_bytes: int) -> int:
    """Blocks of ``block_size_bytes`` a payload of ``payload_bytes`` occupies."""
    return (payload_bytes + block_size_bytes - 1) // block_size_bytes


@dataclass(frozen=True)
class RankSpan:
    """Rank ``rank``'s blocks in its node's data: node blocks first .. first + count - 1."""

    rank: int
    first: int
    count: int
    payload_bytes: int

    def block_bytes(self, i: int, block_size_bytes: int) -> int:
        """Real (unpadded) bytes in the rank's block i."""
        return min(block_size_bytes, self.payload_bytes - i * block_size_bytes)


@dataclass(frozen=True)
class BlockMap:
    """The node-block layout of one node's data for one version."""

    block_size_bytes: int
    spans: tuple[RankSpan, ...]

    @property
    def total_blocks(self) -> int:
        return sum(s.count for s in self.spans)

    def locate(self, j: int) -> tuple[RankSpan, int] | None:
        """Node block j -> (its rank's span, the block's index within the rank), or None
        past the node's data (a virtual zero block)."""
        for s in self.spans:
            if s.first <= j < s.first + s.count:
                return s, j - s.first
        return None

    def span_of(self, rank: int) -> RankSpan | None:
        for s in self.spans:
            if s.rank == rank:
                return s
        return None

    def node_block(self, rank: int, i: int) -> int:
        """The rank's block i -> node block j."""
        s = self.span_of(rank)
        if s is None or not 0 <= i < s.count:
            raise KeyError(f"rank {rank} has no block {i}")
        return s.first + i


def map_blocks(ranks: Iterable[tuple[int, int]], block_size_bytes: int) -> BlockMap:
    """``ranks``: (rank, payload_bytes) in the node's rank order -> its :class:`BlockMap`."""
    if block_size_bytes <= 0:
        raise ValueError(f"block size must be positive, got {block_size_bytes}")
    spans, first = [], 0
    for rank, nbytes in ranks:
        nb = num_blocks(int(nbytes), block_size_bytes)
        spans.append(RankSpan(int(rank), first, nb, int(nbytes)))
        first += nb
    return BlockMap(block_size_bytes, tuple(spans))


def map_manifests(ranks: Sequence[int], manifests: Sequence, block_size_bytes: int) -> BlockMap:
    """The same from ranks and their ShardManifests (anything with ``payload_bytes``)."""
    return map_blocks(((r, m.payload_bytes) for r, m in zip(ranks, manifests)), block_size_bytes)
