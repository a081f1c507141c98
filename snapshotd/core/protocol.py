"""Per-version snapshot protocol of one node in a cluster (pure state machine).

For each version v of a job, a node goes through:

  1. local data complete   every local rank delivered v          -> ANNOUNCE to the group
     (the announce carries the node's block count B_i and its ranks' manifests, so
     every group member can later tell a replacement node what it held)
  2. layout known          ANNOUNCE received from every group member
                           -> place_group(B_0..B_{n-1}); send CONTRIBUTIONS: each
                              real data block to the m parity holders of its stripe;
                              the caller reports ``contributions_delivered`` once
                              every holder acknowledged them
  3. locally complete      own data held AND every expected contribution accumulated
                           -> VOTE(v, ranks) to every other member of the GROUP
  4. subtree complete      a VOTE from every member of the group (its own included) AND
                           a REPORT(v) from some member of every child group
                           -> REPORT(v) to every member of the parent group; in the
                              root group (no parent) this is the decision: v committed
  5. committed             decided here, or the commit WORD(v) from a member of the
                           parent group, or word from any peer that v committed
                           (gossip / restore query), AND v locally complete here
                           -> WORD(v) to every member of every child group (once, even
                              when v cannot be committed here); free everything older

The tree (:mod:`snapshotd.core.commit_tree`): the job's groups by index, group 0 the
root, group g's parent (g-1) // FANOUT. On the wire the three commit messages are the
peer op ``vote`` (``VoteRequest``, its ``step``: a vote, a report or the word; a report
and a word carry no ranks); a receiver takes a vote only from its group, a report only
from a child group and the word only from the parent group
(:meth:`JobProtocol.step_received`). With a single group there are no reports and no
words: the group's votes decide, as they always did.

Why this is sound and has no coordinator to lose:

* Only versions complete on every node commit. A REPORT(v) from group c means every
  member of c voted (each is locally complete: data and parity) and, inductively,
  every group below c reported; the root decides only with its own group's votes and
  a report from every child group, so a decision covers every group of the job. A
  WORD or a gossiped commit is only ever sent by a node that committed or was told.
* No single node's loss loses or blocks a commit. Every member of a group reports to
  every member of the parent group and every member that knows of the decision words
  every member of the child groups: the g members of a group are g independent paths,
  so a commit travels as long as each group on the way keeps one live member (fewer
  failures than the erasure code needs to lose data: m < n). A node that dies after
  voting does not hold its group back (its vote is in); one that dies before voting
  holds v uncommitted everywhere, as it must (its data for v is not complete). A root
  member that dies after deciding leaves the other root members, who decide from the
  same reports. A node that missed a vote (the voter died mid-broadcast) or a word
  still learns of the commit: from the word of any other parent-group member, from
  heartbeat gossip (its group and tree neighbours report what they committed), or,
  restarted or replaced, by the restore query (``latest_committed``), then rebuilds.
* Cost per node per version: g-1 votes, g reports, FANOUT x g words at most (g on
  average over the job): O(g), flat in the number of nodes; latency O(log G) hops.

Nothing a node sends is lost for good: the caller reports each peer's acknowledgement
(``delivered(v, kind, node)``), and while v is open :meth:`JobProtocol.resend` returns
the announce, contributions, vote, report and word again, each addressed (``to``) only
to the peers that have not acknowledged it; the words sent at our commit are re-sent
while v is our newest committed version (a newer commit supersedes them). The caller
calls it with a backoff after a delivery failed (a busy receiver, a peer that looked
dead for a while); a fenced or dropped version returns nothing. Handlers are
idempotent, so a resend of something that did arrive (its acknowledgement lost)
changes nothing.

Methods return lists of actions (frozen dataclasses) for the caller to carry out; no
I/O happens here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from snapshotd.core import commit_tree
from snapshotd.core.placement import GroupLayout, place_group


@lru_cache(maxsize=16)
def _placed(n: int, m: int, counts: tuple[int, ...], me: int) -> tuple[GroupLayout, frozenset]:
    """The layout of a version with these block counts and the contributions node ``me``
    expects in it: the same for every version with the same counts (a job's saves mostly
    repeat them), so computed once (issue 16). The layout is frozen, safe to share."""
    layout = place_group(n, m, counts)
    return layout, frozenset((s, t, p) for (s, t, p, _src, _j) in layout.expected_contributions(me))


@dataclass(frozen=True)
class Announce:
    node: str
    block_count: int
    ranks: tuple[int, ...]
    manifests: tuple[bytes, ...]  # serialized ShardManifest per local rank


# What a node sends, as ``delivered`` and ``SendX.kind`` name it.
ANNOUNCE, CONTRIB, VOTE, REPORT, WORD = "announce", "contrib", "vote", "report", "word"
KINDS = (ANNOUNCE, CONTRIB, VOTE, REPORT, WORD)


@dataclass(frozen=True)
class SendAnnounce:
    version: int
    announce: Announce
    to: tuple[str, ...] | None = None  # None: every other node of the group
    kind = ANNOUNCE


@dataclass(frozen=True)
class SendContributions:
    version: int
    layout: GroupLayout
    block_counts: tuple[int, ...]
    to: tuple[str, ...] | None = None  # None: every parity holder of our blocks (us too)
    kind = CONTRIB


@dataclass(frozen=True)
class SendVote:
    version: int
    ranks: tuple[int, ...]
    to: tuple[str, ...] | None = None  # None: every other member of the group
    kind = VOTE


@dataclass(frozen=True)
class SendReport:
    """Our group and every group below it are complete for v (never sent by the root)."""
    version: int
    to: tuple[str, ...] | None = None  # None: every member of the parent group
    kind = REPORT


@dataclass(frozen=True)
class SendWord:
    """v is committed (decided by the root group); sent down the tree."""
    version: int
    to: tuple[str, ...] | None = None  # None: every member of every child group
    kind = WORD


@dataclass(frozen=True)
class Commit:
    version: int


@dataclass
class VersionRound:
    version: int
    announces: dict[str, Announce] = field(default_factory=dict)
    layout: GroupLayout | None = None
    expected: set = field(default_factory=set)  # (stripe, row, pos) still to receive
    received: set = field(default_factory=set)
    local_data: bool = False
    contributions_started: bool = False
    contributions_sent: bool = False  # every contribution acknowledged by its holder
    parity_done: bool = False
    voted: bool = False
    votes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # group member -> its ranks
    reports: dict[int, str] = field(default_factory=dict)  # child group -> first member reporting it
    reported: bool = False  # our subtree is complete: reported up (the root: decided)
    decided: bool = False  # v is committed in the job (decided here, or word of it)
    worded: bool = False  # the word went down to the child groups
    acked: dict[str, set] = field(default_factory=dict)  # kind -> peers that acknowledged ours


@dataclass
class JobProtocol:
    """State of one job on node ``me``; ``group`` lists the group's node ids in order;
    ``groups`` every group of the job by index (default: ``job_nodes`` cut into
    consecutive groups of ``len(group)``), which places the group in the commit tree."""

    job_id: str
    me: str
    group: tuple[str, ...]
    job_nodes: tuple[str, ...]
    parity: int
    committed_version: int = 0
    rounds: dict[int, VersionRound] = field(default_factory=dict)
    rank_nodes: dict[int, str] = field(default_factory=dict)  # rank -> node, from the group's votes
    groups: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.group)
        if not self.groups:
            self.groups = tuple(tuple(self.job_nodes[i:i + n]) for i in range(0, len(self.job_nodes), n))
        elif not (isinstance(self.groups, tuple) and isinstance(self.groups[0], tuple)):
            self.groups = tuple(tuple(g) for g in self.groups)
        self.group = tuple(self.group)
        try:
            self.group_index = self.groups.index(self.group)
        except ValueError:
            raise ValueError(f"group {self.group} is not one of the job's groups") from None
        self.parent_nodes, self.child_nodes = commit_tree.neighbours(self.groups, self.group_index)
        kids = commit_tree.children(self.group_index, len(self.groups))
        self.child_groups = tuple(kids)
        self._child_of = {nd: c for c in kids for nd in self.groups[c]}  # member -> its child group
        self._members = frozenset(self.group)
        self._parents = frozenset(self.parent_nodes)

    @property
    def my_index(self) -> int:
        return self.group.index(self.me)

    def round(self, v: int) -> VersionRound:
        r = self.rounds.get(v)
        if r is None:
            r = self.rounds[v] = VersionRound(v)
        return r

    # -- events ----------------------------------------------------------------------
    def local_data_complete(self, v: int, block_count: int, ranks, manifests) -> list:
        if v <= self.committed_version:
            return []
        r = self.round(v)
        r.local_data = True
        ann = Announce(self.me, block_count, tuple(ranks), tuple(manifests))
        r.announces[self.me] = ann
        return [SendAnnounce(v, ann)] + self._advance(r)

    def announce_received(self, v: int, ann: Announce) -> list:
        if v <= self.committed_version or ann.node not in self.group:
            return []
        r = self.round(v)
        r.announces[ann.node] = ann
        return self._advance(r)

    def layout_from_contribution(self, v: int, block_counts: tuple[int, ...]) -> GroupLayout:
        """A contribution can arrive before our own announces: it carries the counts."""
        r = self.round(v)
        if r.layout is None:
            self._set_layout(r, tuple(block_counts))
        return r.layout

    def contribution_received(self, v: int, stripe: int, row: int, pos: int) -> list:
        r = self.rounds.get(v)
        if r is None or r.layout is None or v <= self.committed_version:
            return []
        key = (stripe, row, pos)
        if key in r.expected:
            r.expected.discard(key)
            r.received.add(key)
        return self._advance(r)

    def contributions_delivered(self, v: int) -> list:
        r = self.rounds.get(v)
        if r is None or v <= self.committed_version:
            return []
        r.contributions_sent = True
        return self._advance(r)

    def delivered(self, v: int, kind: str, node: str) -> list:
        """``node`` acknowledged our ``kind`` (ANNOUNCE, CONTRIB: all our contributions
        it holds parity for, VOTE, REPORT, WORD) of v. Once every holder acknowledged our
        contributions, they count as delivered."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (one of {KINDS})")
        r = self.rounds.get(v)
        if r is None or v < self.committed_version:
            return []
        acked = r.acked.setdefault(kind, set())
        acked.add(node)
        if v == self.committed_version:  # the words of our newest commit: recorded, nothing else
            return []
        if kind == CONTRIB and r.contributions_started and self.contribution_holders(v) <= acked:
            r.contributions_sent = True
        return self._advance(r)

    def resend(self, v: int) -> list:
        """What we sent for v and a peer has not acknowledged yet, addressed to those
        peers only: [] once v is fenced, dropped or superseded by a newer commit, or all
        was acknowledged. Once v is committed here, only its words are left to re-send."""
        r = self.rounds.get(v)
        if r is None or v < self.committed_version:
            return []
        acked = {k: r.acked.get(k, set()) for k in KINDS}
        words = self._unacked_words(r, acked)
        if v == self.committed_version:
            return words
        acts: list = []
        if r.local_data:
            to = tuple(n for n in self.group if n != self.me and n not in acked[ANNOUNCE])
            if to:
                acts.append(SendAnnounce(v, r.announces[self.me], to))
        if r.contributions_started and not r.contributions_sent:
            to = tuple(sorted(self.contribution_holders(v) - acked[CONTRIB]))
            if to:
                acts.append(SendContributions(v, r.layout, r.layout.block_counts, to))
        if r.voted:
            to = tuple(n for n in self.group if n != self.me and n not in acked[VOTE])
            if to:
                acts.append(SendVote(v, r.announces[self.me].ranks, to))
        if r.reported and self.parent_nodes:
            to = tuple(n for n in self.parent_nodes if n not in acked[REPORT])
            if to:
                acts.append(SendReport(v, to))
        return acts + words

    def _unacked_words(self, r: VersionRound, acked: dict) -> list:
        if not r.worded:
            return []
        to = tuple(n for n in self.child_nodes if n not in acked[WORD])
        return [SendWord(r.version, to)] if to else []

    def contribution_holders(self, v: int) -> set[str]:
        """The other nodes that hold parity of our data blocks of v (layout known)."""
        r = self.rounds[v]
        if r.layout is None:
            return set()
        holders = {h for _j, s, _p in r.layout.data_blocks(self.my_index)
                   for _t, h in r.layout.contribution_targets(s)}  # the accumulator (H4, issue 16)
        return {self.group[h] for h in holders} - {self.me}

    def pending(self, v: int) -> dict:
        """What round v waits for (for status and diagnostics): who has not announced,
        how many contributions are still due here, whose votes (group members) and
        reports (child groups) are missing, and which peers have not acknowledged what
        we sent."""
        r = self.rounds.get(v)
        if r is None:
            return {}
        acked = {k: r.acked.get(k, set()) for k in KINDS}
        unacked: dict[str, list] = {}
        if r.local_data:
            unacked[ANNOUNCE] = [n for n in self.group if n != self.me and n not in acked[ANNOUNCE]]
        if r.contributions_started and not r.contributions_sent:
            unacked[CONTRIB] = sorted(self.contribution_holders(v) - acked[CONTRIB])
        if r.voted:
            unacked[VOTE] = [n for n in self.group if n != self.me and n not in acked[VOTE]]
        if r.reported:
            unacked[REPORT] = [n for n in self.parent_nodes if n not in acked[REPORT]]
        if r.worded:
            unacked[WORD] = [n for n in self.child_nodes if n not in acked[WORD]]
        return {"local_data": r.local_data,
                "announces_missing": [n for n in self.group if n not in r.announces],
                "contributions_awaited": None if r.layout is None else len(r.expected),
                "contributions_awaited_from": self._awaited_from(r),
                "contributions_started": r.contributions_started,
                "contributions_delivered": r.contributions_sent,
                "voted": r.voted,
                "votes_missing": [n for n in self.group if n not in r.votes],
                "reports_missing": [c for c in self.child_groups if c not in r.reports],
                "reported": r.reported,
                "decided": r.decided,
                "unacknowledged": {k: x for k, x in unacked.items() if x}}

    def _awaited_from(self, r: VersionRound) -> dict[str, int]:
        """{sender: contributions still due from it} (layout known)."""
        out: dict[str, int] = {}
        if r.layout is not None and r.expected:
            for s, t, p, src, _j in r.layout.expected_contributions(self.my_index):
                if (s, t, p) in r.expected:
                    out[self.group[src]] = out.get(self.group[src], 0) + 1
        return out

    def step_received(self, v: int, node: str, kind: str, ranks=()) -> list:
        """A commit message (the peer op ``vote``) of ``kind`` (VOTE, REPORT, WORD) from
        ``node``; one from a node it may not come from is ignored."""
        handler = {VOTE: lambda: self.vote_received(v, node, ranks), REPORT: lambda: self.report_received(v, node),
                   WORD: lambda: self.word_received(v, node)}.get(kind)
        if handler is None:
            raise ValueError(f"not a commit step: {kind!r} (one of {VOTE}, {REPORT}, {WORD})")
        return handler()

    def vote_received(self, v: int, node: str, ranks) -> list:
        """``node``, a member of our group, is locally complete for v (a vote from
        outside the group -- an older daemon votes to every node -- is ignored)."""
        if node not in self._members:
            return []
        for rk in ranks:
            self.rank_nodes[int(rk)] = node
        if v <= self.committed_version:
            return []
        r = self.round(v)
        r.votes[node] = tuple(ranks)
        return self._advance(r)

    def report_received(self, v: int, node: str) -> list:
        """``node``, a member of a child group, reports its subtree complete for v."""
        c = self._child_of.get(node)
        if c is None or v <= self.committed_version:
            return []
        r = self.round(v)
        r.reports.setdefault(c, node)
        return self._advance(r)

    def word_received(self, v: int, node: str) -> list:
        """``node``, a member of the parent group, says v committed: pass the word down
        and commit v here once it is locally complete."""
        if node not in self._parents or v <= self.committed_version:
            return []
        r = self.round(v)
        r.decided = True
        return self._advance(r)

    def committed_elsewhere(self, v: int) -> list:
        """A peer reports v committed (gossip). Promote it if we hold v complete, and
        pass the word down if we took part in v."""
        r = self.rounds.get(v)
        if v > self.committed_version and r is not None and (r.voted or (r.local_data and r.parity_done)):
            r.decided = True
            return self._advance(r)
        return []

    def fence(self) -> list[int]:
        """The job restarted from its committed version: every uncommitted round is
        dropped (its versions will be delivered again, possibly with other bytes)."""
        dropped = sorted(v for v in self.rounds if v > self.committed_version)
        for v in dropped:
            del self.rounds[v]
        return dropped

    def forget_below(self, v: int) -> None:
        for old in [x for x in self.rounds if x < v]:
            del self.rounds[old]

    # -- internals -------------------------------------------------------------------
    def _set_layout(self, r: VersionRound, counts: tuple[int, ...]) -> None:
        r.layout, expected = _placed(len(self.group), self.parity, tuple(counts), self.my_index)
        r.expected = set(expected)
        r.expected -= r.received

    def _advance(self, r: VersionRound) -> list:
        actions: list = []
        if r.layout is None and all(n in r.announces for n in self.group):
            self._set_layout(r, tuple(r.announces[n].block_count for n in self.group))
        if r.layout is not None and r.local_data and not r.contributions_started and \
                all(n in r.announces for n in self.group):
            r.contributions_started = True
            actions.append(SendContributions(r.version, r.layout, r.layout.block_counts))
        if r.layout is not None and not r.expected:
            r.parity_done = True
        if r.parity_done and r.local_data and r.contributions_sent and not r.voted:
            r.voted = True
            ranks = r.announces[self.me].ranks
            r.votes[self.me] = ranks
            for rk in ranks:
                self.rank_nodes[int(rk)] = self.me
            actions.append(SendVote(r.version, ranks))
        # len() first: O(1) until the last votes arrive
        if r.voted and not r.reported and len(r.votes) >= len(self.group) \
                and len(r.reports) >= len(self.child_groups) and all(n in r.votes for n in self.group):
            r.reported = True
            if self.parent_nodes:
                actions.append(SendReport(r.version))
            else:  # the root group: every group of the job is complete
                r.decided = True
        if r.decided and not r.worded and self.child_nodes:
            r.worded = True
            actions.append(SendWord(r.version))
        if r.decided and r.local_data and r.parity_done and r.version > self.committed_version:
            actions += self._commit(r.version)
        return actions

    def _commit(self, v: int) -> list:
        self.committed_version = v
        self.forget_below(v)
        return [Commit(v)]
