"""Pipeline-stage metadata of the client (for CheckFree): recorded on save, read back after
restore, fed to the CheckFree planner; CheckFree+ swapped stage order."""

from __future__ import annotations

import math

import pytest
import torch

from snapshotd.core.checkfree import CheckFreePlan, StageInfo, plan_checkfree
from snapshotd_client.pipeline import stage_info_from_meta, swapped_stage_order
from snapshotd_client.snapshotter import Snapshotter


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def _snap(daemon, model, job, **kw) -> Snapshotter:
    return Snapshotter(model, job_id=job, socket_path=daemon.socket, rank=0, world_size=1,
                       on_daemon_unavailable="raise", timeout_s=10, **kw)


def _save_stage(daemon, i, n, norm, step=1, **kw) -> StageInfo:
    m = _model(i)
    with _snap(daemon, m, f"pp-s{i}", pipeline_stage=(i, n), **kw) as s:
        s.record_grad_norm(norm)
        fut = s.save(step)
        assert fut is not None and fut.result(10).committed
        return s.stage_info()


def test_save_restore_roundtrip(daemon):
    m = _model(0)
    with _snap(daemon, m, "pp", pipeline_stage=(1, 4), edge_copies=("2.weight",)) as s:
        assert s.stage_info() is None  # nothing saved yet
        s.record_grad_norm(torch.tensor(0.75))
        s.save(1).result(10)
        saved = s.stage_info()
        s.record_grad_norm(1.25)  # the last value before the save counts
        assert s.save(2).result(10).committed
        saved = s.stage_info()
    expected = StageInfo(1, 4, ("0.weight", "0.bias", "2.weight", "2.bias"),
                         ((3, 4), (3,), (2, 3), (2,)), 1.25, ("2.weight",))
    assert saved == expected
    # a fresh Snapshotter (no pipeline option) reads it back from the restored snapshot
    with _snap(daemon, _model(9), "pp") as r:
        assert r.stage_info() is None
        assert r.restore() == 2
        assert r.stage_info() == expected


def test_non_finite_grad_norm_stored_as_none(daemon):
    for k, bad in enumerate([float("nan"), float("inf"), torch.tensor(-math.inf)]):
        info = _save_stage(daemon, 0, 2, bad, step=k + 1)
        assert info.grad_norm is None
    with _snap(daemon, _model(5), "pp-s0") as r:
        assert r.restore() == 3 and r.stage_info().grad_norm is None
    assert stage_info_from_meta({"stage": 0, "num_stages": 1, "grad_norm": float("nan"),
                                 "param_names": [], "param_shapes": []}).grad_norm is None


def test_no_pipeline_option_records_nothing(daemon):
    with _snap(daemon, _model(0), "plain") as s:
        s.record_grad_norm(1.0)
        s.save(1).result(10)
        assert s.stage_info() is None


def test_bad_options(daemon):
    with pytest.raises(ValueError):
        _snap(daemon, _model(0), "bad", pipeline_stage=(3, 3))
    with _snap(daemon, _model(0), "bad2", pipeline_stage=(0, 2), edge_copies=("nope",)) as s:
        with pytest.raises(ValueError, match="nope"):
            s.save(1)
        with pytest.raises(ValueError):
            s.record_grad_norm(torch.ones(2))


def test_stage_infos_feed_checkfree_planner(daemon):
    infos = [_save_stage(daemon, i, 3, norm) for i, norm in enumerate([2.0, 5.0, 6.0])]
    assert [x.grad_norm for x in infos] == [2.0, 5.0, 6.0]
    plan = plan_checkfree([infos[0], infos[2]], lost=[1], lost_info=[infos[1]])
    assert isinstance(plan, CheckFreePlan) and len(plan.rebuilds) == 1
    rb = plan.rebuilds[0]
    eps = 1e-4
    a, b = 6.0 + eps, 2.0 + eps
    assert rb.stage == 1 and rb.kind == "average"
    assert [j for j, _ in rb.sources] == [2, 0]
    assert rb.sources[0][1] == pytest.approx(a / (a + b))
    assert rb.sources[1][1] == pytest.approx(b / (a + b))
    assert [p.name for p in rb.param_pairs] == list(infos[1].param_names)


@pytest.mark.parametrize("n,mb,expected", [
    (6, 0, [0, 1, 2, 3, 4, 5]),
    (6, 1, [1, 0, 2, 3, 5, 4]),
    (6, 2, [0, 1, 2, 3, 4, 5]),
    (4, 3, [1, 0, 3, 2]),
    (4, 4, [0, 1, 2, 3]),
    (3, 0, [0, 1, 2]),
    (3, 1, [1, 0, 2]),
    (3, 3, [0, 2, 1]),
    (3, 5, [1, 0, 2]),
    (2, 1, [1, 0]),
    (2, 2, [0, 1]),
    (1, 1, [0]),
])
def test_swapped_stage_order(n, mb, expected):
    assert swapped_stage_order(n, mb) == expected


def test_swapped_stage_order_rejects_bad_input():
    for args in [(0, 0), (3, -1), (2.0, 1), (3, True)]:
        with pytest.raises(ValueError):
            swapped_stage_order(*args)


def test_edge_layers_recorded_and_checked(daemon):
    m = _model(0)
    with _snap(daemon, m, "pp-edge", pipeline_stage=(0, 3), edge_layers=("0.weight", "0.bias")) as s:
        s.record_grad_norm(0.5)
        assert s.save(1).result(10).committed
        info = s.stage_info()
    assert info.edge_layers == ("0.weight", "0.bias") and info.edge_copies == ()
    assert [n for n, _, _ in info.body()] == ["2.weight", "2.bias"]  # what CheckFree averages
    with _snap(daemon, _model(1), "pp-edge") as r:
        assert r.restore() == 1 and r.stage_info() == info and r.restored_method == "exact"
    with _snap(daemon, _model(0), "pp-edge2", pipeline_stage=(1, 3), edge_layers=("0.weight",)) as s:
        with pytest.raises(ValueError, match="neither the first nor the last"):
            s.save(1)
