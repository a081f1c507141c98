"""The invariants a scenario must hold, judged from what the runner observed. Pure.

The runner records, for one scenario, an ``Observation``: every state digest any rank
reported (with the step it belongs to, and whether it was a restore), the restore
points, the committed version when the fault hit, the errors the trainers gave, leaked
processes and segments, and each daemon's memory before the fault and after recovery.
``check`` turns it into one ``Check`` per invariant, each with the reason it failed:

- ``bit_identical``: every state any rank held, restored or trained, equals the
  failure-free reference at the same step (so nothing came from a torn or corrupt
  version: a torn one mixes steps, a corrupt one differs in a bit);
- ``restorable``: with ``expect: resume``, every rank restored the same step r with
  committed_at_fault <= r <= the last step any rank reached (the committed version is
  still there after the fault); with ``expect: unrecoverable``, no rank restored at all and
  the error names the version that was lost (FAILED_PRECONDITION, or the CheckFree rung);
- ``checkfree`` (pipeline jobs, ``expect: checkfree``): the lost stages came back through
  the CheckFree rung, flagged approximate; the others exactly; the loss stays finite;
- ``lost_steps``: training resumed and reached the last step, losing at most the steps
  since the last commit (the same bound, stated as steps);
- ``no_leaks``: no process and no shared-memory segment outlived the scenario, and each
  daemon's segments add up to what it accounts for;
- ``memory``: each daemon's RSS + held shared memory after recovery is within the stated
  tolerance of its level before the fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MEM_TOLERANCE_REL = 0.25  # + 25 % ...
MEM_TOLERANCE_ABS = 64 << 20  # ... + 64 MiB (a replacement daemon's ZeroMQ/gRPC buffers)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Observation:
    expect: str  # "resume" | "unrecoverable"
    final_step: int  # the job's last step (the reference's length)
    reference: list  # digest per step; reference[0] = the initial state
    digests: list = field(default_factory=list)  # (phase, rank, step, digest, restored?)
    restore_points: dict = field(default_factory=dict)  # rank -> step of the resumed run
    fault_step: int = 0  # the last step any rank reached before the trainers stopped
    committed_at_fault: int = 0  # newest version any live node reported committed
    resumed_to: dict = field(default_factory=dict)  # rank -> last step after resuming
    errors: list = field(default_factory=list)  # error lines of trainers that failed to restore
    leaks: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # node -> (before bytes, after bytes)
    notes: list = field(default_factory=list)
    # pipeline (expect "checkfree"): rank -> restored event; the ranks whose node was lost
    rung: dict = field(default_factory=dict)
    lost_ranks: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # after resuming


def check(o: Observation) -> list[Check]:
    if o.expect == "checkfree":
        out = [_restorable(o), _checkfree(o), _lost_steps(o)]
    elif o.expect == "resume":
        out = [_bit_identical(o), _restorable(o), _lost_steps(o)]
    else:
        out = [_bit_identical(o), _refused(o)]
    out += [Check("no_leaks", not o.leaks, "; ".join(o.leaks[:5]) or "no process or segment left"),
            _memory(o)]
    return out


def _bit_identical(o: Observation) -> Check:
    bad = []
    for phase, rank, step, digest, restored in o.digests:
        want = o.reference[step] if 0 <= step < len(o.reference) else None
        if digest != want:
            what = "restored" if restored else "trained"
            bad.append(f"{phase} rank {rank} {what} step {step}: {digest[:12]} != reference "
                       f"{(want or '-')[:12]}")
    n = len(o.digests)
    return Check("bit_identical", not bad and n > 0,
                 "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
                 if bad else (f"{n} states compared" if n else "no state was reported"))


def _restorable(o: Observation) -> Check:
    if not o.restore_points:
        return Check("restorable", False, "no rank restored: " + (o.errors[0] if o.errors else "no error seen"))
    steps = set(o.restore_points.values())
    if len(steps) != 1:
        return Check("restorable", False, f"ranks restored different steps {sorted(steps)}")
    r = steps.pop()
    if r < o.committed_at_fault:
        return Check("restorable", False, f"restored step {r}, but version {o.committed_at_fault} "
                                          "was committed when the fault hit")
    if r > o.fault_step:
        return Check("restorable", False, f"restored step {r}, beyond the last step reached ({o.fault_step})")
    return Check("restorable", True, f"step {r} (committed at the fault: {o.committed_at_fault})")


def _lost_steps(o: Observation) -> Check:
    r = min(o.restore_points.values()) if o.restore_points else 0
    lost = o.fault_step - r
    bound = o.fault_step - o.committed_at_fault
    done = o.resumed_to and all(s >= o.final_step for s in o.resumed_to.values())
    if not done:
        return Check("lost_steps", False, f"training did not reach step {o.final_step} after resuming "
                                          f"(last steps per rank: {o.resumed_to})")
    return Check("lost_steps", lost <= bound, f"lost {lost} step(s), bound {bound} (steps since the "
                                              f"last commit at the fault)")


VERSION_RE = re.compile(r"version \d+|v\d+\b")


def _refused(o: Observation) -> Check:
    """More than m losses: no restore, and a clear error that names the version."""
    if o.restore_points:
        return Check("refused", False, f"expected no restore, but ranks restored {o.restore_points}")
    named = [e for e in o.errors if VERSION_RE.search(e) or "CheckFree" in e]
    named.sort(key=lambda e: "lost" not in e)  # the planner's reason first, where a rank got it
    if not named:
        return Check("refused", False, "no clear error naming the lost version: " +
                     (o.errors[0][:200] if o.errors else "no error seen"))
    return Check("refused", True, named[0][:240])


def _checkfree(o: Observation) -> Check:
    """More than m stages lost: each lost stage rebuilt by the CheckFree rung and flagged
    approximate, every other stage restored exactly, and the loss stays finite."""
    import math

    bad = []
    for r, ev in sorted(o.rung.items()):
        method, approx = ev.get("method"), ev.get("approximate")
        if r in o.lost_ranks and not (approx and str(method).startswith("CheckFree")):
            bad.append(f"lost stage {r} restored by {method!r} (approximate={approx})")
        if r not in o.lost_ranks and (approx or method != "exact"):
            bad.append(f"surviving stage {r} restored by {method!r} (approximate={approx})")
    if not o.rung:
        bad.append("no stage restored: " + (o.errors[0][:160] if o.errors else "no error seen"))
    if not o.losses or not all(math.isfinite(x) for x in o.losses):
        bad.append(f"losses after resuming not all finite: {o.losses[:5]}")
    methods = sorted({str(ev.get('method')) for r, ev in o.rung.items() if r in o.lost_ranks})
    return Check("checkfree", not bad, "; ".join(bad) or
                 f"stages {o.lost_ranks} rebuilt by {'/'.join(methods)}, flagged approximate; "
                 f"the others exact")


def _memory(o: Observation) -> Check:
    bad = []
    for node, (before, after) in sorted(o.memory.items()):
        limit = before * (1 + MEM_TOLERANCE_REL) + MEM_TOLERANCE_ABS
        if after > limit:
            bad.append(f"{node}: {after / 2**20:.1f} MiB after > {limit / 2**20:.1f} MiB allowed "
                       f"({before / 2**20:.1f} before)")
    if not o.memory:
        return Check("memory", True, "not measured (no daemon recovered)")
    worst = max(o.memory.items(), key=lambda kv: kv[1][1] - kv[1][0])
    return Check("memory", not bad, "; ".join(bad) or
                 f"largest change {worst[0]}: {(worst[1][1] - worst[1][0]) / 2**20:+.1f} MiB "
                 f"(tolerance +{MEM_TOLERANCE_REL:.0%} +{MEM_TOLERANCE_ABS >> 20} MiB)")
