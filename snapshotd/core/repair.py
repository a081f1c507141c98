"""Repair planning for one lost node of a group: a rebuild, or a degraded read of one rank.

Pure. Both the rebuild (``snapshotd.node.cluster.rebuild``) and the degraded read
(``snapshotd.node.cluster.degraded``) used to repeat the same chain -- layout of the
retained round -> :func:`~snapshotd.core.recovery.plan_recovery` -> keep the outputs they
want; :func:`plan_repair` is that chain, written once:

* a **rebuild** (``span=None``) wants every real data block and parity block of the
  lost node: the recovery plan as it is;
* a **degraded read** (``span`` = one rank's :class:`~snapshotd.core.blockmap.RankSpan` in
  the lost node's data) wants that rank's data blocks only: each stripe repair keeps
  only those outputs, and stripes left with none are dropped (nothing fetched for them).

Either way the whole node is planned first, so a read fails exactly when the node could
not be rebuilt (:class:`~snapshotd.core.recovery.Unrecoverable`, whose reason names the
version, the group and the first failing stripe).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Collection

from .blockmap import RankSpan
from .placement import GroupLayout
from .recovery import RecoveryPlan, Unrecoverable, plan_recovery


def plan_repair(layout: GroupLayout, alive: Collection[int], lost: int, version: int, group: int,
                span: RankSpan | None = None) -> RecoveryPlan | Unrecoverable:
    """Plan rebuilding node ``lost`` (group-local index) from the nodes in ``alive``: all of
    its data and parity, or (with ``span``) only the data blocks of that rank."""
    plan = plan_recovery(layout, alive, [lost], version=version, group=group)
    if isinstance(plan, Unrecoverable) or span is None:
        return plan
    wanted = range(span.first, span.first + span.count)
    repairs = [replace(rp, outputs=tuple(o for o in rp.outputs if o.kind == "data" and o.block in wanted))
               for rp in plan.repairs]
    return replace(plan, repairs=tuple(rp for rp in repairs if rp.outputs))


def check_block_counts(counts, n: int, limit: int) -> tuple[int, ...]:
    """Block counts that came over the network, checked before anything is sized from them:
    exactly ``n`` integers (one per group member), each in 0..``limit``."""
    if (not isinstance(counts, list) or len(counts) != n
            or not all(type(c) is int and 0 <= c <= limit for c in counts)):
        raise ValueError(f"block counts must be {n} integers in 0..{limit}")
    return tuple(counts)


def block_count_limit(memory_budget_bytes: int, block_size_bytes: int, k: int) -> int:
    """The most blocks one node could hold data for, as far as a peer's parity budget goes."""
    return max(1, memory_budget_bytes // block_size_bytes) * max(1, k)


__all__ = ["plan_repair", "check_block_counts", "block_count_limit"]
