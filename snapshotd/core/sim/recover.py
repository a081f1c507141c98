"""Can the job's saved state survive a set of lost nodes? Decided by the real planners.

:class:`Recoverability` is built once per (job, strategy) and answers
``ok(lost_nodes)`` for node indices 0..nodes-1:

* snapshotd (and replication, which is the same question with k = 1): the nodes are
  named ``n<i>``, put in failure domains of ``job.nodes_per_domain`` consecutive nodes and
  cut into groups by :func:`snapshotd.core.spec.form_groups` (domains spread over the
  groups, as the daemon does); each group with a lost member asks
  :func:`snapshotd.core.recovery.plan_recovery` on a :func:`~snapshotd.core.placement.place_group`
  layout whether its lost members can be rebuilt from the rest;
* CheckFree: node i runs stage i % stages of pipeline replica i // stages; each replica
  with a lost stage asks :func:`snapshotd.core.checkfree.plan_checkfree` (CheckFree+, so
  edge stages count);
* a disk checkpoint is always there.

Answers are cached per loss pattern (group-local indices), so a long simulation calls
each planner once per distinct pattern. Pure.
"""

from __future__ import annotations

from snapshotd.core.checkfree import CheckFreeSettings, StageInfo, plan_checkfree
from snapshotd.core.placement import place_group
from snapshotd.core.recovery import RecoveryPlan, plan_recovery
from snapshotd.core.spec import NodeSpec, form_groups

from .model import CheckFree, DiskCheckpoint, Job, Replication, Snapshotd, Strategy


def domain_of(job: Job, node: int) -> int:
    """The failure domain (switch / rack) of node index ``node``."""
    return node // job.nodes_per_domain


def _stage_infos(S: int) -> list[StageInfo]:
    """A minimal CheckFree+ pipeline of S stages: one body layer each, an embedding on
    stage 0, a head on stage S-1, and their copies on the swap partners."""
    out = []
    for i in range(S):
        names, shapes, layers, copies = ["body"], [(4,)], [], []
        if i == 0:
            names, shapes, layers = ["emb"] + names, [(2,)] + shapes, ["emb"]
        if i == S - 1:
            names, shapes, layers = names + ["head"], shapes + [(3,)], layers + ["head"]
        for e, layer, shape in ((0, "emb", (2,)), (S - 1, "head", (3,))):
            partner = 1 if e == 0 else S - 2
            if partner == i and e != i:
                names, shapes, copies = names + ["copy." + layer], shapes + [shape], copies + ["copy." + layer]
        out.append(StageInfo(i, S, tuple(names), tuple(shapes), 1.0, tuple(copies), tuple(layers)))
    return out


class Recoverability:
    """``ok(lost)``: is the strategy's in-memory (or neighbour) state recoverable?"""

    def __init__(self, job: Job, strategy: Strategy):
        self.job, self.strategy = job, strategy
        self._cache: dict[tuple, bool] = {}
        self.planner_calls = 0
        self._where: list[tuple[int, int]] = []
        if isinstance(strategy, (Snapshotd, Replication)):
            n, m = ((strategy.group_size, strategy.parity) if isinstance(strategy, Snapshotd)
                    else (strategy.replicas + 1, strategy.replicas))
            self.n, self.m = n, m
            specs = [NodeSpec(f"n{i}", f"h{i}", 1, 2, f"d{domain_of(job, i)}") for i in range(job.nodes)]
            where = {}
            for g, ids in enumerate(form_groups(specs, n)):
                for li, nid in enumerate(ids):
                    where[int(nid[1:])] = (g, li)
            self._where = [where[i] for i in range(job.nodes)]
            self._layout = place_group(n, m, [2 * (n - m)] * n)  # equal counts: every stripe is real
        elif isinstance(strategy, CheckFree):
            self._infos = _stage_infos(strategy.stages)
            self._settings = CheckFreeSettings(checkfree_plus=True)

    def groups_of(self) -> list[tuple[int, int]]:
        """(group, group-local index) of every node (snapshotd and replication)."""
        return list(self._where)

    def ok(self, lost) -> bool:
        s = self.strategy
        if isinstance(s, DiskCheckpoint) or not lost:
            return True
        if isinstance(s, CheckFree):
            by: dict[int, set[int]] = {}
            for x in lost:
                by.setdefault(x // s.stages, set()).add(x % s.stages)
            return all(self._checkfree(frozenset(v)) for v in by.values())
        byg: dict[int, set[int]] = {}
        for x in lost:
            g, li = self._where[x]
            byg.setdefault(g, set()).add(li)
        return all(self._group(frozenset(v)) for v in byg.values())

    def _group(self, lost_local: frozenset) -> bool:
        key = ("g", lost_local)
        hit = self._cache.get(key)
        if hit is None:
            self.planner_calls += 1
            alive = [i for i in range(self.n) if i not in lost_local]
            plan = plan_recovery(self._layout, alive, lost_local, version=1, group=0)
            hit = self._cache[key] = isinstance(plan, RecoveryPlan)
        return hit

    def _checkfree(self, lost_stages: frozenset) -> bool:
        key = ("c", lost_stages)
        hit = self._cache.get(key)
        if hit is None:
            self.planner_calls += 1
            live = [x for x in self._infos if x.index not in lost_stages]
            plan = plan_checkfree(live, lost_stages, self._settings,
                                  lost_info=[x for x in self._infos if x.index in lost_stages])
            hit = self._cache[key] = bool(plan.ok)
        return hit
