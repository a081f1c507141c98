"""The pure parts of ``snapshotd chaos``: scenario files, the soak schedule, the
invariant judgement and the report. (The harness against real processes:
tests/test_chaos_cluster.py.)"""

from __future__ import annotations

import json

import pytest

from snapshotd_tools.chaos import scenarios as sc
from snapshotd_tools.chaos.cli import parse_duration
from snapshotd_tools.chaos.invariants import MEM_TOLERANCE_ABS, Observation, check
from snapshotd_tools.chaos.report import Result, format_table, to_json


# -- scenario files --------------------------------------------------------------------
def test_builtin_matrix_is_valid_and_covers_every_fault_kind():
    got = sc.builtin_scenarios()
    assert {s.kind for s in got} == set(sc.FAULTS)
    assert len({s.name for s in got}) == len(got)
    assert any(s.ci for s in got) and not all(s.ci for s in got)
    assert [s for s in got if s.expect == "unrecoverable"][0].params["nodes"] == "m+1"
    phases = {s.params["phase"] for s in got if s.kind == "mid_snapshot"}
    assert phases == {"before_exchange", "during_exchange", "after_exchange"}


def test_parse_fills_defaults_and_round_trips():
    s = sc.parse_scenario({"name": "h", "fault": {"kind": "hang_daemon", "node": "n3"}})
    assert s.params == {"node": "n3", "seconds": 4.0} and s.at_step == 6 and s.expect == "resume"
    assert sc.parse_scenario(s.to_dict()) == s


@pytest.mark.parametrize("doc, needle", [
    ({"fault": {"kind": "kill_node"}}, "'name'"),
    ({"name": "Bad Name", "fault": {"kind": "kill_node"}}, "'name'"),
    ({"name": "x"}, "'fault' must be a mapping"),
    ({"name": "x", "fault": {"kind": "explode"}}, "unknown fault kind 'explode'"),
    ({"name": "x", "fault": {"kind": "corrupt", "node": 1}}, "needs 'block'"),
    ({"name": "x", "fault": {"kind": "corrupt", "node": 1, "block": "meta"}}, "fault.block must be data or parity"),
    ({"name": "x", "fault": {"kind": "kill_node", "nodes": "m+2"}}, "fault.nodes must be"),
    ({"name": "x", "fault": {"kind": "kill_node", "nodes": ["n1", "n1"]}}, "fault.nodes must be"),
    ({"name": "x", "fault": {"kind": "hang_daemon", "seconds": -1}}, "fault.seconds must be a positive number"),
    ({"name": "x", "fault": {"kind": "kill_trainer", "colour": 1}}, "unknown: colour"),
    ({"name": "x", "fault": {"kind": "kill_trainer"}, "at_step": 1}, "'at_step' must be an integer >= 2"),
    ({"name": "x", "fault": {"kind": "kill_trainer"}, "expect": "maybe"}, "'expect' must be one of"),
    ({"name": "x", "fault": {"kind": "kill_trainer"}, "when": 3}, "unknown field(s) when"),
])
def test_bad_scenarios_get_clear_errors(doc, needle):
    with pytest.raises(sc.ScenarioError) as e:
        sc.parse_scenario(doc)
    assert needle in str(e.value)


def test_scenario_file_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("scenarios:\n  - name: a\n    fault: {kind: kill_trainer}\n  - name: a\n    fault: {kind: kill_daemon}\n")
    with pytest.raises(sc.ScenarioError, match="'a' appears twice"):
        sc.load_scenarios(str(p))
    p.write_text("scenarios: [\n")
    with pytest.raises(sc.ScenarioError, match="not valid YAML"):
        sc.load_scenarios(str(p))
    p.write_text("[]\n")
    with pytest.raises(sc.ScenarioError, match="non-empty list"):
        sc.load_scenarios(str(p))
    with pytest.raises(sc.ScenarioError, match="cannot read"):
        sc.load_scenarios(str(tmp_path / "missing.yaml"))
    p.write_text("- name: ok\n  fault: {kind: garbage, plane: zmq}\n")
    assert sc.load_scenarios(str(p))[0].params == {"plane": "zmq", "node": 0}


def test_resolve_nodes():
    assert sc.resolve_nodes("m", 4, 2) == ["n1", "n2"]
    assert sc.resolve_nodes("m+1", 4, 2) == ["n1", "n2", "n3"]
    assert sc.resolve_nodes("m+1", 4, 2, first=3) == ["n3", "n0", "n1"]
    assert sc.resolve_nodes(["n0", 2], 4, 2) == ["n0", "n2"]
    with pytest.raises(sc.ScenarioError, match="not in this cluster of 4"):
        sc.resolve_node("n4", 4)
    with pytest.raises(sc.ScenarioError, match="5 nodes, but the cluster has 4"):
        sc.resolve_nodes(5, 4, 2)


# -- soak schedule ---------------------------------------------------------------------
def test_soak_schedule_is_reproducible_from_the_seed():
    pool = sc.builtin_scenarios()
    a = sc.soak_schedule(7, 1800, 20, pool, 4, 14)
    b = sc.soak_schedule(7, 1800, 20, pool, 4, 14)
    c = sc.soak_schedule(8, 1800, 20, pool, 4, 14)
    assert a == b and a != c
    assert 50 < len(a) < 140  # ~90 faults at one per 20 s on average
    ts = [e.t_s for e in a]
    assert ts == sorted(ts) and 0 < ts[0] and ts[-1] < 1800
    assert all(3 <= e.scenario.at_step <= 11 for e in a)
    assert all(0 <= e.scenario.params.get("node", 0) < 4 for e in a)
    assert len({e.scenario.name for e in a}) == len(a)
    with pytest.raises(ValueError):
        sc.soak_schedule(1, 0, 20, pool, 4, 14)


def test_parse_duration():
    assert parse_duration("30m") == 1800 and parse_duration("90s") == 90 and parse_duration("2") == 2
    assert parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration("soon")


# -- invariants ------------------------------------------------------------------------
REF = [f"d{s}" for s in range(11)]


def _resumed(**kw) -> Observation:
    o = Observation("resume", 10, REF, fault_step=6, committed_at_fault=5)
    o.digests = [("run", r, s, f"d{s}", False) for r in range(2) for s in range(0, 7)]
    o.digests += [("resumed", r, 5, "d5", True) for r in range(2)]
    o.digests += [("resumed", r, s, f"d{s}", False) for r in range(2) for s in range(6, 11)]
    o.restore_points, o.resumed_to = {0: 5, 1: 5}, {0: 10, 1: 10}
    o.memory = {"n0": (100 << 20, 110 << 20)}
    o.session_memory = {"n0": (95 << 20, 110 << 20)}
    o.commit_expected, o.commit_after_s = True, 1.5
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def _verdict(o) -> dict:
    return {c.name: (c.ok, c.detail) for c in check(o)}


def test_a_clean_resume_holds_every_invariant():
    v = _verdict(_resumed())
    assert all(ok for ok, _ in v.values()), v
    assert "lost 1 step(s) (bound 3" in v["lost_steps"][1]
    assert set(v) == {"bit_identical", "restorable", "lost_steps", "commit_after_fault", "no_leaks", "memory"}


def test_a_wrong_restored_state_is_caught():
    o = _resumed()
    o.digests[-11] = ("resumed", 1, 5, "CORRUPT", True)
    ok, why = _verdict(o)["bit_identical"]
    assert not ok and "rank 1 restored step 5" in why


def test_restoring_an_older_version_than_committed_is_caught():
    o = _resumed(restore_points={0: 4, 1: 4})
    v = _verdict(o)
    assert not v["restorable"][0] and "told version 5 had committed" in v["restorable"][1]


def test_ranks_restoring_different_steps_and_unfinished_training_are_caught():
    assert not _verdict(_resumed(restore_points={0: 5, 1: 6}))["restorable"][0]
    ok, why = _verdict(_resumed(resumed_to={0: 10, 1: 8}))["lost_steps"]
    assert not ok and "did not reach step 10" in why
    assert not _verdict(_resumed(restore_points={}))["restorable"][0]


def test_no_digests_at_all_is_not_a_pass():
    assert not _verdict(_resumed(digests=[]))["bit_identical"][0]


def test_unrecoverable_must_refuse_and_name_the_version():
    o = Observation("unrecoverable", 10, REF, fault_step=6, committed_at_fault=6,
                    errors=["rank 0: InsufficientShardsError: job 'dp': version 6 of group 0 ..."],
                    digests=[("run", 0, 1, "d1", False)])
    v = _verdict(o)
    assert v["refused"][0] and "version 6" in v["refused"][1]
    assert not _verdict(Observation("unrecoverable", 10, REF, errors=["rank 0: boom"],
                                    digests=o.digests))["refused"][0]
    o.restore_points = {0: 6}
    assert not _verdict(o)["refused"][0]


def test_leaks_and_memory_growth_fail():
    assert not _verdict(_resumed(leaks=["3 segment(s) left"]))["no_leaks"][0]
    grown = {"n0": (100 << 20, int((100 << 20) * 1.25) + MEM_TOLERANCE_ABS + 1)}
    ok, why = _verdict(_resumed(memory=grown))["memory"]
    assert not ok and "n0" in why


# -- report ----------------------------------------------------------------------------
def test_report_table_and_json():
    good = Result("kill-node", "SIGKILL node n1", "heartbeat 1.6s", "rebuilt", 4.2, 1,
                  check(_resumed()), params={"kind": "kill_node"})
    bad = Result("corrupt", "bit flip", checks=check(_resumed(leaks=["x"])), params={"kind": "corrupt"})
    broken = Result("oops", "-", error="TimeoutError: nothing", params={"kind": "kill_trainer"})
    assert good.ok and not bad.ok and not broken.ok
    text = format_table([good, bad, broken])
    assert "1/3 scenarios held every invariant" in text
    assert "corrupt: no_leaks: x" in text and "oops: harness: TimeoutError" in text
    doc = json.loads(json.dumps(to_json([good, bad, broken], {"seed": 1})))
    assert doc["ok"] is False and doc["summary"]["failed"] == ["corrupt", "oops"]
    assert doc["summary"]["by_kind"]["kill_node"] == {"runs": 1, "held": 1}
    assert doc["scenarios"][0]["checks"][0]["name"] == "bit_identical"


def test_cli_rejects_bad_input_before_starting_anything(tmp_path, capsys):
    from snapshotd_tools.cli import main

    assert main(["chaos", "--only", "nope", "--dir", str(tmp_path)]) == 2
    assert "no scenario named nope" in capsys.readouterr().err
    bad = tmp_path / "b.yaml"
    bad.write_text("- name: x\n  fault: {kind: kill_node, nodes: 9}\n")
    assert main(["chaos", "--scenario", str(bad), "--dir", str(tmp_path)]) == 2
    assert "9 nodes, but the cluster has 4" in capsys.readouterr().err
    assert main(["chaos", "--duration", "soon", "--soak", "--dir", str(tmp_path)]) == 2
    assert main(["chaos", "--steps", "8", "--ci", "--dir", str(tmp_path)]) == 2
    assert "needs --steps >= 9" in capsys.readouterr().err
    assert main(["chaos", "--ci", "--list"]) == 0
    assert "kill-m-plus-1-nodes" in capsys.readouterr().out
    assert not list(tmp_path.glob("*reference*"))  # nothing was run


def test_checkfree_rung_invariant():
    def obs(rung, losses=(3.1, 2.9)):
        return Observation("checkfree", 10, [], fault_step=6, committed_at_fault=6,
                           restore_points={r: 6 for r in rung}, resumed_to={r: 10 for r in rung},
                           rung=rung, lost_ranks=[1, 3], losses=list(losses),
                           memory={"n0": (1 << 20, 1 << 20)}, session_memory={"n0": (1 << 20, 1 << 20)})

    exact = {"method": "exact", "approximate": False}
    good = {0: exact, 1: {"method": "CheckFree", "approximate": True}, 2: exact,
            3: {"method": "CheckFree+", "approximate": True}}
    v = _verdict(obs(good))
    assert all(ok for ok, _ in v.values()), v
    assert "bit_identical" not in v and "CheckFree" in v["checkfree"][1]
    silent = {**good, 1: {"method": "exact", "approximate": False}}  # a lost stage "exact"
    assert not _verdict(obs(silent))["checkfree"][0]
    assert not _verdict(obs({**good, 0: {"method": "CheckFree", "approximate": True}}))["checkfree"][0]
    assert not _verdict(obs(good, losses=(3.0, float("nan"))))["checkfree"][0]
    assert not _verdict(obs({}))["checkfree"][0]


# -- the honest invariants (issue 18): each fails on a deliberately broken system -------
def test_memory_not_measured_is_a_failure_where_a_measurement_was_expected():
    # Today's bug: every m+1 scenario recorded no memory and passed.
    ok, why = _verdict(_resumed(memory={}, session_memory={}))["memory"]
    assert not ok and "not measured" in why and "expected" in why
    ok, why = _verdict(_resumed(memory={}, session_memory={}, memory_expected=False))["memory"]
    assert ok and why == "not measured"
    # Measured per fault but with no session baseline: not a pass either.
    assert not _verdict(_resumed(session_memory={}))["memory"][0]


def test_a_slow_leak_passes_every_fault_but_fails_the_session_bound():
    # Each fault grows the daemon by 20 MiB (within +25 % +64 MiB of its level before),
    # but over the session it has grown from 100 MiB to 400 MiB.
    o = _resumed(memory={"n0": (380 << 20, 400 << 20)}, session_memory={"n0": (100 << 20, 400 << 20)})
    ok, why = _verdict(o)["memory"]
    assert not ok and "at the session's start" in why and "before the fault" not in why
    ok, why = _verdict(_resumed())["memory"]
    assert ok and "since the session's start n0 +15.0 MiB" in why


def test_a_corrupt_block_nobody_detected_fails_even_when_the_restore_is_bit_identical():
    o = _resumed(corrupted="bit flipped in n1's data block 0")
    v = _verdict(o)
    assert v["bit_identical"][0]  # the restore happened not to need the block ...
    assert not v["corruption_detected"][0] and "nothing reported it" in v["corruption_detected"][1]
    o.corrupt_found = ["checksum: 1 corrupt data block report(s) on n1, by n1 (scrub)"]
    ok, why = _verdict(o)["corruption_detected"]
    assert ok and "by n1 (scrub)" in why
    assert "corruption_detected" not in _verdict(_resumed())  # only for corrupt faults


def _garbage(plane, answers, alive=True):
    return _resumed(garbage={"plane": plane, "answers": answers, "raw_sent": 3, "alive": alive})


def test_junk_grpc_bodies_must_be_answered_invalid_argument_exactly():
    good = {f"M{i}/junk": "INVALID_ARGUMENT" for i in range(8)}
    ok, why = _verdict(_garbage("grpc", good))["garbage_refused"]
    assert ok and "INVALID_ARGUMENT x8" in why and "still serving" in why
    # The old rule ("anything but OK/INTERNAL/UNKNOWN") let these through:
    for code in ("FAILED_PRECONDITION", "NOT_FOUND", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED"):
        ok, why = _verdict(_garbage("grpc", {**good, "OpenShard/junk": code}))["garbage_refused"]
        assert not ok and code in why and "want INVALID_ARGUMENT" in why
    assert not _verdict(_garbage("grpc", {}))["garbage_refused"][0]  # nothing observed
    ok, why = _verdict(_garbage("grpc", good, alive=False))["garbage_refused"]
    assert not ok and "stopped serving" in why


def test_zmq_garbage_verdict_is_built_from_the_answers_seen():
    answers = {w: "PEER_PROTOCOL" for w in ("no op", "unknown op", "a reply")}
    ok, why = _verdict(_garbage("zmq", answers))["garbage_refused"]
    assert ok and "3 junk request(s) on the zmq plane answered: PEER_PROTOCOL x3" in why
    ok, why = _verdict(_garbage("zmq", {**answers, "a reply": "no answer",
                                         "unknown op": "PEER_UNAVAILABLE"}))["garbage_refused"]
    assert not ok and "PEER_PROTOCOL x1" in why and "PEER_UNAVAILABLE x1" in why and "no answer x1" in why


def test_lost_steps_catches_a_cluster_that_stopped_committing_which_restorable_allows():
    # Commits stalled at v1 while the job trained on to step 20: the restore of v1 is
    # "restorable" (>= what was committed), but 19 steps were lost.
    ref = [f"d{s}" for s in range(31)]
    o = Observation("resume", 22, ref, fault_step=20, committed_at_fault=1, restore_points={0: 1, 1: 1},
                    resumed_to={0: 22, 1: 22}, digests=[("x", 0, 1, "d1", True)],
                    memory={"n0": (1, 1)}, session_memory={"n0": (1, 1)})
    v = _verdict(o)
    assert v["restorable"][0]
    assert not v["lost_steps"][0] and "lost 19 step(s)" in v["lost_steps"][1]
    o.max_lost = 19
    assert _verdict(o)["lost_steps"][0]


def test_the_committed_version_is_the_trainers_record_not_the_daemons_claim():
    # Daemons that lost v5 after the fault report v4 committed and restore v4; the
    # trainers had been told v5 committed before the fault: caught.
    o = _resumed(restore_points={0: 4, 1: 4}, committed_at_fault=5, daemon_committed=4, fault_step=6)
    ok, why = _verdict(o)["restorable"]
    assert not ok and "trainers were told version 5" in why
    # ... and a daemon claim newer than what was restored fails too.
    ok, why = _verdict(_resumed(committed_at_fault=4, daemon_committed=6, fault_step=6,
                                restore_points={0: 5, 1: 5}))["restorable"]
    assert not ok and "daemons reported version 6" in why


def test_the_trainers_record_is_folded_from_their_commit_lines():
    from snapshotd_tools.chaos.rig import Trainers

    g = Trainers.__new__(Trainers)  # the fold only: no processes
    g.world, g.last, g.digests, g.restored, g.restored_ev = 2, {0: 0, 1: 0}, [], {}, {}
    g.commits, g.restoring, g.losses, g.restore_errors, g.ended = [], {}, [], [], {}
    assert g.committed == 0
    g._fold(0, {"event": "restoring", "rank": 0, "time": 10.0})
    g._fold(0, {"event": "commit_seen", "rank": 0, "version": 3, "delivered": 5, "time": 11.0})
    g._fold(1, {"event": "commit_seen", "rank": 1, "version": 4, "delivered": 6, "time": 12.0})
    g._fold(0, {"event": "commit_seen", "rank": 0, "version": 2, "delivered": 4, "time": 13.0})
    assert g.committed == 4 and g.restoring == {0: 10.0} and (12.0, 1, 4) in g.commits


def test_commit_after_fault_needs_a_new_commit_within_the_bound():
    ok, why = _verdict(_resumed(commit_after_s=None))["commit_after_fault"]
    assert not ok and "no newer version was committed within 30 s" in why
    ok, why = _verdict(_resumed(commit_after_s=31.0))["commit_after_fault"]
    assert not ok and "31.0 s" in why
    ok, why = _verdict(_resumed(commit_after_s=45.0, commit_bound_s=60))["commit_after_fault"]
    assert ok and "bound 60 s" in why


# -- overlapping faults ----------------------------------------------------------------
def test_builtin_overlaps_cover_the_four_recovery_phases():
    ov = [s for s in sc.builtin_scenarios() if s.overlap]
    assert {(s.overlap["during"], s.overlap["kind"]) for s in ov} == {
        ("rebuild", "kill_node"), ("restore", "kill_daemon"), ("degraded_read", "kill_trainer"),
        ("commit", "partition")}
    assert all(s.kind in sc.CRASH_KINDS and s.expect == "resume" for s in ov)
    assert sc.parse_scenario(ov[0].to_dict()) == ov[0]


@pytest.mark.parametrize("fault, overlap, needle", [
    ({"kind": "kill_trainer"}, {"during": "rebuild", "kind": "kill_node"}, "rebuilds nothing"),
    ({"kind": "hang_daemon"}, {"during": "restore", "kind": "kill_daemon"}, "needs a crash fault"),
    ({"kind": "kill_node"}, {"during": "later", "kind": "kill_node"}, "overlap.during must be one of"),
    ({"kind": "kill_node"}, {"during": "rebuild", "kind": "explode"}, "overlap.kind must be one of"),
    ({"kind": "kill_node"}, {"during": "rebuild", "kind": "kill_node", "when": 1}, "unknown: when"),
    ({"kind": "kill_node"}, {"during": "commit", "kind": "partition", "seconds": 0}, "overlap.seconds"),
    ({"kind": "kill_node"}, "rebuild", "'overlap' must be a mapping"),
])
def test_bad_overlaps_get_clear_errors(fault, overlap, needle):
    with pytest.raises(sc.ScenarioError) as e:
        sc.parse_scenario({"name": "x", "fault": fault, "overlap": overlap})
    assert needle in str(e.value)


def test_soak_overlaps_are_seeded_and_leave_the_schedule_alone():
    pool = sc.builtin_scenarios()
    plain = sc.soak_schedule(3, 3600, 20, pool, 4, 80)
    some = sc.soak_schedule(3, 3600, 20, pool, 4, 80, overlap_p=0.5)
    every = sc.soak_schedule(3, 3600, 20, pool, 4, 80, overlap_p=1.0)
    assert some == sc.soak_schedule(3, 3600, 20, pool, 4, 80, overlap_p=0.5)
    assert [(e.t_s, e.scenario.kind, e.scenario.params) for e in plain] == \
           [(e.t_s, e.scenario.kind, e.scenario.params) for e in some]
    assert not any(e.scenario.overlap for e in plain if not pool_overlap(pool, e))
    added = [e for e in some if e.scenario.name.endswith("+overlap")]
    assert 0 < len(added) < len(some)
    for e in every:
        s, ov = e.scenario, e.scenario.overlap
        if s.kind not in sc.CRASH_KINDS or s.expect != "resume":
            assert ov is None, s
            continue
        assert ov is not None
        sc.parse_overlap(ov, s.kind, s.expect, s.name)  # every drawn overlap is a valid one
        if s.kind == "kill_node" and s.params["nodes"] == "m":  # never m+1 losses
            assert ov["during"] in ("restore", "commit"), s
    assert {e.scenario.overlap["during"] for e in every if e.scenario.overlap} == set(sc.OVERLAP_DURING)
    with pytest.raises(ValueError, match="overlap probability"):
        sc.soak_schedule(3, 60, 20, pool, 4, 80, overlap_p=1.5)


def pool_overlap(pool, e) -> bool:
    return any(p.overlap and e.scenario.name.endswith(p.name) for p in pool)


def test_memory_curve_summary_shows_a_leak_as_a_slope():
    from snapshotd_tools.chaos.curve import summarize

    flat = [[t, {"n0": [60.0, 1.0], "n1": [60.0 + t / 600, 1.0]}] for t in range(0, 1200, 5)]
    got = summarize(flat)
    assert got["n0"]["rss_slope_second_half_mib_per_h"] == 0.0 and got["n0"]["rss_max_mib"] == 60.0
    assert got["n1"]["rss_slope_second_half_mib_per_h"] == pytest.approx(6.0)  # 1 MiB / 10 min
    assert summarize([]) == {}
