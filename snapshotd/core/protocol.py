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
                           -> VOTE(v, ranks) to every node of the job
  4. committed             a VOTE from every node of the job (its own included), or
                           word from any peer that v committed (gossip / restore query)
                           -> free everything older than v

Nothing a node sends is lost for good: the caller reports each peer's acknowledgement
(``delivered(v, kind, node)``), and while v is open :meth:`JobProtocol.resend` returns
the announce, contributions and vote again, each addressed (``to``) only to the peers
that have not acknowledged it. The caller calls it with a backoff after a delivery
failed (a busy receiver, a peer that looked dead for a while); a committed, fenced or
dropped version returns nothing. Handlers are idempotent, so a resend of something
that did arrive (its acknowledgement lost) changes nothing.

Every node decides the commit by itself from the votes: there is no coordinator to
lose. A node that heard all votes commits; one that missed a vote (the voter died
mid-broadcast) still holds v complete and promotes it as soon as any peer reports v
committed. A committed claim is always sound: it implies every node was locally
complete, i.e. held its data and its parity for v.

Methods return lists of actions (frozen dataclasses) for the caller to carry out; no
I/O happens here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from snapshotd.core.placement import GroupLayout, place_group


@dataclass(frozen=True)
class Announce:
    node: str
    block_count: int
    ranks: tuple[int, ...]
    manifests: tuple[bytes, ...]  # serialized ShardManifest per local rank


# What a node sends, as ``delivered`` and ``SendX.kind`` name it.
ANNOUNCE, CONTRIB, VOTE = "announce", "contrib", "vote"
KINDS = (ANNOUNCE, CONTRIB, VOTE)


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
    to: tuple[str, ...] | None = None  # None: every other node of the job
    kind = VOTE


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
    votes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # node -> its ranks
    acked: dict[str, set] = field(default_factory=dict)  # kind -> peers that acknowledged ours


@dataclass
class JobProtocol:
    """State of one job on node ``me``; ``group`` lists the group's node ids in order."""

    job_id: str
    me: str
    group: tuple[str, ...]
    job_nodes: tuple[str, ...]
    parity: int
    committed_version: int = 0
    rounds: dict[int, VersionRound] = field(default_factory=dict)
    rank_nodes: dict[int, str] = field(default_factory=dict)  # global rank -> node, from votes

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
        it holds parity for, VOTE) of v. Once every holder acknowledged our
        contributions, they count as delivered."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (one of {KINDS})")
        r = self.rounds.get(v)
        if r is None or v <= self.committed_version:
            return []
        acked = r.acked.setdefault(kind, set())
        acked.add(node)
        if kind == CONTRIB and r.contributions_started and self.contribution_holders(v) <= acked:
            r.contributions_sent = True
        return self._advance(r)

    def resend(self, v: int) -> list:
        """What we sent for v and a peer has not acknowledged yet, addressed to those
        peers only: [] once v is committed, fenced or dropped, or all was acknowledged."""
        r = self.rounds.get(v)
        if r is None or v <= self.committed_version:
            return []
        acts: list = []
        acked = {k: r.acked.get(k, set()) for k in KINDS}
        if r.local_data:
            to = tuple(n for n in self.group if n != self.me and n not in acked[ANNOUNCE])
            if to:
                acts.append(SendAnnounce(v, r.announces[self.me], to))
        if r.contributions_started and not r.contributions_sent:
            to = tuple(sorted(self.contribution_holders(v) - acked[CONTRIB]))
            if to:
                acts.append(SendContributions(v, r.layout, r.layout.block_counts, to))
        if r.voted:
            to = tuple(n for n in self.job_nodes if n != self.me and n not in acked[VOTE])
            if to:
                acts.append(SendVote(v, r.announces[self.me].ranks, to))
        return acts

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
        how many contributions are still due here, whose votes are missing, and which
        peers have not acknowledged what we sent."""
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
            unacked[VOTE] = [n for n in self.job_nodes if n != self.me and n not in acked[VOTE]]
        return {"local_data": r.local_data,
                "announces_missing": [n for n in self.group if n not in r.announces],
                "contributions_awaited": None if r.layout is None else len(r.expected),
                "contributions_awaited_from": self._awaited_from(r),
                "contributions_started": r.contributions_started,
                "contributions_delivered": r.contributions_sent,
                "voted": r.voted,
                "votes_missing": [n for n in self.job_nodes if n not in r.votes],
                "unacknowledged": {k: x for k, x in unacked.items() if x}}

    def _awaited_from(self, r: VersionRound) -> dict[str, int]:
        """{sender: contributions still due from it} (layout known)."""
        out: dict[str, int] = {}
        if r.layout is not None and r.expected:
            for s, t, p, src, _j in r.layout.expected_contributions(self.my_index):
                if (s, t, p) in r.expected:
                    out[self.group[src]] = out.get(self.group[src], 0) + 1
        return out

    def vote_received(self, v: int, node: str, ranks) -> list:
        for rk in ranks:
            self.rank_nodes[int(rk)] = node
        if v <= self.committed_version:
            return []
        r = self.round(v)
        r.votes[node] = tuple(ranks)
        return self._advance(r)

    def committed_elsewhere(self, v: int) -> list:
        """A peer reports v committed. Promote it if we hold v complete."""
        r = self.rounds.get(v)
        if v > self.committed_version and r is not None and r.local_data and r.parity_done:
            return self._commit(v)
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
        r.layout = place_group(len(self.group), self.parity, counts)
        r.expected = {(s, t, p) for (s, t, p, _src, _j) in r.layout.expected_contributions(self.my_index)}
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
        # len() first: O(1) until the last votes arrive, so a commit costs O(nodes), not O(nodes^2) (H5, issue 17)
        if r.voted and len(r.votes) >= len(self.job_nodes) and all(n in r.votes for n in self.job_nodes) \
                and r.version > self.committed_version:
            actions += self._commit(r.version)
        return actions

    def _commit(self, v: int) -> list:
        self.committed_version = v
        self.forget_below(v)
        return [Commit(v)]
