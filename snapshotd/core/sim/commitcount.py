"""Messages and bytes per node per committed version, counted by driving the real protocol.

:func:`count_commit` builds one :class:`snapshotd.core.protocol.JobProtocol` per node of
a job (groups of ``group_size`` consecutive nodes) and carries out their actions the way
``snapshotd.node.cluster.commit.CommitDriver`` does, in process, counting every message:

* ``SendAnnounce``       -> an announce to every other member of the group;
* ``SendContributions``  -> each real data block to each parity holder of its stripe
  (one message per block and holder; to itself it is folded in locally, not sent), then
  ``contributions_delivered``;
* ``SendVote``           -> a vote to every other node of the job.

Every node's actions are produced and counted (what a node *sends* is exact). Votes are
delivered to the nodes of the first ``observed_groups`` groups only, which must commit
(:attr:`CommitCount.committed`); delivering all n^2 votes would only repeat the same
counting. Heartbeats do not go through the protocol: :attr:`CommitCount.heartbeats_per_node_s`
is the daemon's rate (a ping to every other node of the spec per heartbeat interval).

Bytes use :class:`MessageSizes` (the serialized ``PeerRequest`` of each kind, without the
peer plane's framing); the bench and the tests measure them from ``proto/peer.proto``.
Pure.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from snapshotd.core.protocol import Commit, JobProtocol, SendAnnounce, SendContributions, SendVote
from snapshotd.wire.errors import InvalidRequestError


@dataclass(frozen=True)
class MessageSizes:
    announce: int = 80  # an AnnounceRequest with one rank (manifest bytes not counted)
    contrib: int = 60  # a ContribRequest without its block (block_bytes is added)
    vote: int = 30
    block_bytes: int = 4 << 20


@dataclass(frozen=True)
class CommitCount:
    nodes: int
    group_size: int
    parity: int
    blocks_per_node: int
    sent: dict[str, float]  # kind -> messages per node per version (mean over nodes)
    sent_bytes: dict[str, float]  # kind -> bytes per node per version (mean over nodes)
    max_sent: int  # the most messages any one node sent
    committed: bool  # every observed node committed the version
    heartbeats_per_node_s: float
    extra: dict = field(default_factory=dict)

    @property
    def messages_per_node(self) -> float:
        return sum(self.sent.values())

    @property
    def bytes_per_node(self) -> float:
        return sum(self.sent_bytes.values())

    @property
    def control_bytes_per_node(self) -> float:
        """Bytes per node without the data blocks the parity needs anyway."""
        return self.bytes_per_node - self.extra.get("block_payload", 0.0)


def count_commit(nodes: int, group_size: int, parity: int, blocks_per_node: int = 12,
                 sizes: MessageSizes = MessageSizes(), observed_groups: int = 1,
                 heartbeat_interval_s: float = 0.5, version: int = 1) -> CommitCount:
    """Count one version's messages on a job of ``nodes`` nodes; see the module docstring."""
    if group_size < 1 or nodes % group_size or not 0 <= parity < group_size:
        raise InvalidRequestError(f"need 0 <= parity < group_size dividing nodes "
                                  f"(nodes={nodes}, n={group_size}, m={parity})")
    n, m, v = group_size, parity, version
    ids = tuple(f"n{i}" for i in range(nodes))
    groups = [ids[g:g + n] for g in range(0, nodes, n)]
    observed = ids[:observed_groups * n]
    proto = {nid: JobProtocol("job", nid, grp, ids, m) for grp in groups for nid in grp}
    sent: Counter[str] = Counter()
    per_node: Counter[str] = Counter()
    payload = 0
    commits: set[str] = set()
    for grp in groups:
        queue: deque = deque()
        for i, nid in enumerate(grp):
            queue.append((nid, proto[nid].local_data_complete(v, blocks_per_node, (int(nid[1:]),), (b"",))))
        while queue:
            nid, acts = queue.popleft()
            me = proto[nid]
            for a in acts:
                to = getattr(a, "to", None)  # a resend names its recipients
                if isinstance(a, SendAnnounce):
                    for peer in (to if to is not None else grp):
                        if peer != nid:
                            sent["announce"] += 1
                            per_node[nid] += 1
                            queue.append((peer, proto[peer].announce_received(v, a.announce)))
                elif isinstance(a, SendContributions):
                    for _j, s, p in a.layout.data_blocks(me.my_index):
                        for t in range(m):
                            holder = (s + t) % n  # placement.stripe_parity_nodes(n, m, s)[t]
                            hp = proto[grp[holder]]
                            if holder != me.my_index:
                                sent["contrib"] += 1
                                per_node[nid] += 1
                                payload += sizes.block_bytes
                            hp.layout_from_contribution(v, a.block_counts)
                            queue.append((hp.me, hp.contribution_received(v, s, t, p)))
                    queue.append((nid, me.contributions_delivered(v)))
                elif isinstance(a, SendVote):
                    fan = nodes - 1 if to is None else sum(1 for x in to if x != nid)
                    sent["vote"] += fan
                    per_node[nid] += fan
                    for peer in (observed if to is None else [x for x in to if x in proto and x in observed]):
                        if peer != nid:
                            if any(isinstance(x, Commit) for x in proto[peer].vote_received(v, nid, a.ranks)):
                                commits.add(peer)
                elif isinstance(a, Commit):
                    commits.add(nid)
                else:  # a new kind of message: count it here before trusting the figures
                    raise InvalidRequestError(f"count_commit does not know the action {a!r}")
    kinds = ("announce", "contrib", "vote")
    size = {"announce": sizes.announce, "contrib": sizes.contrib, "vote": sizes.vote}
    mean = {k: sent[k] / nodes for k in kinds}
    mean_bytes = {k: mean[k] * size[k] for k in kinds}
    mean_bytes["contrib"] += payload / nodes
    return CommitCount(nodes, n, m, blocks_per_node, mean, mean_bytes, max(per_node.values()),
                       set(observed) <= commits, (nodes - 1) / heartbeat_interval_s,
                       {"block_payload": payload / nodes})
