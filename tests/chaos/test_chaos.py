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
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def _verdict(o) -> dict:
    return {c.name: (c.ok, c.detail) for c in check(o)}


def test_a_clean_resume_holds_every_invariant():
    v = _verdict(_resumed())
    assert all(ok for ok, _ in v.values()), v
    assert "lost 1 step(s), bound 1" in v["lost_steps"][1]


def test_a_wrong_restored_state_is_caught():
    o = _resumed()
    o.digests[-11] = ("resumed", 1, 5, "CORRUPT", True)
    ok, why = _verdict(o)["bit_identical"]
    assert not ok and "rank 1 restored step 5" in why


def test_restoring_an_older_version_than_committed_is_caught():
    o = _resumed(restore_points={0: 4, 1: 4})
    v = _verdict(o)
    assert not v["restorable"][0] and "version 5 was committed" in v["restorable"][1]
    assert not v["lost_steps"][0]


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
                           rung=rung, lost_ranks=[1, 3], losses=list(losses))

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
