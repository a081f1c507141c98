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
  still there after the fault). ``committed_at_fault`` is the trainers' own record: the
  newest version their hand-offs were told was committed before the fault, not what the
  daemons under test say afterwards (their claim, ``daemon_committed``, must hold too);
  with ``expect: unrecoverable``, no rank restored at all and
  the error names the version that was lost (FAILED_PRECONDITION, or the CheckFree rung);
- ``checkfree`` (pipeline jobs, ``expect: checkfree``): the lost stages came back through
  the CheckFree rung, flagged approximate; the others exactly; the loss stays finite;
- ``lost_steps``: training resumed and reached the last step, and lost at most
  ``max_lost`` steps: a fixed bound (the versions a rank can have in flight), not the
  commit record, so a cluster that stopped committing while the job trained on fails it
  even though ``restorable`` holds;
- ``no_leaks``: no process and no shared-memory segment outlived the scenario, and each
  daemon's segments add up to what it accounts for;
- ``memory``: each daemon's RSS + held shared memory after recovery is within the stated
  tolerance of its level before the fault AND of its level at the start of the session
  (a slow leak passes every per-fault bound); not measured where a measurement was
  expected is a failure;
- ``corruption_detected`` (corrupt faults): a flipped bit that nobody reported (no
  checksum error at the trainers, no corrupt-block report) fails, even when the restore
  happened to be bit-identical;
- ``garbage_refused`` (garbage faults): every junk request was answered with the code the
  README promises (gRPC: INVALID_ARGUMENT; peer plane: PEER_PROTOCOL), none unanswered,
  and the daemon still serves; the detail is built from the answers observed;
- ``commit_after_fault``: once the fault cleared, the job's trainers were told of a new
  committed version within ``commit_bound_s`` (their own record, with its time);
- ``commit_through_stall`` (stall_server faults): a version newer than every one handed
  over when a daemon's peer serving thread stalled committed (the trainers' record)
  within ``commit_bound_s`` after the stall ended, though its contributions to the
  stalled node had failed while its peers took it for dead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MEM_TOLERANCE_REL = 0.25  # + 25 % ...
MEM_TOLERANCE_ABS = 64 << 20  # ... + 64 MiB (a replacement daemon's ZeroMQ/gRPC buffers)
# A rank has 3 slots (the committed version + 2 in flight): a restore loses at most the
# 2 versions in flight and the step trained since; more means commits stalled.
MAX_LOST_STEPS = 3
COMMIT_BOUND_S = 30.0  # after a fault clears, a new version commits within this
GARBAGE_WANT = {"grpc": "INVALID_ARGUMENT", "zmq": "PEER_PROTOCOL"}


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
    memory_expected: bool = True  # False: no daemon could be measured (e.g. a between-faults row)
    session_memory: dict = field(default_factory=dict)  # node -> (session start bytes, now)
    daemon_committed: int = 0  # the daemons' claim after the fault (judged too, not trusted)
    max_lost: int = MAX_LOST_STEPS
    corrupted: str = ""  # what was corrupted ("" = no corruption fault)
    corrupt_found: list = field(default_factory=list)  # evidence: trainer errors, daemon reports
    garbage: dict = field(default_factory=dict)  # plane, answers {what: code}, alive
    commit_bound_s: float = COMMIT_BOUND_S
    commit_after_s: float | None = None  # fault cleared -> a newer version committed (None: never)
    commit_expected: bool = False
    stall: dict = field(default_factory=dict)  # stall_server: node, target version, after_s
    t_clear: float = 0.0  # time.time() when the fault cleared (the job's last relaunch)
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
    if o.corrupted:
        out.append(_corruption_detected(o))
    if o.garbage:
        out.append(_garbage_refused(o))
    if o.commit_expected:
        out.append(_commit_after_fault(o))
    if o.stall:
        out.append(_commit_through_stall(o))
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
        return Check("restorable", False, f"restored step {r}, but the trainers were told version "
                                          f"{o.committed_at_fault} had committed before the fault")
    if r < o.daemon_committed:
        return Check("restorable", False, f"restored step {r}, but the daemons reported version "
                                          f"{o.daemon_committed} committed after the fault")
    if r > o.fault_step:
        return Check("restorable", False, f"restored step {r}, beyond the last step reached ({o.fault_step})")
    return Check("restorable", True, f"step {r} (committed at the fault, per the trainers: "
                                     f"{o.committed_at_fault}; per the daemons: {o.daemon_committed})")


def _lost_steps(o: Observation) -> Check:
    """Progress and a fixed bound, not the commit record: a cluster that stopped
    committing while the job trained on passes ``restorable`` but fails this."""
    done = o.resumed_to and all(s >= o.final_step for s in o.resumed_to.values())
    if not done:
        return Check("lost_steps", False, f"training did not reach step {o.final_step} after resuming "
                                          f"(last steps per rank: {o.resumed_to})")
    if not o.restore_points:
        return Check("lost_steps", False, "no rank restored")
    lost = o.fault_step - min(o.restore_points.values())
    return Check("lost_steps", 0 <= lost <= o.max_lost,
                 f"lost {lost} step(s) (bound {o.max_lost}: the versions a rank can have in flight)")


def _corruption_detected(o: Observation) -> Check:
    """A flipped bit must be noticed by someone, whatever the restore gave back."""
    if not o.corrupt_found:
        return Check("corruption_detected", False, f"{o.corrupted}: nothing reported it (no checksum "
                                                   "error at the trainers, no corrupt-block report)")
    return Check("corruption_detected", True, "; ".join(str(x)[:120] for x in o.corrupt_found[:2]))


def _garbage_refused(o: Observation) -> Check:
    from collections import Counter

    g = o.garbage
    want = GARBAGE_WANT.get(g.get("plane"), "?")
    answers = g.get("answers") or {}
    counts = Counter(answers.values())
    seen = ", ".join(f"{c} x{n}" for c, n in sorted(counts.items())) or "none"
    bad = {w: c for w, c in answers.items() if c != want}
    why = []
    if not answers:
        why.append("no junk request was answered")
    if bad:
        why.append(f"answered {dict(list(bad.items())[:4])} (want {want})")
    if not g.get("alive"):
        why.append("the daemon stopped serving")
    sent = g.get("raw_sent", 0)
    text = (f"{len(answers)} junk request(s) on the {g.get('plane')} plane answered: {seen}; "
            f"{sent} raw junk message(s) before them; daemon "
            f"{'still serving' if g.get('alive') else 'DOWN'}")
    return Check("garbage_refused", not why, "; ".join(why) + f" ({text})" if why else text)


def _commit_after_fault(o: Observation) -> Check:
    if o.commit_after_s is None:
        return Check("commit_after_fault", False, f"no newer version was committed within "
                                                  f"{o.commit_bound_s:g} s after the fault cleared")
    return Check("commit_after_fault", o.commit_after_s <= o.commit_bound_s,
                 f"a newer version committed {o.commit_after_s:.1f} s after the fault cleared "
                 f"(bound {o.commit_bound_s:g} s)")


def _commit_through_stall(o: Observation) -> Check:
    st = o.stall
    what = f"v{st.get('target')} or newer (handed over after {st.get('node')}'s serving thread stalled)"
    if st.get("after_s") is None:
        return Check("commit_through_stall", False, f"{what} not committed within {o.commit_bound_s:g} s "
                                                    "after the stall ended")
    return Check("commit_through_stall", st["after_s"] <= o.commit_bound_s,
                 f"{what} committed {st['after_s']:.1f} s after the stall ended (bound {o.commit_bound_s:g} s; "
                 f"per {st.get('via', 'the trainers')})")


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


def _over(pairs: dict, what: str) -> list[str]:
    bad = []
    for node, (before, after) in sorted(pairs.items()):
        limit = before * (1 + MEM_TOLERANCE_REL) + MEM_TOLERANCE_ABS
        if after > limit:
            bad.append(f"{node}: {after / 2**20:.1f} MiB > {limit / 2**20:.1f} MiB allowed "
                       f"({before / 2**20:.1f} {what})")
    return bad


def _worst(pairs: dict) -> str:
    node, (a, b) = max(pairs.items(), key=lambda kv: kv[1][1] - kv[1][0])
    return f"{node} {(b - a) / 2**20:+.1f} MiB"


def _memory(o: Observation) -> Check:
    """Per fault (after recovery vs just before) and over the session (vs its start)."""
    if not o.memory:
        return Check("memory", not o.memory_expected,
                     "not measured" + (" (a measurement was expected)" if o.memory_expected else ""))
    if o.memory_expected and not o.session_memory:
        return Check("memory", False, "no session baseline to compare with")
    bad = _over(o.memory, "before the fault") + _over(o.session_memory, "at the session's start")
    text = f"largest change over the fault {_worst(o.memory)}"
    if o.session_memory:
        text += f", since the session's start {_worst(o.session_memory)}"
    return Check("memory", not bad, "; ".join(bad) or
                 f"{text} (tolerance +{MEM_TOLERANCE_REL:.0%} +{MEM_TOLERANCE_ABS >> 20} MiB)")
