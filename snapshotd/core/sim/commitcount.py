"""Messages and bytes per node per committed version, counted by driving the real protocol.

:func:`count_commit` builds one :class:`snapshotd.core.protocol.JobProtocol` per node of
a job (groups of ``group_size`` consecutive nodes, in the commit tree of
:mod:`snapshotd.core.commit_tree`) and carries out their actions the way
``snapshotd.node.cluster.commit.CommitDriver`` does, in process, delivering every
message and counting it:

* ``SendAnnounce``       -> an announce to every other member of the group;
* ``SendContributions``  -> each real data block to each parity holder of its stripe
  (one message per block and holder; to itself it is folded in locally, not sent), then
  ``contributions_delivered``;
* ``SendVote``           -> a vote to every other member of the group;
* ``SendReport``         -> a report to every member of the parent group;
* ``SendWord``           -> the commit word to every member of every child group.

Every message is delivered, so :attr:`CommitCount.committed` says every node of the job
committed the version. Heartbeats do not go through the protocol:
:attr:`CommitCount.heartbeats_per_node_s` is the daemon's rate, a ping to every peer
:func:`snapshotd.core.commit_tree.watched` names per heartbeat interval (mean over the
nodes; ``extra["heartbeats_max_s"]`` the busiest node), and
``extra["heartbeats_all_to_all_s"]`` the rate of the earlier rule, a ping to every other
node of the job.

Bytes use :class:`MessageSizes`: the serialized ``PeerRequest`` of each kind, as
``snapshotd.node.cluster.peer_ops`` builds it from proto/peer.proto (the tests and the
bench measure them there), without the peer plane's framing (magic, sender, request id,
MAC: a fixed ~60 bytes a message) and without an announce's manifests (its payload).

The figures before the commit tree (every node voting to every node, heartbeats to every
node) are quoted in docs/COMMIT.md from git history. Pure.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from snapshotd.core import commit_tree
from snapshotd.core.protocol import (
    Commit,
    JobProtocol,
    SendAnnounce,
    SendContributions,
    SendReport,
    SendVote,
    SendWord,
)
from snapshotd.wire.errors import InvalidRequestError

KINDS = ("announce", "contrib", "vote", "report", "word")


@dataclass(frozen=True)
class MessageSizes:
    announce: int = 32  # an AnnounceRequest with one rank (manifest bytes not counted)
    contrib: int = 28  # a ContribRequest without its block (block_bytes is added)
    vote: int = 16  # a VoteRequest with one rank
    block_bytes: int = 4 << 20
    report: int = 14  # a VoteRequest with its step, no ranks
    word: int = 14


@dataclass(frozen=True)
class CommitCount:
    nodes: int
    group_size: int
    parity: int
    blocks_per_node: int
    sent: dict[str, float]  # kind -> messages per node per version (mean over nodes)
    sent_bytes: dict[str, float]  # kind -> bytes per node per version (mean over nodes)
    max_sent: int  # the most messages any one node sent
    committed: bool  # every node of the job committed the version
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
                 sizes: MessageSizes = MessageSizes(), heartbeat_interval_s: float = 0.5,
                 version: int = 1) -> CommitCount:
    """Count one version's messages on a job of ``nodes`` nodes; see the module docstring."""
    if group_size < 1 or nodes % group_size or not 0 <= parity < group_size:
        raise InvalidRequestError(f"need 0 <= parity < group_size dividing nodes "
                                  f"(nodes={nodes}, n={group_size}, m={parity})")
    n, m, v = group_size, parity, version
    ids = tuple(f"n{i}" for i in range(nodes))
    groups = tuple(ids[g:g + n] for g in range(0, nodes, n))
    proto = {nid: JobProtocol("job", nid, grp, ids, m, groups=groups) for grp in groups for nid in grp}
    sent: Counter[str] = Counter()
    per_node: Counter[str] = Counter()
    payload = 0
    commits: set[str] = set()

    def send(kind: str, src: str, to) -> list[str]:
        dests = [d for d in to if d != src]
        sent[kind] += len(dests)
        per_node[src] += len(dests)
        return dests

    queue: deque = deque((nid, proto[nid].local_data_complete(v, blocks_per_node, (i,), (b"",)))
                         for i, nid in enumerate(ids))
    while queue:
        nid, acts = queue.popleft()
        me = proto[nid]
        for a in acts:
            to = getattr(a, "to", None)  # a resend names its recipients
            if isinstance(a, SendAnnounce):
                for peer in send("announce", nid, to if to is not None else me.group):
                    queue.append((peer, proto[peer].announce_received(v, a.announce)))
            elif isinstance(a, SendContributions):
                for _j, s, p in a.layout.data_blocks(me.my_index):
                    for t in range(m):
                        holder = (s + t) % n  # placement.stripe_parity_nodes(n, m, s)[t]
                        hp = proto[me.group[holder]]
                        if holder != me.my_index:
                            send("contrib", nid, (hp.me,))
                            payload += sizes.block_bytes
                        hp.layout_from_contribution(v, a.block_counts)
                        queue.append((hp.me, hp.contribution_received(v, s, t, p)))
                queue.append((nid, me.contributions_delivered(v)))
            elif isinstance(a, (SendVote, SendReport, SendWord)):
                default = {SendVote: me.group, SendReport: me.parent_nodes, SendWord: me.child_nodes}[type(a)]
                ranks = a.ranks if isinstance(a, SendVote) else ()
                for peer in send(a.kind, nid, to if to is not None else default):
                    queue.append((peer, proto[peer].step_received(v, nid, a.kind, ranks)))
            elif isinstance(a, Commit):
                commits.add(nid)
            else:  # a new kind of message: count it here before trusting the figures
                raise InvalidRequestError(f"count_commit does not know the action {a!r}")
    size = {k: getattr(sizes, k) for k in KINDS}
    mean = {k: sent[k] / nodes for k in KINDS}
    mean_bytes = {k: mean[k] * size[k] for k in KINDS}
    mean_bytes["contrib"] += payload / nodes
    watched = [len(commit_tree.watched(groups, nid)) for nid in ids]
    return CommitCount(nodes, n, m, blocks_per_node, mean, mean_bytes, max(per_node.values(), default=0),
                       commits == set(ids), sum(watched) / nodes / heartbeat_interval_s,
                       {"block_payload": payload / nodes, "heartbeats_max_s": max(watched) / heartbeat_interval_s,
                        "heartbeats_all_to_all_s": (nodes - 1) / heartbeat_interval_s,
                        "tree_depth": commit_tree.depth(len(groups))})


def table(sizes: MessageSizes = MessageSizes(), group_size: int = 8, parity: int = 2,
          blocks_per_node: int = 12, scales=(64, 512, 4096)) -> list[str]:
    """The after figures, one line per scale (``python -m snapshotd.core.sim.commitcount``)."""
    lines = [f"per node per committed version (n={group_size}, m={parity}, {blocks_per_node} blocks)"]
    for nodes in scales:
        c = count_commit(nodes, group_size, parity, blocks_per_node, sizes)
        kinds = ", ".join(f"{k} {c.sent[k]:.2f}" for k in KINDS)
        lines.append(f"{nodes:>5} nodes: messages {c.messages_per_node:6.2f} ({kinds}; max {c.max_sent}) "
                     f"control bytes {c.control_bytes_per_node:7.1f}  heartbeats/s {c.heartbeats_per_node_s:5.1f} "
                     f"(max {c.extra['heartbeats_max_s']:.0f}; all-to-all {c.extra['heartbeats_all_to_all_s']:.0f}) "
                     f"committed {c.committed}")
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
