"""Chaos scenarios: what a scenario file may say, its validation, and the soak schedule.

Pure: no processes, sockets or clocks. A scenario is one fault injected into the
training job that runs on the session's local cluster; the runner (``runner.py``)
carries it out and ``invariants.py`` judges it.

A scenario file (YAML) is a list of scenarios, or ``{scenarios: [...]}``::

    scenarios:
      - name: kill-two-nodes          # [a-z0-9-], unique
        description: lose m nodes at once
        at_step: 6                    # inject once the job trained this many steps since
                                      # its last (re)start (default 6)
        fault: {kind: kill_node, nodes: m}
        expect: resume                # resume | unrecoverable (default: resume)
        ci: true                      # part of the CI-sized subset (default false)
        overlap:                      # optional: a second fault DURING the recovery
          during: rebuild             # rebuild | restore | degraded_read | commit
          kind: kill_node             # kill_node | kill_daemon | kill_trainer | partition
          node: 2                     # (partition: also seconds, default 3)

An overlap needs a crash fault first (kill_trainer, kill_daemon, kill_node,
mid_snapshot, hang_trainer: the ones whose recovery restarts the job); ``rebuild`` and
``degraded_read`` need one that loses a machine (kill_node, mid_snapshot), whose
replacement rebuilds. ``degraded_read``: the job restores while the replacement is
still rebuilding, so its rank's state is decoded from the group.

Node references are ``n<i>`` ids of the local cluster or their index ``i``; a count of
nodes may be an integer, ``m`` or ``m+1`` (the cluster's parity count, resolved when
the cluster is known, by ``resolve_nodes``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

# kind -> {parameter: (type check, default or REQUIRED, help)}
REQUIRED = object()
_NODE = "node (n<i> or index)"
_COUNT = "nodes: a list of node refs, a count, 'm' or 'm+1'"


def _is_node(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or \
        (isinstance(x, str) and re.fullmatch(r"n\d+", x) is not None)


def _is_nodes(x) -> bool:
    if isinstance(x, list):
        return bool(x) and all(_is_node(v) for v in x) and len(set(map(str, x))) == len(x)
    return (isinstance(x, int) and not isinstance(x, bool) and x >= 1) or x in ("m", "m+1")


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _one_of(*vals):
    f = lambda x: x in vals  # noqa: E731
    f.__doc__ = "one of " + ", ".join(map(str, vals))
    return f


FAULTS: dict[str, dict] = {
    "kill_trainer": {"node": (_is_node, 1, _NODE)},
    "kill_daemon": {"node": (_is_node, 1, _NODE)},
    "kill_node": {"nodes": (_is_nodes, 1, _COUNT)},
    "mid_snapshot": {"node": (_is_node, 1, _NODE),
                     "phase": (_one_of("before_exchange", "during_exchange", "after_exchange"),
                               REQUIRED, "before_exchange, during_exchange or after_exchange")},
    "hang_daemon": {"node": (_is_node, 1, _NODE), "seconds": (_pos, 4.0, "a positive number")},
    "hang_trainer": {"node": (_is_node, 1, _NODE)},
    "slow_peer": {"node": (_is_node, 1, _NODE), "seconds": (_pos, 5.0, "a positive number"),
                  "stop_ms": (_pos, 300, "a positive number"), "run_ms": (_pos, 200, "a positive number")},
    # A daemon's peer serving thread stalled (sleep: that thread alone; gil: holding the
    # GIL, the whole daemon) at the next version's first contribution (stall.py).
    "stall_server": {"node": (_is_node, 1, _NODE), "seconds": (_pos, 5.0, "a positive number"),
                     "mode": (_one_of("sleep", "gil"), "sleep", "sleep or gil")},
    "partition": {"nodes": (_is_nodes, 1, _COUNT), "seconds": (_pos, 5.0, "a positive number")},
    # then: what reads the corrupt block. restore (the default for data): the job's next
    # restore; rebuild (the default for parity): another node is lost and rebuilt from
    # the group; scrub: nothing reads it, the daemons' background scrubber must find it.
    "corrupt": {"node": (_is_node, 1, _NODE),
                "block": (_one_of("data", "parity"), REQUIRED, "data or parity"),
                "then": (_one_of("restore", "rebuild", "scrub"), None, "restore, rebuild or scrub")},
    "garbage": {"plane": (_one_of("grpc", "zmq"), REQUIRED, "grpc or zmq"),
                "node": (_is_node, 0, _NODE)},
    "memory_pressure": {"node": (_is_node, 0, _NODE)},
    # A pipeline-parallel job (one stage per node, CheckFree+ on) on a cluster with
    # ``parity`` parity blocks, losing ``nodes`` (more than parity): the CheckFree rung.
    "pipeline_loss": {"nodes": (_is_nodes, [1, 3], _COUNT),
                      "parity": (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
                                 1, "an integer >= 0")},
}
EXPECT = ("resume", "unrecoverable", "checkfree")
CRASH_KINDS = ("kill_trainer", "kill_daemon", "kill_node", "mid_snapshot", "hang_trainer")
WIPING_KINDS = ("kill_node", "mid_snapshot")
OVERLAP_DURING = ("rebuild", "restore", "degraded_read", "commit")
OVERLAP_KINDS = ("kill_node", "kill_daemon", "kill_trainer", "partition")
# The soak's overlaps: the four the issue names, one per recovery phase.
SOAK_OVERLAPS = {"rebuild": "kill_node", "restore": "kill_daemon", "degraded_read": "kill_trainer",
                 "commit": "partition"}
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the scenario and field."""


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    params: dict = field(default_factory=dict, hash=False, compare=True)
    at_step: int = 6
    expect: str = "resume"
    ci: bool = False
    description: str = ""
    overlap: dict | None = field(default=None, hash=False, compare=True)

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description, "at_step": self.at_step,
             "fault": {"kind": self.kind, **self.params}, "expect": self.expect, "ci": self.ci}
        if self.overlap:
            d["overlap"] = dict(self.overlap)
        return d


def parse_overlap(doc, kind: str, expect: str, where: str) -> dict:
    """The ``overlap`` field: a second fault injected during the first one's recovery."""
    if not isinstance(doc, dict):
        raise ScenarioError(f"{where}: 'overlap' must be a mapping (during, kind, node)")
    extra = set(doc) - {"during", "kind", "node", "seconds"}
    if extra:
        raise ScenarioError(f"{where}: overlap takes during, kind, node, seconds; unknown: "
                            f"{', '.join(sorted(extra))}")
    during, okind = doc.get("during"), doc.get("kind")
    if during not in OVERLAP_DURING:
        raise ScenarioError(f"{where}: overlap.during must be one of {', '.join(OVERLAP_DURING)} "
                            f"(got {during!r})")
    if okind not in OVERLAP_KINDS:
        raise ScenarioError(f"{where}: overlap.kind must be one of {', '.join(OVERLAP_KINDS)} "
                            f"(got {okind!r})")
    if kind not in CRASH_KINDS or expect != "resume":
        raise ScenarioError(f"{where}: an overlap needs a crash fault the job resumes from "
                            f"({', '.join(CRASH_KINDS)}; expect: resume), not {kind}")
    if during in ("rebuild", "degraded_read") and kind not in WIPING_KINDS:
        raise ScenarioError(f"{where}: overlap during {during} needs a fault that loses a machine "
                            f"({', '.join(WIPING_KINDS)}); {kind} rebuilds nothing")
    node = doc.get("node", 0)
    if not _is_node(node):
        raise ScenarioError(f"{where}: overlap.node must be a {_NODE} (got {node!r})")
    seconds = doc.get("seconds", 3.0)
    if not _pos(seconds):
        raise ScenarioError(f"{where}: overlap.seconds must be a positive number (got {seconds!r})")
    out = {"during": during, "kind": okind, "node": node}
    if okind == "partition":
        out["seconds"] = seconds
    return out


def parse_scenario(doc, where: str = "scenario") -> Scenario:
    """One scenario from its dict form; ``ScenarioError`` names what is wrong."""
    if not isinstance(doc, dict):
        raise ScenarioError(f"{where}: expected a mapping, got {type(doc).__name__}")
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ScenarioError(f"{where}: 'name' must be 1-64 characters of [a-z0-9-] (got {name!r})")
    where = f"scenario {name!r}"
    unknown = set(doc) - {"name", "description", "at_step", "fault", "expect", "ci", "overlap"}
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    fault = doc.get("fault")
    if not isinstance(fault, dict) or "kind" not in fault:
        raise ScenarioError(f"{where}: 'fault' must be a mapping with a 'kind' "
                            f"(one of {', '.join(sorted(FAULTS))})")
    kind = fault["kind"]
    if kind not in FAULTS:
        raise ScenarioError(f"{where}: unknown fault kind {kind!r}; known: {', '.join(sorted(FAULTS))}")
    spec = FAULTS[kind]
    extra = set(fault) - {"kind"} - set(spec)
    if extra:
        raise ScenarioError(f"{where}: fault {kind} takes {', '.join(sorted(spec)) or 'no parameters'}; "
                            f"unknown: {', '.join(sorted(extra))}")
    params = {}
    for key, (ok, default, what) in spec.items():
        if key not in fault:
            if default is REQUIRED:
                raise ScenarioError(f"{where}: fault {kind} needs '{key}' ({what})")
            params[key] = default
            continue
        if not ok(fault[key]):
            raise ScenarioError(f"{where}: fault.{key} must be {what} (got {fault[key]!r})")
        params[key] = fault[key]
    if kind == "corrupt" and params["then"] is None:
        params["then"] = "restore" if params["block"] == "data" else "rebuild"
    at = doc.get("at_step", 6)
    if not isinstance(at, int) or isinstance(at, bool) or at < 2:
        raise ScenarioError(f"{where}: 'at_step' must be an integer >= 2 (got {at!r})")
    expect = doc.get("expect", "resume")
    if expect not in EXPECT:
        raise ScenarioError(f"{where}: 'expect' must be one of {', '.join(EXPECT)} (got {expect!r})")
    ci = doc.get("ci", False)
    if not isinstance(ci, bool):
        raise ScenarioError(f"{where}: 'ci' must be true or false (got {ci!r})")
    desc = doc.get("description", "")
    if not isinstance(desc, str):
        raise ScenarioError(f"{where}: 'description' must be a string")
    overlap = parse_overlap(doc["overlap"], kind, expect, where) if "overlap" in doc else None
    return Scenario(name, kind, params, at, expect, ci, desc, overlap)


def parse_scenarios(doc, source: str = "scenario file") -> list[Scenario]:
    if isinstance(doc, dict) and set(doc) == {"scenarios"}:
        doc = doc["scenarios"]
    if not isinstance(doc, list) or not doc:
        raise ScenarioError(f"{source}: expected a non-empty list of scenarios "
                            "(or a mapping with one key, 'scenarios')")
    out = [parse_scenario(d, f"{source}: scenario #{i + 1}") for i, d in enumerate(doc)]
    seen = set()
    for s in out:
        if s.name in seen:
            raise ScenarioError(f"{source}: scenario name {s.name!r} appears twice")
        seen.add(s.name)
    return out


def load_scenarios(path: str) -> list[Scenario]:
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    return parse_scenarios(doc, path)


def builtin_scenarios() -> list[Scenario]:
    """The built-in matrix, from ``builtin.yaml`` next to this module."""
    import os

    return load_scenarios(os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin.yaml"))


def resolve_node(ref, nodes: int) -> str:
    i = ref if isinstance(ref, int) else int(str(ref)[1:])
    if not 0 <= i < nodes:
        raise ScenarioError(f"node {ref!r} is not in this cluster of {nodes} nodes (n0..n{nodes - 1})")
    return f"n{i}"


def resolve_nodes(ref, nodes: int, parity: int, first: int = 1) -> list[str]:
    """Node ids for a ``nodes`` parameter: a list of refs, or a count (``m``, ``m+1``, int)
    of consecutive nodes starting at n<first> (wrapping)."""
    if isinstance(ref, list):
        return [resolve_node(r, nodes) for r in ref]
    count = parity if ref == "m" else parity + 1 if ref == "m+1" else int(ref)
    if not 1 <= count <= nodes:
        raise ScenarioError(f"{ref!r} = {count} nodes, but the cluster has {nodes}")
    return [f"n{(first + i) % nodes}" for i in range(count)]


# -- soak ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakEvent:
    t_s: float  # when to inject, seconds after the soak started
    scenario: Scenario


def soak_overlap(rng: random.Random, base: Scenario, nodes: int) -> dict | None:
    """An overlap for a soak event (``--overlap P``), or None where the fault has no
    recovery to overlap. A fault that loses more than one machine gets no second loss
    during its rebuild (m + 1 would be unrecoverable by design)."""
    if base.kind not in CRASH_KINDS or base.expect != "resume":
        return None
    n = base.params.get("nodes")
    many = base.kind == "kill_node" and not (n == 1 or (isinstance(n, list) and len(n) == 1))
    phases = [d for d in OVERLAP_DURING
              if base.kind in WIPING_KINDS or d not in ("rebuild", "degraded_read")]
    if many:
        phases = [d for d in phases if d in ("restore", "commit")]
    during = phases[rng.randrange(len(phases))]
    out = {"during": during, "kind": SOAK_OVERLAPS[during], "node": rng.randrange(nodes)}
    if out["kind"] == "partition":
        out["seconds"] = 3.0
    return out


def soak_schedule(seed: int, duration_s: float, mtbf_s: float, pool: list[Scenario],
                  nodes: int, steps: int, overlap_p: float = 0.0) -> list[SoakEvent]:
    """Fault times (exponential gaps with mean ``mtbf_s``) and, for each, a scenario from
    ``pool`` with a random target node and fault step; with probability ``overlap_p`` a
    crash fault also gets a second fault during its recovery (``soak_overlap``). Same
    arguments, same schedule (the overlaps are drawn from a stream of their own, so the
    faults and their times do not depend on ``overlap_p``)."""
    if duration_s <= 0 or mtbf_s <= 0:
        raise ValueError("duration and mtbf must be positive")
    if not 0.0 <= overlap_p <= 1.0:
        raise ValueError(f"the overlap probability must be in [0, 1] (got {overlap_p})")
    orng = random.Random(f"overlap-{seed}")
    if not pool:
        raise ValueError("empty scenario pool")
    if steps < 6:
        raise ValueError("soak jobs need at least 6 steps")
    rng = random.Random(seed)
    out, t, i = [], 0.0, 0
    while True:
        t += rng.expovariate(1.0 / mtbf_s)
        if t >= duration_s:
            return out
        base = pool[rng.randrange(len(pool))]
        params = dict(base.params)
        if "node" in params:
            params["node"] = rng.randrange(nodes)
        at = rng.randrange(3, steps - 2)
        i += 1
        ov = base.overlap
        if ov is None and overlap_p > 0 and orng.random() < overlap_p:
            ov = soak_overlap(orng, base, nodes)
        name = f"soak-{i:04d}-{base.name}{'+overlap' if ov and not base.overlap else ''}"
        out.append(SoakEvent(round(t, 3), Scenario(name[:64], base.kind, params, at, base.expect,
                                                   False, base.description, ov)))
