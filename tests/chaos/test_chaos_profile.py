"""The trace-driven soak's schedule (``snapshotd chaos --soak --profile NAME``): pure, seeded.

Its fault kinds must come at the failure profile's shares (within a binomial tolerance),
a domain fault must take exactly one failure domain (refused as m+1 when the domain is
larger than m), a correlated overlap must hit the first fault's domain, and the CLI must
refuse a profile it does not know, clearly.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO
from snapshotd.core.sim.profiles import fault_kinds, llama3, rsc
from snapshotd_tools.chaos.profile import compression, domains, kind_summary, profile_schedule


@pytest.mark.parametrize("make", [llama3, rsc])
def test_kind_frequencies_match_the_profile_within_binomial_tolerance(make):
    kinds = fault_kinds(make())
    events = profile_schedule(3, 20000.0, 1.0, kinds, 4, 2, 80, tag=make().name)
    n = len(events)
    assert 19000 < n < 21000  # a Poisson process with mean gap 1 s over 20000 s
    got = Counter(e.fault for e in events)
    for kind, p in kinds:
        sd = math.sqrt(n * p * (1 - p))
        assert abs(got[kind] - n * p) <= 4.5 * sd, (kind, got[kind], n * p, sd)
    summary = kind_summary(events, set(), kinds)
    assert {k: v["drawn"] for k, v in summary.items()} == {k: got[k] for k, _ in kinds}
    assert all(v["run"] == 0 for v in summary.values())


def test_each_kind_maps_to_its_fault_and_a_domain_fault_takes_one_domain():
    kinds = fault_kinds(llama3())
    events = profile_schedule(7, 4000.0, 1.0, kinds, 6, 2, 80, domain_size=2)
    doms = domains(6, 2)
    assert doms == [["n0", "n1"], ["n2", "n3"], ["n4", "n5"]]
    seen = set()
    for e in events:
        sc = e.scenario
        seen.add(e.fault)
        assert 3 <= sc.at_step < 78 and sc.name.startswith("soak-")
        if e.fault == "kill_trainer":
            assert sc.kind == "kill_trainer" and sc.expect == "resume"
        elif e.fault == "kill_node":
            assert sc.kind == "kill_node" and len(sc.params["nodes"]) == 1 and sc.expect == "resume"
        elif e.fault == "kill_domain":  # correlated: the whole rack at once, m = 2 survives it
            assert sc.kind == "kill_node" and sc.params["nodes"] == doms[e.domain] and sc.expect == "resume"
        else:
            assert e.fault == "slow_node" and sc.kind == "slow_peer" and sc.params["seconds"] > 0
    assert seen == {k for k, _ in kinds}
    # A domain larger than m: every domain fault expects the clear m+1 refusal.
    big = profile_schedule(7, 4000.0, 1.0, kinds, 6, 2, 80, domain_size=3)
    dom = [e for e in big if e.fault == "kill_domain"]
    assert dom and all(len(e.scenario.params["nodes"]) == 3 and e.scenario.expect == "unrecoverable"
                       and e.scenario.overlap is None for e in dom)


def test_overlaps_are_correlated_and_do_not_move_the_faults():
    kinds = fault_kinds(llama3())
    plain = profile_schedule(11, 3000.0, 2.0, kinds, 4, 2, 80)
    over = profile_schedule(11, 3000.0, 2.0, kinds, 4, 2, 80, overlap_p=0.5)
    assert [(e.t_s, e.fault, e.scenario.params) for e in plain] == \
        [(e.t_s, e.fault, e.scenario.params) for e in over]
    assert over == profile_schedule(11, 3000.0, 2.0, kinds, 4, 2, 80, overlap_p=0.5)  # seeded
    assert over != profile_schedule(12, 3000.0, 2.0, kinds, 4, 2, 80, overlap_p=0.5)
    with_ov = [e for e in over if e.scenario.overlap]
    assert 0.25 * len(over) < len(with_ov) < 0.55 * len(over)  # P = 0.5 of the crash faults
    doms = domains(4, 2)
    for e in with_ov:
        sc = e.scenario
        assert sc.kind in ("kill_trainer", "kill_node") and sc.name.endswith("+overlap")
        hit = sc.params.get("nodes") or [sc.params["node"]]
        if len(hit) < len(doms[e.domain]):  # the rack's other node: a second fault behind its switch
            assert sc.overlap["node"] in doms[e.domain] and sc.overlap["node"] not in hit, e
        else:  # the whole rack went: the second fault hits a node it spared
            assert sc.overlap["node"] not in hit and sc.overlap["during"] in ("restore", "commit"), e


def test_time_compression_and_bad_arguments():
    p = llama3()
    assert compression(p, None, 20.0) == pytest.approx(54 * 86400 / 419 / 20.0)
    with pytest.raises(ValueError, match="kinds"):
        profile_schedule(1, 60, 8, [("kill_rack", 1.0)], 4, 2, 80)
    with pytest.raises(ValueError, match="parity"):
        profile_schedule(1, 60, 8, fault_kinds(p), 4, 4, 80)
    with pytest.raises(ValueError, match="overlap"):
        profile_schedule(1, 60, 8, fault_kinds(p), 4, 2, 80, overlap_p=1.5)


@pytest.mark.parametrize("args,msg", [
    (["--soak", "--profile", "bogus"], "unknown failure profile 'bogus'"),
    (["--profile", "llama3"], "--profile needs --soak"),
    (["--soak", "--profile", "llama3", "--only", "kill-node"], "takes no --scenario"),
    (["--soak", "--profile", "llama3", "--domain-size", "0"], "--domain-size must be >= 1"),
])
def test_cli_refuses_bad_profile_arguments_clearly(args, msg, tmp_path):
    p = subprocess.run([sys.executable, "-m", "snapshotd_tools.cli", "chaos", "--dir", str(tmp_path), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
