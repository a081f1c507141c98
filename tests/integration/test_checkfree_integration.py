"""CheckFree rung of restore(), end to end: a 3-stage pipeline-parallel trainer on a local
cluster with parity 0 loses the node of stage 1; the stage comes back approximately from
its neighbours (CheckFree), stages 0 and 2 exactly, and training goes on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from snapshotd.wire import errors
from snapshotd.core.checkfree import CheckFreeSettings
from snapshotd_client.checkfree_restore import CheckFreeUnavailableError
from snapshotd_client.snapshotter import Snapshotter
from snapshotd_tools import localcluster as lc
from clusterkit import JOB, make_cluster  # noqa: F401 (fixture)

S = 3


def _run_pp(c, steps: int, tmp_path, tag: str, checkfree: bool = False, extra=(), ranks=None,
            expect_rc: int = 0) -> dict[int, list[dict]]:
    port = lc.free_port()
    socks = [os.path.join(c.d, f"{n}.sock") for n in c.nodes]
    procs = []
    ranks = list(range(S)) if ranks is None else ranks
    for r in ranks:
        cmd = [sys.executable, "-m", "snapshotd_tools.demo.pp_trainer", "--rank", str(r), "--world-size", str(S),
               "--master-port", str(port), "--socket", socks[r], "--steps", str(steps), "--job", JOB,
               "--gloo-timeout-s", "60", "--out", str(tmp_path / f"{tag}-r{r}.json")]
        if checkfree:
            cmd += ["--checkfree"]  # neighbours are read through the local daemon
        cmd += list(extra)
        err = open(tmp_path / f"{tag}-r{r}.err", "w")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO))
    outs = {}
    try:
        for r, p in zip(ranks, procs):
            out, _ = p.communicate(timeout=120)
            err = (tmp_path / f"{tag}-r{r}.err").read_text()
            assert p.returncode == expect_rc, f"rank {r} exited {p.returncode}:\n{out[-3000:]}\n{err[-5000:]}"
            outs[r] = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            outs[r].append({"event": "stderr", "text": err})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _losses(lines) -> list[float]:
    return [x["loss"] for x in lines if x["event"] == "step"]


@pytest.mark.timeout(300)
def test_lost_middle_stage_is_rebuilt_by_checkfree_and_training_goes_on(make_cluster, tmp_path):
    c = make_cluster(3, 0)  # group 3, m = 0: nothing can be rebuilt from parity
    first = _run_pp(c, 12, tmp_path, "a")
    for r in range(S):
        assert [x["step"] for x in first[r] if x["event"] == "restored"] == [0]
        assert len(_losses(first[r])) == 12
    pre = _losses(first[2])
    assert all(math.isfinite(x) for x in pre)
    c.wait_committed(12)

    c.lose([c.nodes[1]])  # the machine of stage 1 is gone: SIGKILL, wiped, restarted empty

    # Without CheckFree the lost stage's restore fails with the daemon's clear error.
    model = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    with Snapshotter(model, job_id=JOB, socket_path=os.path.join(c.d, "n1.sock"), rank=1, world_size=S,
                     local_world_size=1, pipeline_stage=(1, S), on_daemon_unavailable="raise") as s:
        with pytest.raises(errors.ConflictError) as ei:
            s.restore()
    assert "version 12" in str(ei.value), str(ei.value)

    t0 = time.monotonic()
    second = _run_pp(c, 22, tmp_path, "b", checkfree=True)
    restored = {r: next(x for x in second[r] if x["event"] == "restored") for r in range(S)}
    assert all(restored[r]["step"] == 12 for r in range(S)), restored
    assert restored[1]["approximate"] is True
    assert restored[0]["approximate"] is False and restored[2]["approximate"] is False
    assert "rebuilt APPROXIMATELY by CheckFree" in second[1][-1]["text"]
    post = _losses(second[2])
    assert len(post) == 10 and all(math.isfinite(x) for x in post), post
    # the approximate stage costs a little, then the loss keeps falling (deterministic run)
    tail = sum(post[-3:]) / 3
    assert tail < post[0], (pre, post)
    assert max(post) < 1.5 * pre[-1], (pre, post)
    # the job snapshots normally again: version 22 commits on every node
    c.wait_committed(22)
    print(f"checkfree run: {time.monotonic() - t0:.1f} s; losses before {pre[-3:]}, after {post}")


def _stage_snapshotter(c, j: int, **kw) -> tuple[torch.nn.Module, Snapshotter]:
    """A fresh stage ``j`` (no trained state) pointed at node ``j``'s real daemon."""
    from snapshotd_tools.demo import pp_trainer as pp

    stage, opt, sched = pp.build(j, S, 99, plus=True)
    return stage, Snapshotter(stage, opt, lr_scheduler=sched, job_id=JOB, socket_path=os.path.join(c.d, f"n{j}.sock"),
                       rank=j, world_size=S, local_world_size=1, pipeline_stage=(j, S),
                       edge_layers=stage.edge_layers, edge_copies=stage.edge_copies,
                       on_daemon_unavailable="raise", **kw)


@pytest.mark.timeout(300)
def test_lost_edge_stage_with_no_parity_gives_the_daemons_error_or_checkfrees(make_cluster):
    """Real daemons (m=0): stage 0's node is lost, so its daemon can rebuild nothing.
    Without CheckFree restore() raises the daemon's own error; with plain CheckFree (which
    cannot rebuild an edge stage) one ConflictError names both rungs. Nothing is loaded."""
    c = make_cluster(3, 0)
    _seed_version(c, 2)
    c.lose([c.nodes[0]])
    stage, snap = _stage_snapshotter(c, 0)
    with snap as s:
        before = [p.detach().clone() for p in stage.parameters()]
        with pytest.raises(errors.ConflictError) as ei:
            s.restore()
        assert not isinstance(ei.value, CheckFreeUnavailableError)
        daemon_error = str(ei.value)
        assert "lost 1 shards (m=0)" in daemon_error, daemon_error
        assert not s.restored_approximate and s.restored_method is None
        assert all(torch.equal(a, b) for a, b in zip(before, stage.parameters()))
    with _stage_snapshotter(c, 0, checkfree=CheckFreeSettings())[1] as s:
        with pytest.raises(CheckFreeUnavailableError, match="CheckFree cannot rebuild it") as ei:
            s.restore()
        assert isinstance(ei.value, errors.ConflictError)
        assert "edge stage" in str(ei.value), str(ei.value)
        # the daemon's reason is carried in the message, word for word
        assert daemon_error.split(": ", 1)[-1] in str(ei.value), (daemon_error, str(ei.value))
        assert not s.restored_approximate and s.restored_method is None
    assert c.committed(c.nodes[1]) == 2 and c.committed(c.nodes[2]) == 2


def _seed_version(c, steps: int, seed: int = 7, keep: dict | None = None) -> list[float]:
    """Train the CheckFree+ pipeline example in this process for ``steps`` steps (the same
    model, data and updates as ``pp_trainer --checkfree-plus --microbatches 2``) and save
    version ``steps`` of every stage to its node, as the trainer processes would (but
    without their start-up time). Returns the losses; ``keep`` receives the stages."""
    from snapshotd_tools.demo import pp_trainer as pp

    stages, opts, scheds = (list(x) for x in zip(*[pp.build(j, S, seed, plus=True) for j in range(S)]))
    pp.sync_edge_copies(stages)
    losses = []
    for step in range(steps):
        loss, norms = pp.train_step_local(stages, opts, scheds, seed, step, 2, plus=True)
        losses.append(loss)
    for j in range(S):
        with Snapshotter(stages[j], opts[j], lr_scheduler=scheds[j], job_id=JOB,
                         socket_path=os.path.join(c.d, f"n{j}.sock"), rank=j, world_size=S, local_world_size=1,
                         pipeline_stage=(j, S), edge_layers=stages[j].edge_layers,
                         edge_copies=stages[j].edge_copies, on_daemon_unavailable="raise") as s:
            s.record_grad_norm(norms[j])
            s.save(steps)
            s.wait(30)
    c.wait_committed(steps)
    if keep is not None:
        keep.update(stages=stages, opts=opts, scheds=scheds, norms=norms)
    return losses


def _simulated_recovery(kept: dict, lost: int, at: int, until: int) -> list[float]:
    """bench_checkfree's simulation: the pipeline in one process, stage ``lost`` rebuilt
    through the planner and ``apply_checkfree`` at step ``at``, trained to ``until``."""
    import importlib.util

    path = os.path.join(REPO, "bench", "bench_checkfree.py")
    spec = importlib.util.spec_from_file_location("bench_checkfree_it", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    p = bench.Pipe(S, 7, True)
    p.stages, p.opts, p.scheds, p.norms = kept["stages"], kept["opts"], kept["scheds"], kept["norms"]
    bench.lose_stage(p, lost, at, "checkfree", CheckFreeSettings(checkfree_plus=True), seed_salt=1)
    return [p.step(t, 2) for t in range(at, until)]


# -- CheckFree+ and adjacent losses with the real trainer processes -------------------------

def _restored(outs) -> dict[int, dict]:
    return {r: next(x for x in lines if x["event"] == "restored") for r, lines in outs.items()}


@pytest.mark.timeout(300)
def test_checkfree_plus_rebuilds_lost_edge_stages_and_training_goes_on(make_cluster, tmp_path):
    c = make_cluster(3, 0)
    plus = ["--checkfree-plus", "--microbatches", "2"]
    kept: dict = {}
    pre = _seed_version(c, 20, keep=kept)  # the first 20 steps (the middle-stage test runs them as processes)
    assert pre[-1] < pre[0]
    steps = {0: 40, 2: 60}  # steps are cheap next to a process start: 20 after each loss
    last = 20
    for lost, until in steps.items():  # the first stage, then the last one
        c.lose([c.nodes[lost]])
        out = _run_pp(c, until, tmp_path, f"lost{lost}", extra=plus)
        got = _restored(out)
        assert all(got[r]["step"] == last for r in range(S)), got
        assert got[lost]["approximate"] is True and got[lost]["method"] == "CheckFree+"
        assert all(got[r]["method"] == "exact" for r in range(S) if r != lost), got
        assert "rebuilt APPROXIMATELY by CheckFree+" in out[lost][-1]["text"]
        post = _losses(out[2])
        assert len(post) == until - last and all(math.isfinite(x) for x in post), post
        # the copy costs little and the loss keeps falling afterwards (batches of 8
        # sequences are noisy: compare means of 5 steps)
        assert sum(post[-5:]) / 5 < sum(post[:5]) / 5, (lost, pre[-4:], post)
        assert max(post) < 1.3 * pre[-1], (lost, pre[-4:], post)
        c.wait_committed(until)
        print(f"lost stage {lost}: losses before {pre[-3:]}, after {post}")
        if lost == 0:  # the benchmark's one-process simulation of the same recovery agrees
            sim = _simulated_recovery(kept, lost, last, until)
            assert sim == pytest.approx(post, abs=2e-3), (sim, post)
        pre, last = post, until


@pytest.mark.timeout(300)
def test_adjacent_lost_stages_give_the_clear_error_and_change_nothing(make_cluster, tmp_path):
    from snapshotd_tools.demo import pp_trainer as pp

    c = make_cluster(3, 0)
    plus = ["--checkfree-plus", "--microbatches", "2"]
    _seed_version(c, 6)
    c.lose([c.nodes[0], c.nodes[1]])
    # the two lost ranks say why at once and exit 3, before joining the process group
    out = _run_pp(c, 10, tmp_path, "b", extra=plus, ranks=[0, 1], expect_rc=3)
    for r in (0, 1):
        (fail,) = [x for x in out[r] if x["event"] == "restore_failed"]
        assert "stages 0 and 1 are both lost" in fail["error"], fail
        assert "fall through to the next recovery rung" in fail["error"], fail
        other = 1 - r  # each rank names the neighbour it could not read: the other lost one
        assert f"stage {r} of job '{JOB}' version 6 is lost" in fail["error"], fail
        assert f"[stage {other}: CheckFree: cannot read neighbour rank {other}" in fail["error"], fail
        assert not [x for x in out[r] if x["event"] in ("restored", "step")]
    # in process: the failed restore is a ConflictError (what the next rung catches) and
    # leaves the model, optimizer and scheduler untouched
    stage, opt, sched = pp.build(1, S, 99, plus=True)
    before = [p.detach().clone() for p in stage.parameters()]
    lr = opt.param_groups[0]["lr"]
    with Snapshotter(stage, opt, lr_scheduler=sched, job_id=JOB, socket_path=os.path.join(c.d, "n1.sock"),
                     rank=1, world_size=S, local_world_size=1, pipeline_stage=(1, S),
                     edge_copies=stage.edge_copies, on_daemon_unavailable="raise",
                     checkfree=CheckFreeSettings(checkfree_plus=True)) as s:
        with pytest.raises(CheckFreeUnavailableError, match="stages 0 and 1 are both lost") as ei:
            s.restore()
        assert isinstance(ei.value, errors.ConflictError)
        assert not s.restored_approximate and s.restored_method is None
    assert all(torch.equal(a, b) for a, b in zip(before, stage.parameters()))
    assert opt.param_groups[0]["lr"] == lr and sched.last_epoch == 0
    assert c.committed(c.nodes[2]) == 6  # the survivor still holds its exact state


# -- neighbours stored as data-parallel slices (shard_replicated=True) ---------------------

@pytest.mark.timeout(300)
def test_neighbours_stored_as_dp_slices_feed_checkfree_and_checkfree_plus(make_cluster):
    """4 stages x 2 data-parallel ranks, node nj holds stage j's two ranks, each storing half
    of the stage's model and optimizer. Nodes n1 and n3 are lost (parity 0): stage 1 comes
    back by CheckFree and stage 3 by CheckFree+, both from slices gathered across nodes,
    with exactly the planned values."""
    from snapshotd_tools.demo import pp_trainer as pp

    n_st, dp = 4, 2
    c = make_cluster(n_st, 0)
    pipe = [pp.build(j, n_st, 11, plus=True) for j in range(n_st)]
    stages, opts, scheds = (list(x) for x in zip(*pipe))
    pp.sync_edge_copies(stages)
    _, norms = pp.train_step_local(stages, opts, scheds, 11, 0, 2, plus=True)
    plus = CheckFreeSettings(checkfree_plus=True)

    def snap(j, r, model, opt, sched):
        return Snapshotter(model, opt, lr_scheduler=sched, job_id=JOB, socket_path=os.path.join(c.d, f"n{j}.sock"),
                           rank=r, world_size=n_st * dp, local_world_size=dp, shard_replicated=True,
                           dp_ranks=(dp * j, dp * j + 1), pipeline_stage=(j, n_st), edge_layers=model.edge_layers,
                           edge_copies=model.edge_copies, checkfree=plus, stage_ranks=(0, 2, 4, 6),
                           on_daemon_unavailable="raise")

    snaps = [snap(j, dp * j + k, stages[j], opts[j], scheds[j]) for j in range(n_st) for k in range(dp)]
    try:
        for s in snaps:
            s.record_grad_norm(norms[s.cfg.pipeline_stage[0]])
            s.save(1)
        for s in snaps:
            s.wait(30)
    finally:
        for s in snaps:
            s.close()
    c.wait_committed(1)
    m = c.client(c.nodes[0]).open_shard(JOB, 1, 1).manifest
    assert 0 < m.slice_bytes < m.replicated_bytes and tuple(m.dp_ranks) == (0, 1)  # rank 1 holds a slice
    c.lose([c.nodes[1], c.nodes[3]])
    want = {n: p.detach().clone() for j in range(n_st) for n, p in ((f"{j}/{k}", v) for k, v in
                                                                      stages[j].named_parameters())}
    eps = 1e-4
    a, b = norms[2] + eps, norms[0] + eps
    for j, r in ((1, 2), (1, 3), (3, 6)):
        model, opt, sched = pp.build(j, n_st, 500 + r, plus=True)
        with snap(j, r, model, opt, sched) as s:
            assert s.restore() == 1
            assert s.restored_approximate and s.restored_method == ("CheckFree" if j == 1 else "CheckFree+")
        got = dict(model.named_parameters())
        for name, t in got.items():
            part = name.split(".")[0]
            if j == 1 and part == "block":
                exp = (a * want[f"2/{name}"] + b * want[f"0/{name}"]) / (a + b)
            elif j == 1 and part == "embed_copy":
                exp = want["0/embed" + name[len("embed_copy"):]]
            elif j == 3 and part == "block":
                exp = want[f"2/{name}"]
            else:  # stage 3's head: stage 2's copy of it
                assert j == 3 and part == "head", name
                exp = want["2/head_copy" + name[len("head"):]]
            assert torch.allclose(t.detach(), exp, atol=1e-6), (j, name)
        warm = min(1.0, 2 / pp.WARMUP_STEPS)  # the schedule resumes at step 1
        assert not opt.state and opt.param_groups[0]["lr"] == pytest.approx(pp.LR * 1.1 * warm)
    assert torch.equal(want["3/head.out.weight"], want["2/head_copy.out.weight"])  # copies were in sync
