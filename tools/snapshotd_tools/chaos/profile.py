"""Trace-driven soak: the fault schedule of ``snapshotd chaos --soak --profile NAME``.

Pure: no processes, sockets or clocks. A failure profile (``snapshotd.core.sim.profiles``:
``llama3``, ``rsc``) gives the kinds of fault a large job sees and their relative rates
(``fault_kinds``); this module draws a seeded schedule of them for the local rig,
time-compressed: faults arrive as a Poisson process with mean gap ``--mtbf`` seconds
(the profile's job MTBF, hours at scale, scaled down to it), each one's kind drawn with
the profile's shares. Each kind maps to a fault the harness already knows:

* ``kill_trainer`` -> ``kill_trainer`` (a process restart; the node's memory survives);
* ``kill_node``    -> ``kill_node`` of one node (daemon + trainer SIGKILLed, memory wiped);
* ``kill_domain``  -> ``kill_node`` of every node of one failure domain at once (the
  local rig's "racks": consecutive runs of ``domain_size`` nodes, ``domains``). A domain
  of at most m nodes must be survived; one of more than m must be refused with the
  clear m+1 error (``expect: unrecoverable``), as the matrix's m+1 scenario is;
* ``slow_node``    -> ``slow_peer`` (a daemon slowed by SIGSTOP/SIGCONT cycles).

Correlation: a domain fault is correlated by construction, and with ``overlap_p`` a
crash fault gets a second fault during its recovery (as ``--overlap`` does for the plain
soak) aimed at another node of the SAME domain when there is one (a second failure
behind the same switch), else at any node the first fault spared.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from snapshotd_tools.chaos.scenarios import Scenario, SoakEvent, soak_overlap

KINDS = ("kill_trainer", "kill_node", "kill_domain", "slow_node")
DOMAIN_SIZE = 2  # default nodes per failure domain of the local rig
SLOW = {"seconds": 5.0, "stop_ms": 300, "run_ms": 200}  # the matrix's slow-peer cycle


@dataclass(frozen=True)
class ProfileEvent(SoakEvent):
    fault: str = ""  # the profile's kind (KINDS) this scenario carries out
    domain: int = -1  # the failure domain it hit (kill_domain, and every node's domain)


def domains(nodes: int, size: int = DOMAIN_SIZE) -> list[list[str]]:
    """The rig's failure domains: n0..n<size-1>, n<size>..., the last one possibly smaller."""
    if nodes < 1 or size < 1:
        raise ValueError("need at least one node and a domain size >= 1")
    return [[f"n{i}" for i in range(s, min(nodes, s + size))] for s in range(0, nodes, size)]


def compression(profile, gpus: int | None, mtbf_s: float) -> float:
    """How many seconds of the profile's job one soak second stands for: its job MTBF (at
    ``gpus``, default the job size it was measured at) over the soak's ``mtbf_s``."""
    return profile.job_mtbf_s(gpus or profile.ref_gpus) / mtbf_s


def profile_schedule(seed: int, duration_s: float, mtbf_s: float, kinds: list[tuple[str, float]],
                     nodes: int, parity: int, steps: int, overlap_p: float = 0.0,
                     domain_size: int = DOMAIN_SIZE, tag: str = "profile") -> list[ProfileEvent]:
    """The faults of a trace-driven soak: exponential gaps with mean ``mtbf_s`` until
    ``duration_s``; each one's kind drawn from ``kinds`` ([(kind, relative rate)], e.g.
    ``fault_kinds(llama3())``), its target node and fault step at random. Same arguments,
    same schedule; the overlaps come from a stream of their own, so the faults and their
    times do not depend on ``overlap_p``."""
    if duration_s <= 0 or mtbf_s <= 0:
        raise ValueError("duration and mtbf must be positive")
    if not 0.0 <= overlap_p <= 1.0:
        raise ValueError(f"the overlap probability must be in [0, 1] (got {overlap_p})")
    if steps < 6:
        raise ValueError("soak jobs need at least 6 steps")
    if not 1 <= parity < nodes:
        raise ValueError("need 1 <= parity < nodes")
    unknown = [k for k, _ in kinds if k not in KINDS]
    if unknown or not kinds or any(not (w >= 0 and math.isfinite(w)) for _, w in kinds) \
            or sum(w for _, w in kinds) <= 0:
        raise ValueError(f"kinds must be [(kind, rate >= 0)] over {', '.join(KINDS)} with a "
                         f"positive total (got {kinds!r})")
    doms = domains(nodes, domain_size)
    dom_of = {x: i for i, d in enumerate(doms) for x in d}
    names, weights = [k for k, _ in kinds], [w for _, w in kinds]
    rng, orng = random.Random(f"{tag}-{seed}"), random.Random(f"{tag}-overlap-{seed}")
    out: list[ProfileEvent] = []
    t, i = 0.0, 0
    while True:
        t += rng.expovariate(1.0 / mtbf_s)
        if t >= duration_s:
            return out
        kind = rng.choices(names, weights)[0]
        node = f"n{rng.randrange(nodes)}"
        at = rng.randrange(3, steps - 2)
        i += 1
        expect, hit = "resume", [node]
        if kind == "kill_trainer":
            sc_kind, params, what = "kill_trainer", {"node": node}, f"trainer of {node} killed"
        elif kind == "kill_node":
            sc_kind, params, what = "kill_node", {"nodes": [node]}, f"node {node} lost"
        elif kind == "kill_domain":
            hit = doms[dom_of[node]]
            sc_kind, params = "kill_node", {"nodes": list(hit)}
            expect = "unrecoverable" if len(hit) > parity else "resume"
            what = f"domain {dom_of[node]} ({','.join(hit)}) lost at once"
        else:
            sc_kind, params, what = "slow_peer", {"node": node, **SLOW}, f"daemon {node} slowed"
        base = Scenario("x", sc_kind, params, at, expect)
        ov = None
        if overlap_p > 0 and orng.random() < overlap_p:
            ov = soak_overlap(orng, base, nodes)
            if ov is not None:  # correlated: another node behind the same switch, if any
                near = [x for x in doms[dom_of[node]] if x not in hit]
                spared = near or [x for x in dom_of if x not in hit]
                if spared:
                    ov["node"] = spared[orng.randrange(len(spared))]
        name = f"soak-{i:04d}-{kind.replace('_', '-')}{'+overlap' if ov else ''}"
        desc = f"{tag}: {what}"
        out.append(ProfileEvent(round(t, 3), Scenario(name, sc_kind, params, at, expect, False, desc, ov),
                                kind, dom_of[node]))


def kind_summary(events: list[ProfileEvent], ran: set[str], kinds: list[tuple[str, float]]) -> dict:
    """Per profile kind: its share, how many faults the schedule drew and how many ran
    (``ran``: the scenario names that were injected)."""
    total = sum(w for _, w in kinds) or 1.0
    n = len(events)
    out = {}
    for k, w in kinds:
        drawn = [e for e in events if e.fault == k]
        out[k] = {"share": round(w / total, 4), "drawn": len(drawn),
                  "drawn_share": round(len(drawn) / n, 4) if n else None,
                  "run": sum(e.scenario.name in ran for e in drawn)}
    return out
