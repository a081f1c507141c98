"""The CheckFree rung under real faults: a pipeline-parallel job loses more stages than
the erasure code can rebuild (``pipeline_loss``).

The job is ``snapshotd_tools.demo.pp_trainer`` (one stage per node, CheckFree+ on: a lost middle
stage becomes the weighted average of its neighbours, a lost edge stage a copy of its
swap partner) on a cluster with few parity blocks (``parity``, default 1). Losing more
than m nodes, none adjacent, the daemons must refuse to rebuild those stages, and the
restore must take the CheckFree rung: the lost stages come back flagged approximate, the
others exactly, and training goes on with a finite loss. (Approximate by design: there
is no bit-exact reference to compare with, see ``invariants._checkfree``.)
``run_pipeline_scenario`` is what the Harness calls: it pauses the data-parallel job,
boots the pipeline's cluster, runs ``run_pipeline`` and tears it all down again.
"""

from __future__ import annotations

import os
import shutil
import time

from snapshotd_tools.chaos.rig import Rig, Trainers
from snapshotd_tools.chaos.scenarios import resolve_nodes

PP_JOB = "pp"
PP_STEPS = 14  # a short job: the pipeline runs on a cluster of its own


def run_pipeline(h, rig: Rig, sc, obs, res, launches: list) -> None:
    lost = resolve_nodes(sc.params["nodes"], rig.n, rig.m)
    ranks = [rig.nodes.index(x) for x in lost]
    obs.lost_ranks = ranks
    obs.final_step = PP_STEPS
    extra = ("--checkfree-plus", "--gloo-timeout-s", "20")

    def launch(tag: str) -> Trainers:
        g = Trainers(rig.d, tag, rig.n, PP_STEPS, rig.socks, extra,
                     module="snapshotd_tools.demo.pp_trainer", job=PP_JOB, spawner=h.fs)
        launches.append(g)
        return g

    g = launch("pp-run")
    at = min(sc.at_step, PP_STEPS - 4)  # the soak draws steps for the longer data-parallel job
    g.wait(lambda: g.last[0] >= at, 120, f"step {at}")
    before = {n: rig.memory(n) for n in rig.nodes}
    t_fault = time.monotonic()
    for x in lost:
        g.kill(rig.nodes.index(x))
        rig.kill_daemon(x)
    res.fault = (f"pipeline job (CheckFree+), m={rig.m}: SIGKILL nodes {','.join(lost)} "
                 f"(stages {ranks}), wiped")
    h.say(f"    fault: {res.fault}")
    res.detected = h.detect_dead(lost, t_fault, rig=rig)
    time.sleep(1.0)
    g.kill()
    while g.pump(0.05):
        pass
    obs.fault_step = max(g.last.values())
    obs.committed_at_fault = h.committed_now(skip=lost, job=PP_JOB, rig=rig)
    for x in lost:
        rig.restart(x, wipe=True)
    g2 = launch("pp-resumed")
    g2.wait_end(180)
    obs.restore_points, obs.resumed_to = dict(g2.restored), dict(g2.last)
    obs.rung, obs.losses = dict(g2.restored_ev), list(g2.losses)
    obs.errors = g2.error_lines()
    r = min(g2.restored.values(), default=0)
    res.recovery = (f"{','.join(lost)} replaced (empty); erasure rebuild impossible; "
                    f"CheckFree rung, job restarted from v{r}")
    res.recovery_s = round(g2.t_restored - t_fault, 2) if g2.t_restored else None
    res.lost_steps = obs.fault_step - r
    h.say("    restored: " + ", ".join(f"stage {k}: {v.get('method')}" for k, v in sorted(obs.rung.items())))
    obs.memory = {n: (before[n], rig.memory(n)) for n in rig.nodes}
    obs.leaks += rig.accounting_leaks()


def run_pipeline_scenario(h, sc, obs, res) -> None:
    """On a cluster of its own; the data-parallel job is paused meanwhile (stopped,
    then restarted from its last commit: that restore is judged with the next fault)."""
    g = h.g
    g.kill()
    h.drain(g)
    d = os.path.join(h.workdir, f"pipeline-{h.faults:04d}")
    shutil.rmtree(d, ignore_errors=True)
    launches: list[Trainers] = []
    rig = None
    try:
        rig = Rig(d, h.n, sc.params["parity"], h.block_size, h.budget)
        run_pipeline(h, rig, sc, obs, res, launches)
    finally:
        for x in launches:
            obs.leaks += x.leaked()
            x.kill()
        if rig is not None:
            obs.leaks += rig.down()
            if not obs.leaks and not h.keep:
                shutil.rmtree(d, ignore_errors=True)
        elif os.path.exists(os.path.join(d, "cluster.json")):
            from snapshotd_tools import localcluster as lc

            lc.down(d)
        h.launch("after-pipeline")
