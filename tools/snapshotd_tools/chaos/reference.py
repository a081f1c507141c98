"""The failure-free reference of a ``snapshotd chaos`` session: a state digest per step.

The same data-parallel job as the session's, run without snapshots or faults; every
digest a rank reports during the session is compared with it (``invariants.py``).
Computed once per (nodes, steps) and cached as JSON in the work directory.
"""

from __future__ import annotations

import json
import os
import time

from snapshotd_tools.chaos.rig import Trainers
from snapshotd_tools.chaos.timeouts import PHASE_TIMEOUT_S


def load_or_compute_reference(workdir: str, n: int, steps: int, spawner, say) -> list[str]:
    """State digest per step (index 0 = initial) of the job run without failures or
    snapshots; computed once per (nodes, steps) and cached in ``workdir``. ``spawner()``
    gives the fork server the ranks are forked from (called only when computing)."""
    path = os.path.join(workdir, f"reference-w{n}-s{steps}.json")
    if os.path.exists(path):
        with open(path) as f:
            ref = json.load(f)["digests"]
        say(f"reference: {len(ref) - 1} steps, cached in {path}")
        return ref
    say(f"reference: {n} data-parallel trainers, {steps} steps, no snapshots ...")
    t0 = time.monotonic()
    d = os.path.join(workdir, "reference")
    os.makedirs(d, exist_ok=True)
    g = Trainers(d, "reference", n, steps, None, spawner=spawner())
    try:
        g.wait_end(PHASE_TIMEOUT_S)
    finally:
        g.kill()
    if any(g.ended.values()):
        raise RuntimeError(f"reference run failed: {g.error_lines()}")
    by_step: dict[int, set] = {}
    for rank, step, digest, _ in g.digests:
        by_step.setdefault(step, set()).add(digest)
    bad = {s: v for s, v in by_step.items() if len(v) != 1}
    if bad or sorted(by_step) != list(range(steps + 1)):
        raise RuntimeError(f"reference run: replicas disagree or steps missing ({sorted(bad)})")
    ref = [by_step[s].pop() for s in range(steps + 1)]
    with open(path, "w") as f:
        json.dump({"world": n, "steps": steps, "digests": ref}, f)
    say(f"reference: done in {time.monotonic() - t0:.1f} s")
    return ref
