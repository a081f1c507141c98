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


@dataclass(frozen=True)
class SendAnnounce:
    version: int
    announce: Announce


@dataclass(frozen=True)
class SendContributions:
    version: int
    layout: GroupLayout
    block_counts: tuple[int, ...]


@dataclass(frozen=True)
class SendVote:
    version: int
    ranks: tuple[int, ...]


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
