"""The commit tree with real daemons: 6 daemons in 2 groups of 3 (m=1).

Votes stay in each group; the child group reports to the root group, which words it
back (snapshotd.core.protocol). The test commits versions across both groups, checks
that each node heartbeats only its group and tree neighbours, loses a node of the
root group (SIGKILL, state and shared memory gone, restarted empty), sees the
replacement learn the commit and rebuild it, and commits the next version with it.
"""

from __future__ import annotations

import json
import os

import pytest

from snapshotd.core.spec import dump_spec, parse_spec
from snapshotd.node.spec_file import load_spec
from snapshotd_tools import localcluster as lc

from clusterkit import BLOCK, JOB, REBUILD_TIMEOUT_S, Cluster, cluster_fixture, wait_for

GROUP_SIZE = 3


class GroupedCluster(Cluster):
    """``Cluster`` with groups of GROUP_SIZE (localcluster makes one group of all)."""

    def __init__(self, d: str, n: int, m: int):
        self.d, self.n, self.m = d, n, m
        os.makedirs(d, exist_ok=True)
        ids = [f"n{i}" for i in range(n)]
        ports = lc.free_ports(2 * n)
        doc = {"group_size": GROUP_SIZE, "parity": m, "block_size_bytes": BLOCK,
               "peer_key": os.urandom(16).hex(), "heartbeat_interval_ms": 200,
               "heartbeat_timeout_ms": 1500,
               "nodes": [{"id": x, "host": "127.0.0.1", "port": ports[2 * i], "peer_port": ports[2 * i + 1],
                          "failure_domain": f"host-{x}"} for i, x in enumerate(ids)]}
        spec_path = os.path.join(d, "spec.yaml")
        with open(spec_path, "w") as f:
            f.write(dump_spec(parse_spec(doc)))
        os.chmod(spec_path, 0o600)
        procs = {x: lc.start_node(d, x, "1GiB") for x in ids}
        self.info = {"dir": d, "spec": spec_path, "daemon_args": [], "nodes": {
            x: {"pid": p.pid, "socket": os.path.join(d, f"{x}.sock"), "log": os.path.join(d, f"{x}.log")}
            for x, p in procs.items()}}
        with open(os.path.join(d, "cluster.json"), "w") as f:  # first, so 'down' can stop them
            json.dump(self.info, f)
        for x, p in procs.items():
            lc.wait_ready(d, x, p)
        self.nodes = ids
        self.spec = load_spec(spec_path)
        self.bs = self.spec.block_size_bytes
        self._clients = {}
        self.versions = {}


@pytest.fixture
def make_grouped(tmp_path):
    yield from cluster_fixture(tmp_path, GroupedCluster)


def test_two_groups_commit_through_the_tree_and_a_lost_node_comes_back(make_grouped):
    c = make_grouped(6, 1)
    root, child = c.spec.groups
    assert len(root) == len(child) == GROUP_SIZE
    c.push(1)
    c.wait_committed(1)
    for node in c.nodes:
        st = c.cluster_status(node)
        mine, other = (root, child) if node in root else (child, root)
        # the tree: the root's children are the other group, the child's parent the root
        assert st["commit_tree"] == ({"parent": [], "children": list(child)} if node in root
                                     else {"parent": list(root), "children": []}), st["commit_tree"]
        assert sorted(st["peers"]) == sorted(x for x in c.nodes if x != node)  # 2 groups: all neighbours
        assert st["group_members"] == list(mine) and not set(other) & set(st["group_members"])
    c.check_restorable(1)

    # Lose a member of the root group: the child group's reports still reach the other
    # two, the replacement learns v1 committed from its group and rebuilds it.
    lost = root[0]
    c.lose([lost])
    wait_for(lambda: c.committed(lost) == 1, REBUILD_TIMEOUT_S, f"{lost} to rebuild v1")
    c.check_restorable(1, [lost])
    c.push(2)
    c.wait_committed(2)
    c.check_restorable(2)
    for node in c.nodes:
        waiting = c.cluster_status(node)["jobs"][JOB]
        assert waiting["committed"] == 2 and not waiting["pending"], (node, waiting)


def test_heartbeats_watch_the_group_and_its_tree_neighbours_only():
    """Three groups of 3: groups 1 and 2 are children of the root 0, so a node of group
    1 pings its group and the root's members, never group 2's; the root's nodes ping all."""
    import threading

    from snapshotd.node.cluster.membership import Membership

    doc = {"group_size": 3, "parity": 1, "block_size_bytes": BLOCK,
           "nodes": [{"id": f"n{i}", "host": "127.0.0.1", "port": 7000 + i, "peer_port": 7100 + i,
                      "failure_domain": f"host-{i}"} for i in range(9)]}
    spec = parse_spec(doc)
    g0, g1, g2 = spec.groups

    def peers(node):
        gi, _ = spec.group_of(node)
        return Membership(spec, node, tuple(spec.groups[gi]), None, None, threading.Event(),
                          committed_versions=dict, on_gossip=lambda c: None).peers

    me = g1[0]
    assert set(peers(me)) == (set(g1) | set(g0)) - {me} and not set(peers(me)) & set(g2)
    assert peers(me)[:2] == tuple(x for x in g1 if x != me)  # the group first
    assert set(peers(g0[1])) == set(spec.groups[0] + g1 + g2) - {g0[1]}
