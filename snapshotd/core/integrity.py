"""Pure logic for corrupt blocks: re-planning a stripe without its bad sources, and the
scrubber's plan and pacing. No sockets, threads or clocks (the clock is an argument).

Why: a block fetched for a rebuild or a degraded read that fails its xxh3 is corrupt at
its holder and must never be decoded. The erasure code needs any k of a stripe's k + m
shards, so with a spare live source the stripe is still whole: :func:`replan_stripe`
picks k sources again, leaving out the ones known bad. The I/O side
(``snapshotd.node.cluster.repairs`` / ``snapshotd.node.cluster.scrub``) carries the plans out.

The scrubber re-hashes every block a node holds for its committed versions, so that a
corrupt block nothing reads is found (and repaired) before a failure needs it.
:func:`scrub_items` lists what one pass hashes, in a fixed order; :func:`pace_delay_s`
is its rate limit (a token bucket with no burst beyond the pass's average).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable

from .placement import GroupLayout, block_of
from .recovery import Shard, StripeRepair


def stripe_shards(layout: GroupLayout, s: int) -> list[Shard]:
    """Every shard of stripe s in shard order: data/zero by position p, then parity by t."""
    data_nodes, parity_nodes = layout.stripe_nodes(s)
    out = []
    for p, node in enumerate(data_nodes):
        j = block_of(layout.n, layout.m, s, p)[1]
        out.append(Shard("zero" if j >= layout.block_counts[node] else "data", p, node, j))
    out.extend(Shard("parity", t, node, t) for t, node in enumerate(parity_nodes))
    return out


def replan_stripe(layout: GroupLayout, s: int, alive: Collection[int], excluded: Collection[Shard],
                  outputs: Iterable[Shard]) -> StripeRepair | None:
    """k sources for stripe s that avoid ``excluded`` (blocks that failed their checksum)
    and nodes not in ``alive`` (group-local indices); None when fewer than k remain.

    Virtual zero blocks are always available (nothing is fetched for them); real data
    blocks are preferred to parity (a data source is read as is), then parity rows by t.
    ``outputs`` are kept as they are (the blocks the repair must produce)."""
    bad = set(excluded)
    outs = tuple(outputs)
    out_keys = {(o.kind, o.node, o.block) for o in outs}
    cand = [x for x in stripe_shards(layout, s)
            if x.kind == "zero" or (x.node in alive and x not in bad and (x.kind, x.node, x.block) not in out_keys)]
    first = [x for x in cand if x.kind != "parity"]  # at most k: a stripe has k data positions
    parity = [x for x in cand if x.kind == "parity"]
    need = layout.k - len(first)
    if need > len(parity):
        return None
    return StripeRepair(s, tuple(first + parity[:need]), outs)


def describe_shard(x: Shard, holder: str) -> str:
    return f"{holder} data block {x.block}" if x.kind == "data" else f"{holder} parity row {x.index}"


@dataclass(frozen=True)
class ScrubItem:
    """One block to re-hash: kind "parity" (slot index, stripe s, row t) or "data"
    (rank, block i of that rank's manifest)."""

    job: str
    version: int
    kind: str
    rank: int  # data: the rank; parity: -1
    index: int  # data: block i of the rank; parity: the slot in the parity buffer
    stripe: int = -1  # parity only
    row: int = -1  # parity only

    def label(self) -> dict:
        """What the status JSON and the log show."""
        if self.kind == "parity":
            return {"job": self.job, "version": self.version, "kind": "parity",
                    "index": self.index, "stripe": self.stripe, "row": self.row}
        return {"job": self.job, "version": self.version, "kind": "data", "rank": self.rank,
                "index": self.index}


def scrub_items(jobs: dict) -> list[ScrubItem]:
    """What one pass hashes, in order: per job (by name), its parity slots, then its
    ranks' data blocks. ``jobs``: job -> {"version": v, "parity": [(s, t), ...] by slot
    (empty when none is held or it is not sealed), "ranks": {rank: number of blocks}}."""
    out = []
    for job in sorted(jobs):
        j = jobs[job]
        v = int(j["version"])
        for slot, (s, t) in enumerate(j.get("parity", ())):
            out.append(ScrubItem(job, v, "parity", -1, slot, s, t))
        for rank, nblocks in sorted(j.get("ranks", {}).items()):
            out.extend(ScrubItem(job, v, "data", rank, i) for i in range(nblocks))
    return out


def pace_delay_s(done_bytes: int, started_s: float, now_s: float, rate_bytes_per_s: int) -> float:
    """Seconds to wait before hashing more, so that ``done_bytes`` since ``started_s``
    stay within ``rate_bytes_per_s`` (0 = no limit)."""
    if rate_bytes_per_s <= 0:
        return 0.0
    return max(0.0, started_s + done_bytes / rate_bytes_per_s - now_s)


def next_pass_delay_s(last_start_s: float | None, now_s: float, interval_s: float) -> float:
    """Seconds until the next full pass may start: passes start at most every
    ``interval_s`` (the first one ``interval_s`` after the daemon started: a fresh daemon
    has just verified or rebuilt what it holds); a pass longer than that is followed at
    once by the next."""
    if last_start_s is None:
        return max(0.0, interval_s)
    return max(0.0, last_start_s + interval_s - now_s)
