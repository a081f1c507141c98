"""Recovery planner: what to fetch from whom to rebuild lost blocks of a group, or why not.

Pure: it reads a :class:`~snapshotd.core.placement.GroupLayout` and the sets of group-local
node indices that are *alive* (still hold their data and parity) and that are *targets*
(their data and parity must be rebuilt). Nodes in neither set are dead and not rebuilt
now; their shards are unavailable but produce no outputs.

For each stripe with a lost real block of a target, a :class:`StripeRepair` names exactly
k sources, in shard order (``Shard.shard_index``: p for data/zero, k + t for parity, as in
``ErasureCode``): every virtual zero block (known zeros, nothing fetched) and every alive
data block, then as many alive parity rows as are still needed, taken from the holders
with the least load so far in this plan (ties: lower t). Feed them to
``ErasureCode.reconstruct`` with zero buffers for the "zero" sources. Any stripe with a
target output and more than m unavailable real shards makes the plan
:class:`Unrecoverable` (virtual zero blocks are never lost).

The daemon's rebuild and degraded read plan through :func:`snapshotd.core.repair.plan_repair`,
which calls :func:`plan_recovery` and keeps the outputs each wants.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Collection, NamedTuple

from snapshotd.wire.errors import InvalidRequestError
from .placement import GroupLayout, data_stripe_of

_SHOWN = 4  # missing blocks named in an Unrecoverable reason


class Shard(NamedTuple):
    """One shard of a stripe: kind "data" (block = j), "parity" (block = t) or "zero"
    (a virtual zero data block: node/block name it, nothing is stored or fetched)."""

    kind: str
    index: int  # data position p (data, zero) or parity row t (parity)
    node: int
    block: int  # j for data and zero, t for parity

    def shard_index(self, k: int) -> int:
        """The shard index ``ErasureCode`` uses: p for data/zero, k + t for parity."""
        return self.index if self.kind != "parity" else k + self.index


# Shard(kind, index, node, block) without NamedTuple's Python-level __new__: a 4096-node
# job's recovery pass builds about a million of them.
_shard = partial(tuple.__new__, Shard)


@dataclass(frozen=True)
class StripeRepair:
    stripe: int
    sources: tuple[Shard, ...]  # exactly k, in shard order (data/zero by p, then parity by t)
    outputs: tuple[Shard, ...]  # lost real data and parity blocks of target nodes

    def fetches(self) -> tuple[Shard, ...]:
        """The sources that must actually be read (not "zero")."""
        return tuple(x for x in self.sources if x.kind != "zero")


@dataclass(frozen=True)
class RecoveryPlan:
    version: int
    group: int
    k: int
    m: int
    repairs: tuple[StripeRepair, ...]
    ok = True

    def fetch_counts(self, block_size: int = 1) -> dict[int, int]:
        """Bytes (blocks, with the default block_size 1) to read from each source node."""
        c: Counter[int] = Counter()
        for r in self.repairs:
            for x in r.fetches():
                c[x.node] += block_size
        return dict(sorted(c.items()))

    def outputs_of(self, node: int) -> list[tuple[int, Shard]]:
        """[(stripe, shard)]: the blocks this plan rebuilds for ``node``."""
        return [(r.stripe, o) for r in self.repairs for o in r.outputs if o.node == node]


@dataclass(frozen=True)
class Unrecoverable:
    reason: str
    missing: tuple[tuple[int, str, int], ...]  # (node, kind, j or t) lost in failing stripes
    stripes: tuple[int, ...] = ()  # the stripes with more than m lost shards
    ok = False


def _node_set(n: int, nodes: Collection[int], what: str) -> frozenset[int]:
    out = set()
    for x in nodes:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
            raise InvalidRequestError(f"{what} node {x!r} out of range (group-local indices 0..{n - 1})")
        out.add(x)
    return frozenset(out)


def _describe(x: tuple[int, str, int]) -> str:
    node, kind, idx = x
    return f"node {node} data block {idx}" if kind == "data" else f"node {node} parity {idx}"


def _repair(layout: GroupLayout, s: int, alive: frozenset[int], wanted: Callable[[Shard], bool],
            load: Counter):
    """(StripeRepair or None, lost shards) for stripe s; ``wanted(shard)`` picks outputs."""
    n = layout.n
    known, data, parity, lost = [], [], [], []  # known: zero and alive data shards, by p
    for p, (node, j, real) in enumerate(layout.stripe_blocks(s)):
        if not real:
            known.append(_shard(("zero", p, node, j)))
        elif node in alive:
            x = _shard(("data", p, node, j))
            known.append(x)
            data.append(x)
        else:
            lost.append(_shard(("data", p, node, j)))
    for t in range(layout.m):
        node = (s + t) % n  # placement.stripe_parity_nodes, unchecked
        (parity if node in alive else lost).append(_shard(("parity", t, node, t)))
    outputs = tuple(x for x in lost if wanted(x))
    if not outputs or len(lost) > layout.m:
        return None, lost
    need = layout.k - len(known)
    chosen = sorted(parity, key=lambda x: (load[x.node], x.index))[:need] if need else []
    chosen.sort(key=lambda x: x.index)
    for x in data:
        load[x.node] += 1
    for x in chosen:
        load[x.node] += 1
    return StripeRepair(s, tuple(known + chosen), outputs), lost


def _unrecoverable(version: int, group: int, m: int, failed: list[tuple[int, list[Shard]]]) -> Unrecoverable:
    missing = tuple((x.node, x.kind, x.block) for _, lost in failed for x in lost)
    s0, lost0 = failed[0]
    first = [(x.node, x.kind, x.block) for x in lost0]
    shown = ", ".join(_describe(x) for x in first[:_SHOWN]) + (", ..." if len(first) > _SHOWN else "")
    more = f" (and {len(failed) - 1} more stripes)" if len(failed) > 1 else ""
    reason = f"version {version}, group {group}: stripe {s0} lost {len(lost0)} shards (m={m}): {shown}{more}"
    return Unrecoverable(reason, missing, tuple(s for s, _ in failed))


def plan_recovery(
    layout: GroupLayout, alive: Collection[int], targets: Collection[int], version: int, group: int
) -> RecoveryPlan | Unrecoverable:
    """Plan the rebuild of every real data block and parity block of ``targets``."""
    alive_s = _node_set(layout.n, alive, "alive")
    targets_s = _node_set(layout.n, targets, "target")
    both = sorted(alive_s & targets_s)
    if both:
        raise InvalidRequestError(f"node(s) {both} cannot be both alive and a recovery target")
    load: Counter[int] = Counter()
    repairs, failed = [], []
    for s in range(layout.num_stripes):
        rep, lost = _repair(layout, s, alive_s, lambda x: x.node in targets_s, load)
        if rep is not None:
            repairs.append(rep)
        elif len(lost) > layout.m and any(x.node in targets_s for x in lost):
            failed.append((s, lost))
    if failed:
        return _unrecoverable(version, group, layout.m, failed)
    return RecoveryPlan(version, group, layout.k, layout.m, tuple(repairs))


@dataclass(frozen=True)
class DirectRead:
    """The block is on an alive node: read it there."""

    node: int
    j: int
    stripe: int


def plan_data_fetch(
    layout: GroupLayout, alive: Collection[int], node: int, j: int, version: int = 0, group: int = 0
) -> DirectRead | StripeRepair | Unrecoverable:
    """How to read data block j of ``node``: directly if it is alive, else a one-stripe
    decode whose single output is that block (or why that is impossible)."""
    alive_s = _node_set(layout.n, alive, "alive")
    _node_set(layout.n, [node], "requested")
    if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < layout.block_counts[node]:
        raise InvalidRequestError(
            f"node {node} has no data block {j!r} (it has {layout.block_counts[node]} blocks)")
    s, p = data_stripe_of(layout.n, layout.m, node, j)
    if node in alive_s:
        return DirectRead(node, j, s)
    rep, lost = _repair(layout, s, alive_s, lambda x: x.kind == "data" and x.index == p, Counter())
    if rep is None:
        return _unrecoverable(version, group, layout.m, [(s, lost)])
    return rep
