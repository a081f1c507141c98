"""A resharding ``restore()`` moves only what the new rank reads (issue 14), on a real
3-node m=1 cluster (k = 2): three ranks save DP-replicated state as
``shard_replicated=True`` slices beside a large per-rank extra state; node 2 is
SIGKILLed and wiped (not replaced); one rank restores at world size 1 through node 0.
It reads rank 0's shard in place, rank 1's slice by ranged fetches from node 1 (its
covering blocks) and rank 2's slice decoded from the survivors (k blocks per stripe
holding its covering blocks) -- never ranks 1 and 2's per-rank state, never a whole
shard. The state comes back bit-exact, and the bytes the survivors served (their peer
traffic counters) stay within the bound derived from the manifests and the layout. The
exact rung (rank 0 restoring at the saved size) gathers the slices the same way.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from clusterkit import JOB, make_cluster, wait_for  # noqa: F401 (fixture)
from snapshotd.core import placement as pl
from snapshotd_client.snapshotter import Snapshotter

SLACK = 60 << 10  # under one block: manifests and the round record (~20 KiB), heartbeats (~600 bytes/s)
N, M = 3, 1


def trained():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(2):
        m(torch.randn(5, 96)).sum().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def snap(c, node, model, opt, rank, world, extra):
    return Snapshotter(model, opt, job_id=JOB, socket_path=os.path.join(c.d, f"{node}.sock"), rank=rank,
                       world_size=world, local_world_size=1, on_daemon_unavailable="raise",
                       timeout_s=30, shard_replicated=True, extra_state=extra)


def served(c, nodes) -> int:
    return sum(c.cluster_status(n)["peer_traffic"]["reply_bytes"] for n in nodes)


def blocks(nbytes: int, bs: int) -> int:
    return -(-nbytes // bs)


@pytest.mark.timeout(300)
def test_a_reshard_restore_reads_only_covering_blocks_of_a_remote_and_a_lost_rank(make_cluster):
    c = make_cluster(N, M)
    bs, k = c.bs, N - M
    model, opt = trained()
    big = {r: torch.randn(96 * 1024, generator=torch.Generator().manual_seed(r)) for r in range(N)}  # 384 KiB
    for r, node in enumerate(c.nodes):
        s = snap(c, node, copy.deepcopy(model), copy.deepcopy(opt), r, N,
                 {"buffer": big[r], "tag": f"rank{r}"})
        assert s.save(1).result(60) is not None
        s.close()
    c.wait_committed(1)
    n0, n1, n2 = c.nodes
    man = {r: c.client(n0).open_shard(JOB, r, 1, no_copy=True).manifest for r in (1, 2)}
    assert not c.client(n0).open_shard(JOB, 1, 1, no_copy=True).segment_name  # nothing copied here
    assert all(man[r].slice_bytes and man[r].slice_offset for r in (1, 2))
    c.kill(n2, wipe=True)
    for node in (n0, n1):
        wait_for(lambda node=node: not c.cluster_status(node)["peers"][n2]["alive"], 30,
                 f"{node} to see {n2} down")

    # What the restore may move: rank 1's slice's covering blocks (its node is up) and,
    # for rank 2's, k blocks of every stripe holding one of its covering blocks.
    nb1, nb2 = blocks(man[1].slice_bytes, bs), blocks(man[2].slice_bytes, bs)  # slices start at 0
    stripes2 = {pl.data_stripe_of(N, M, 2, j)[0] for j in range(nb2)}
    bound = (nb1 + k * len(stripes2)) * bs
    whole = man[1].payload_bytes + k * man[2].payload_bytes  # the old way: both shards whole
    assert bound + SLACK < whole / 2

    m2, o2 = trained()
    with torch.no_grad():
        for p in m2.parameters():
            p.zero_()  # other weights: the restore must replace them
    extra = {"buffer": None, "tag": None}
    before = served(c, (n0, n1))
    s = snap(c, n0, m2, o2, 0, 1, extra)
    assert s.restore() == 1
    moved = served(c, (n0, n1)) - before
    assert (s.restored_method, s.restored_from_world_size) == ("resharded", N)
    for (key, x), (_, y) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(x, y), key
    sa, sb = opt.state_dict(), o2.state_dict()
    for i in sa["state"]:
        for key, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][key]), (i, key)
    assert s.extra_state["tag"] == "rank0" and torch.equal(s.extra_state["buffer"], big[0])
    s.close()
    print(f"reshard restore at 1 rank: peers served {moved} bytes; bound {bound} + {SLACK}; "
          f"whole shards {whole}")
    assert nb1 * bs + len(stripes2) * bs <= moved <= bound + SLACK, (moved, bound)
    st = c.cluster_status(n0)["ranged_reads"]
    assert st["owner_reads"] >= 1 and st["decoded_reads"] >= 1
    assert set(st["last_decoded"]["stripes"]) <= stripes2

    # The exact rung at the saved size gathers the same slices the same way (rank 0 of 3,
    # its own shard mapped on node 0): the same bound.
    m3, o3 = trained()
    with torch.no_grad():
        for p in m3.parameters():
            p.zero_()
    before = served(c, (n0, n1))
    s = snap(c, n0, m3, o3, 0, N, {"buffer": None, "tag": None})
    assert s.restore() == 1 and s.restored_method == "exact"
    moved = served(c, (n0, n1)) - before
    s.close()
    for (key, x), (_, y) in zip(model.state_dict().items(), m3.state_dict().items()):
        assert torch.equal(x, y), key
    assert torch.equal(o3.state_dict()["state"][0]["exp_avg"], sa["state"][0]["exp_avg"])
    print(f"exact restore of rank 0 of 3: peers served {moved} bytes")
    assert nb1 * bs + len(stripes2) * bs <= moved <= bound + SLACK, (moved, bound)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp2_saved_at_2_restores_at_1_with_the_other_node_lost_not_replaced(make_cluster, tmp_path):
    """FSDP2 (``fully_shard``, gloo) saved at 2 ranks on a 2-node m=1 cluster; node 1 and its
    trainer SIGKILLed, node 1 wiped and not replaced; a restore at 1 rank through node 0
    decodes rank 1's DTensor chunks by ranged reads (the stripes of their covering blocks)
    and every parameter and optimizer tensor is bit-identical to the failure-free state."""
    import json
    import signal

    from integration.test_fsdp2_reshard import STEPS, launch, run, wait_ready

    c = make_cluster(2, 1)
    train = launch(c, tmp_path, 2, "train", "train")
    try:
        wait_ready(train, tmp_path, "train")
        ref = json.loads((tmp_path / "train.json").read_text())["at"]
        c.wait_committed(STEPS)
        train[-1].send_signal(signal.SIGKILL)
        c.kill(c.nodes[1], wipe=True)
    finally:
        for p in train:
            p.kill()
            p.wait()
    wait_for(lambda: not c.cluster_status(c.nodes[0])["peers"][c.nodes[1]]["alive"], 30, "node 1 down")
    out = run(c, tmp_path, 1, "at1")
    assert (out["restored"], out["method"], out["from_world"]) == (STEPS, "resharded", 2), out
    got, want = out["at"][str(STEPS)], ref[str(STEPS)]
    assert sorted(got) == sorted(want) and len(want) > 20
    assert [k for k in want if got[k] != want[k]] == []
    st = c.cluster_status(c.nodes[0])["ranged_reads"]
    assert st["decoded_reads"] >= 1 and st["last_decoded"]["rank"] == 1
    b0, b1 = st["last_decoded"]["blocks"]
    assert st["last_decoded"]["fetched_bytes"] <= 1 * (b1 - b0) * c.bs  # k = 1: one block per stripe
