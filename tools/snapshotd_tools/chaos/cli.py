"""``snapshotd chaos``: the command line of the failure-injection harness."""

from __future__ import annotations

import os
import re
import sys
import time

DEFAULT_WORKDIR = os.path.join(f"/tmp/snapshotd-{os.getuid()}", "chaos")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chaos", help="inject real faults into a local cluster + training job and check invariants",
        description="Injects fault scenarios (built in, or --scenario FILE), one after another, into "
                    "one local cluster running one data-parallel training job, and checks after each "
                    "that nothing committed was lost or restored wrong. Exit status 1 when any "
                    "invariant fails.")
    p.add_argument("--scenario", action="append", default=[], metavar="FILE",
                   help="YAML scenario file (repeatable; default: the built-in matrix)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated scenario names to run (of the selected set)")
    p.add_argument("--ci", action="store_true", help="only the CI-sized subset (scenarios marked ci: true)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--soak", action="store_true",
                   help="random faults from the matrix for --duration, one every --mtbf s on average")
    p.add_argument("--duration", default="10m", help="soak length, e.g. 30m, 90s (default 10m)")
    p.add_argument("--mtbf", type=float, default=20.0, help="soak: mean seconds between faults (default 20)")
    p.add_argument("--seed", type=int, default=1, help="soak: the seed of the fault schedule (default 1)")
    p.add_argument("--overlap", type=float, default=0.0, metavar="P",
                   help="soak: probability that a crash fault gets a second fault during its recovery "
                        "(a rebuild, a restore, a degraded read or a commit; default 0)")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="soak: draw the fault kinds and their relative rates from a failure profile "
                        "(llama3, rsc: process restarts, lost nodes, lost failure domains, slow nodes), "
                        "time-compressed to --mtbf, instead of uniformly from the matrix")
    p.add_argument("--domain-size", type=int, default=2, metavar="K",
                   help="--profile: nodes per failure domain of the local cluster (consecutive nodes; "
                        "default 2). A domain of more than --parity nodes must be refused (m+1)")
    p.add_argument("--commit-bound", type=float, default=None, metavar="S",
                   help="after a fault clears, a new version must commit within S seconds "
                        "(the commit_after_fault invariant; default 30)")
    p.add_argument("--max-lost-steps", type=int, default=None, metavar="N",
                   help="the most steps a restore may lose (lost_steps; default 3: the versions "
                        "a rank can have in flight + 1)")
    p.add_argument("--nodes", type=int, default=4, help="cluster nodes = data-parallel ranks (default 4)")
    p.add_argument("--parity", type=int, default=2, help="parity blocks per stripe, m (default 2)")
    p.add_argument("--steps", type=int, default=80,
                   help="training steps per epoch of the job; it starts over after each (default 80)")
    p.add_argument("--step-delay", type=float, default=None, metavar="S",
                   help="pause after each training step, pacing the job (default 0.05; soak 0.2)")
    p.add_argument("--block-size", default="16KiB", help="erasure block size (default 16KiB)")
    p.add_argument("--budget", default="256MiB", help="memory budget per daemon (default 256MiB)")
    p.add_argument("--partition", choices=("auto", "netns", "sigstop"), default="auto",
                   help="how to partition: network namespaces (needs root and ip), SIGSTOP "
                        "(weaker fallback), auto = netns when possible (default auto)")
    p.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    p.add_argument("--dir", default=DEFAULT_WORKDIR,
                   help=f"work directory: reference cache, logs of failed scenarios (default {DEFAULT_WORKDIR})")
    p.add_argument("--keep", action="store_true", help="keep the logs of scenarios that passed too")


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise ValueError(f"bad duration {text!r}: use e.g. 90s, 30m, 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(a) -> int:
    from snapshotd_tools.chaos import scenarios as sc
    from snapshotd_tools.chaos.report import format_table, write_json
    from snapshotd_tools.chaos.runner import Harness, meta

    try:
        chosen = [x for f in a.scenario for x in sc.load_scenarios(f)] if a.scenario else sc.builtin_scenarios()
        if a.ci:
            chosen = [x for x in chosen if x.ci]
        if a.only:
            names = [x.strip() for x in a.only.split(",") if x.strip()]
            known = {x.name for x in chosen}
            missing = [x for x in names if x not in known]
            if missing:
                raise sc.ScenarioError(f"--only: no scenario named {', '.join(missing)} "
                                       f"(known: {', '.join(sorted(known))})")
            chosen = [x for x in chosen if x.name in names]
        for x in chosen:  # node references and steps must fit this cluster and job
            if x.at_step > a.steps - 3:
                raise sc.ScenarioError(f"scenario {x.name!r}: at_step {x.at_step} needs --steps >= "
                                       f"{x.at_step + 3} (got {a.steps})")
            if x.kind == "pipeline_loss" and x.params["parity"] >= a.nodes:
                raise sc.ScenarioError(f"scenario {x.name!r}: parity {x.params['parity']} needs more "
                                       f"than {a.nodes} nodes")
            for key in ("node", "nodes"):
                if key in x.params:
                    (sc.resolve_nodes if key == "nodes" else sc.resolve_node)(
                        *((x.params[key], a.nodes, a.parity) if key == "nodes" else (x.params[key], a.nodes)))
        if a.profile is not None:
            _check_profile(a)
        duration = parse_duration(a.duration)
        if a.mtbf <= 0:
            raise ValueError("--mtbf must be positive")
        if not 0.0 <= a.overlap <= 1.0:
            raise ValueError(f"--overlap must be a probability in [0, 1] (got {a.overlap:g})")
    except (sc.ScenarioError, ValueError) as exc:
        print(f"snapshotd chaos: {exc}", file=sys.stderr)
        return 2
    if not chosen:
        print("snapshotd chaos: no scenario selected", file=sys.stderr)
        return 2
    if a.list:
        for x in chosen:
            ov = f" [overlap: {x.overlap['kind']} during {x.overlap['during']}]" if x.overlap else ""
            print(f"{x.name:36} {x.kind:16} {'ci ' if x.ci else '   '}{x.description}{ov}")
        return 0
    try:
        delay = a.step_delay if a.step_delay is not None else (0.2 if a.soak else 0.05)
        kw = {k: v for k, v in (("commit_bound_s", a.commit_bound), ("max_lost_steps", a.max_lost_steps))
              if v is not None}
        h = Harness(a.dir, a.nodes, a.parity, a.steps, a.block_size, a.budget, say=_say, keep=a.keep,
                    step_delay_s=delay, **kw)
    except ValueError as exc:
        print(f"snapshotd chaos: {exc}", file=sys.stderr)
        return 2
    if any(x.kind == "partition" for x in chosen) or a.soak:
        h.partition_mode = _partition_mode(a.partition)
    import signal

    def on_term(signum, frame):  # stop like Ctrl-C: every scenario tears its cluster down
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    try:
        h.reference()
        if a.soak:
            results, about = _soak(h, chosen, duration, a.mtbf, a.seed, a.report, a.overlap,
                                   a.profile, a.domain_size)
        else:
            results, about = h.run(chosen), {}
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as exc:  # the session itself could not run (a cluster that would not boot, ...)
        print(f"snapshotd chaos: the harness failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    info = meta(h)
    info.update({"seconds": round(time.monotonic() - t0, 1), "soak": a.soak,
                 "overlap_p": a.overlap if a.soak else None,
                 "seed": a.seed if a.soak else None, "mtbf_s": a.mtbf if a.soak else None,
                 "duration_s": duration if a.soak else None})
    info.update(about)
    if a.soak:  # the fault rate reached, against the one asked for
        ran = [r for r in results if r.params.get("kind") not in ("teardown", "between")]
        late = [r.params.get("late_s", 0.0) for r in ran]
        info.update({"faults_run": len(ran), "overlaps_run": sum(bool(r.overlap) for r in ran),
                     "achieved_s_between_faults": round(duration / len(ran), 1) if ran else None,
                     "late_s_mean": round(sum(late) / len(late), 1) if late else None,
                     "late_s_max": max(late) if late else None})
        _say(f"soak: {len(ran)} faults in {duration:.0f} s, one every {info['achieved_s_between_faults']} s "
             f"(asked: {a.mtbf:g}); each ran {info['late_s_mean']} s late on average (max {info['late_s_max']})")
    print()
    print(format_table(results))
    if a.report:
        write_json(a.report, results, info)
        print(f"report: {a.report}")
    return 0 if all(r.ok for r in results) else 1


def _check_profile(a) -> None:
    from snapshotd.core.sim.profiles import PROFILES

    if not a.soak:
        raise ValueError("--profile needs --soak")
    if a.profile not in PROFILES:
        raise ValueError(f"--profile: unknown failure profile {a.profile!r} (built in: {', '.join(PROFILES)})")
    if a.scenario or a.only or a.ci:
        raise ValueError("--profile draws its own faults; it takes no --scenario, --only or --ci")
    if a.domain_size < 1:
        raise ValueError(f"--domain-size must be >= 1 (got {a.domain_size})")


def _partition_mode(choice: str):
    if choice == "sigstop":
        _say("partition: SIGSTOP fallback (asked for)")
        return None
    from snapshotd_tools.chaos import netns

    why = netns.unavailable()
    if why is None:
        _say("partition: daemons in their own network namespaces, links taken down")
        return netns.NetnsPartitioner()
    if choice == "netns":
        raise SystemExit(f"snapshotd chaos: --partition netns: {why}")
    _say(f"partition: WEAKER FALLBACK, SIGSTOP of the cut-off daemons ({why})")
    return None


def _soak(h, pool, duration_s: float, mtbf_s: float, seed: int, report: str | None,
          overlap_p: float = 0.0, profile: str | None = None, domain_size: int = 2):
    """The soak: (its results, what the report's meta says of its failure profile)."""
    from snapshotd_tools.chaos.report import write_json
    from snapshotd_tools.chaos.runner import meta
    from snapshotd_tools.chaos.scenarios import soak_schedule

    about = _ProfileInfo(profile, seed, duration_s, mtbf_s, h, overlap_p, domain_size) if profile else None
    events = about.events if about else soak_schedule(seed, duration_s, mtbf_s, pool, h.n, h.steps, overlap_p)
    _say(f"soak: {len(events)} faults scheduled in {duration_s:.0f} s (seed {seed}, mtbf {mtbf_s} s), "
         f"{sum(bool(e.scenario.overlap) for e in events)} with an overlapping second fault, "
         "into one running job")

    def partial(results):  # a report after every fault, so a long soak can be read while it runs
        if report:
            write_json(report, results, dict(meta(h), soak=True, seed=seed, overlap_p=overlap_p, partial=True,
                                             **(about.meta(results) if about else {})))

    results = h.soak(events, duration_s, on_result=partial)
    if not about:
        return results, {}
    info = about.meta(results)
    _say(f"soak: profile {profile}, faults per kind (run / drawn; share drawn vs profile): " + "; ".join(
        f"{k} {v['run']}/{v['drawn']} ({v['drawn_share'] or 0:.1%} vs {v['share']:.1%})"
        for k, v in info["kinds"].items()))
    return results, info


class _ProfileInfo:
    """A trace-driven soak's schedule (``profile.profile_schedule``) and its report lines."""

    def __init__(self, name: str, seed: int, duration_s: float, mtbf_s: float, h, overlap_p: float,
                 domain_size: int):
        from snapshotd.core.sim import profiles as fp
        from snapshotd_tools.chaos import profile as pr

        self.name, self.pr, self.domain_size, self.n = name, pr, domain_size, h.n
        self.prof = fp.profile(name)
        self.kinds = fp.fault_kinds(self.prof)
        self.events = pr.profile_schedule(seed, duration_s, mtbf_s, self.kinds, h.n, h.m, h.steps, overlap_p,
                                          domain_size, tag=name)
        self.x = pr.compression(self.prof, None, mtbf_s)
        _say(f"soak: profile {name} ({self.prof.notes}): job MTBF "
             f"{self.prof.job_mtbf_s(self.prof.ref_gpus) / 3600:.2f} h compressed to {mtbf_s:g} s "
             f"(x{self.x:.0f}); kinds " + ", ".join(f"{k} {w:.1%}" for k, w in self.kinds)
             + f"; failure domains {pr.domains(h.n, domain_size)}")

    def meta(self, results) -> dict:
        ran = {r.scenario for r in results}
        return {"profile": self.name, "profile_notes": self.prof.notes,
                "profile_job_mtbf_h": round(self.prof.job_mtbf_s(self.prof.ref_gpus) / 3600, 2),
                "time_compression": round(self.x, 1), "domain_size": self.domain_size,
                "domains": self.pr.domains(self.n, self.domain_size),
                "kinds": self.pr.kind_summary(self.events, ran, self.kinds)}
