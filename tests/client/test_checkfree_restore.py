"""The CheckFree rung leaves nothing mapped: ``restore_checkfree`` reads its neighbours'
shards through the Snapshotter's segment cache and closes it when it is done; what it
hands to the model are copies (issue 18: nothing handed to user code may point into
memory unmapped afterwards).

A 3-stage pipeline (CheckFree+ example) on a cluster with parity 0 saves version 2; the
node of stage 1 is lost: the rung rebuilds stage 1 from stages 0 and 2. Right after the
restore no segment of the cluster is mapped in this process, and the rebuilt parameters
are this process's own (written in place after the client is closed). The failing
rung's path through the same ``finally`` (adjacent stages lost) is exercised by
tests/integration/test_checkfree_integration.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from clusterkit import JOB, make_cluster  # noqa: F401 (fixture)
from integration.test_checkfree_integration import S, _seed_version
from snapshotd.core.checkfree import CheckFreeSettings
from snapshotd_client.snapshotter import Snapshotter
from snapshotd_tools import localcluster as lc


def _mapped(c) -> list[str]:
    """The cluster's shared-memory segments mapped in this process."""
    prefix = f"/dev/shm/snapshotd.{lc.instance_of(c.d)}."
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if prefix in line})


def _stage1(c):
    from snapshotd_tools.demo import pp_trainer as pp

    stage, opt, sched = pp.build(1, S, 99, plus=True)
    s = Snapshotter(stage, opt, lr_scheduler=sched, job_id=JOB, socket_path=os.path.join(c.d, "n1.sock"),
                    rank=1, world_size=S, local_world_size=1, pipeline_stage=(1, S),
                    edge_copies=stage.edge_copies, on_daemon_unavailable="raise",
                    checkfree=CheckFreeSettings(checkfree_plus=True))
    return stage, s


@pytest.mark.timeout(300)
def test_the_checkfree_rung_unmaps_what_it_read_and_hands_over_copies(make_cluster):
    c = make_cluster(3, 0)
    _seed_version(c, 2)
    c.lose([c.nodes[1]])
    stage, s = _stage1(c)
    with s:
        assert s.restore() == 2
        assert s.restored_approximate and s.restored_method == "CheckFree"
        assert _mapped(c) == []  # both neighbours' shards were read, and unmapped again
    before = [p.detach().clone() for p in stage.parameters()]
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(1.0)  # the rebuilt tensors are ours: readable and writable
    assert all(torch.equal(p, b + 1.0) for p, b in zip(stage.parameters(), before))

