"""bench/report.py's goal verdicts (G1-G3): the comparisons themselves, on results built
here, so a verdict that flatters (a failed size counted as a pass, the wrong baseline,
a flipped comparison) fails a test instead of reaching the README."""

from __future__ import annotations

from bench import report

MiB = 1 << 20


def _size(S, *, copy_s=0.100, m0_blocked=0.110, m2_safe=0.200, dca_safe=0.400, paired=None,
          failed=None, skipped=None, drop=()):
    rows = [{"contender": "snapshotd m=0", "blocked_s": m0_blocked, "safe_s": m0_blocked},
            {"contender": "snapshotd m=2", "blocked_s": m0_blocked, "safe_s": m2_safe},
            {"contender": "DCP async_save disk", "blocked_s": 0.05, "safe_s": dca_safe}]
    if paired is not None:
        rows[0]["paired_warm_copy_s"] = paired
    rows = [r for r in rows if r["contender"] not in drop]
    return {"state_bytes": S, "warm_copy_s": copy_s, "rows": rows, "skipped": skipped or [],
            "failed": failed or {}}


def _restore(S, ours=0.05, tload=0.10):
    return {"state_bytes": S, "rows": [{"contender": "snapshotd (local daemon)", "restore_s": ours},
                                       {"contender": "torch.load /dev/shm", "restore_s": tload}]}


def _res(sizes, restores=()):
    return {"snapshot": {"sizes": sizes}, "restore": {"sizes": list(restores)}, "gpu": {}}


def _goal(res, gid):
    return next(g for g in report.goals(res) if g["goal"] == gid)


def test_all_goals_pass_when_every_size_holds():
    res = _res([_size(64 * MiB), _size(256 * MiB)], [_restore(64 * MiB), _restore(256 * MiB)])
    assert [_goal(res, g)["status"] for g in ("G1", "G2", "G3")] == ["pass", "pass", "pass"]


def test_g1_divides_by_the_floor_row_not_the_paired_copy():
    # 138 ms blocked, floor 79 ms, a slower copy made just before each save 127 ms:
    # 138/127 = 1.09 would pass; the floor gives 1.75, a miss.
    res = _res([_size(1 << 30, copy_s=0.079, m0_blocked=0.138, paired=0.127)])
    g = _goal(res, "G1")
    assert g["status"] == "miss"
    assert abs(g["per_size"][0]["value"] - 0.138 / 0.079) < 1e-9
    assert "79" in g["per_size"][0]["detail"] and "127" in g["per_size"][0]["detail"]


def test_g1_boundary_is_inclusive():
    assert _goal(_res([_size(MiB, copy_s=0.1, m0_blocked=0.12)]), "G1")["status"] == "pass"
    assert _goal(_res([_size(MiB, copy_s=0.1, m0_blocked=0.1201)]), "G1")["status"] == "miss"


def test_g2_a_size_whose_m2_run_failed_fails_the_goal():
    """The suite once printed 'G2 PASS' while its 1 GiB and 2 GiB m=2 rows had failed."""
    ok = _size(256 * MiB)
    bad = _size(1 << 30, drop=("snapshotd m=2",),
                failed={"snapshotd m=2": "RuntimeError: version 2 did not commit on every node"})
    g = _goal(_res([ok, bad]), "G2")
    assert g["status"] == "miss"
    assert [p["ok"] for p in g["per_size"]] == [True, False]
    assert "did not commit" in g["per_size"][1]["detail"]
    md = report.markdown({"machine": {"cpu": "x", "cores": 2, "ram_bytes": 1 << 30, "python": "3.11",
                                      "torch": "2", "torch_threads": 1, "kernel": "k",
                                      "loadavg_at_start": 0, "date_utc": "d"},
                          "config": {"repeats": 1}, "goals": report.goals(_res([ok, bad])),
                          **_res([ok, bad])})
    assert "**G2 MISS**" in md and "**G2 PASS**" not in md


def test_g2_and_g3_comparisons_are_strict():
    assert _goal(_res([_size(MiB, m2_safe=0.4, dca_safe=0.4)]), "G2")["status"] == "miss"
    assert _goal(_res([_size(MiB)], [_restore(MiB, ours=0.1, tload=0.1)]), "G3")["status"] == "miss"
    assert _goal(_res([_size(MiB)], [_restore(MiB, ours=0.09, tload=0.1)]), "G3")["status"] == "pass"


def test_a_skipped_size_counts_for_nothing_and_nothing_measured_is_not_a_pass():
    skipped = _size(2 << 30, drop=("snapshotd m=2",), skipped=["snapshotd m=2: above --cluster-max-mib"])
    assert _goal(_res([_size(MiB), skipped]), "G2")["status"] == "pass"
    assert _goal(_res([]), "G1")["status"] == "not measured"
    assert _goal(_res([_size(MiB)]), "G3")["status"] == "not measured"  # no restore section
