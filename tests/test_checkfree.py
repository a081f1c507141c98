"""Tests for snapshotd.checkfree: the CheckFree rule, CheckFree+ edge copies, settings and
every reason a stage cannot be rebuilt from its neighbours."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snapshotd.checkfree import (
    CheckFreeImpossible,
    CheckFreePlan,
    CheckFreeSettings,
    StageInfo,
    apply_average,
    plan_checkfree,
    scaled_lr,
)
from snapshotd.errors import InvalidRequestError

NAMES = ("attn.w", "mlp.w", "norm.b")
SHAPES = ((4, 3), (3, 2), (5,))
PLUS = CheckFreeSettings(checkfree_plus=True)


def stage(i, S, g=1.0, names=NAMES, shapes=SHAPES, edge=()):
    return StageInfo(i, S, tuple(names), tuple(shapes), g, edge)


def pipeline(S, lost, norms=None):
    norms = norms or {}
    return [stage(i, S, norms.get(i, float(i + 1))) for i in range(S) if i not in lost]


def edge_stage(i, S, g=1.0):
    """A stage that keeps a copy of an edge stage's layers (embedding or head)."""
    return stage(i, S, g, NAMES + ("emb_copy.w",), SHAPES + ((10, 4),), ("emb_copy.w",))


def test_formula_on_hand_made_tensors():
    S, g_next, g_prev = 4, 3.0, 0.5
    infos = pipeline(S, {1}, {2: g_next, 0: g_prev})
    plan = plan_checkfree(infos, [1])
    assert isinstance(plan, CheckFreePlan) and plan.ok and len(plan.rebuilds) == 1
    r = plan.rebuilds[0]
    assert (r.stage, r.kind, [s for s, _ in r.sources]) == (1, "average", [2, 0])
    rng = np.random.default_rng(0)
    nxt = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    prv = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    out = apply_average(r, {2: [torch.from_numpy(x) for x in nxt], 0: [torch.from_numpy(x) for x in prv]})
    a, b = g_next + 1e-4, g_prev + 1e-4
    for got, wn, wp in zip(out, nxt, prv):
        want = (a * wn.astype(np.float64) + b * wp.astype(np.float64)) / (a + b)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    # constant tensors: (a * 4 + b * 0) / (a + b) with norms 3 and 1
    r2 = plan_checkfree(pipeline(3, {1}, {2: 3.0, 0: 1.0}), [1]).rebuilds[0]
    t = apply_average(r2, {2: [torch.full(s, 4.0) for s in SHAPES], 0: [torch.zeros(s) for s in SHAPES]})
    assert torch.allclose(t[0], torch.full(SHAPES[0], 4 * 3.0001 / 4.0002))


def test_weights_and_eps():
    r = plan_checkfree(pipeline(5, {2}, {3: 2.0, 1: 6.0}), [2]).rebuilds[0]
    (n, wa), (p, wb) = r.sources
    a, b = 2.0 + 1e-4, 6.0 + 1e-4
    assert (n, p) == (3, 1) and wa == pytest.approx(a / (a + b), abs=1e-15)
    assert wb == pytest.approx(b / (a + b), abs=1e-15) and wa + wb == pytest.approx(1.0, abs=1e-15)
    # zero grad norms: eps keeps the weights defined (equal halves)
    r0 = plan_checkfree(pipeline(5, {2}, {3: 0.0, 1: 0.0}), [2]).rebuilds[0]
    assert [w for _, w in r0.sources] == [0.5, 0.5]
    # one zero norm: the other neighbour dominates, the zero one keeps eps weight
    r1 = plan_checkfree(pipeline(5, {2}, {3: 0.0, 1: 1.0}), [2], CheckFreeSettings(eps=1e-2)).rebuilds[0]
    assert r1.sources[0][1] == pytest.approx(0.01 / 1.02) and r1.sources[1][1] == pytest.approx(1.01 / 1.02)
    with pytest.raises(InvalidRequestError):
        CheckFreeSettings(eps=0.0)


def test_param_pairs_by_position_and_lost_info_names():
    S = 4
    infos = pipeline(S, {2})
    infos[2] = stage(3, S, 1.0, ("l3.a", "l3.b", "l3.c"))  # neighbour with other names, same shapes
    lost_info = [stage(2, S, None, ("l2.a", "l2.b", "l2.c"))]
    r = plan_checkfree(infos, [2], lost_info=lost_info).rebuilds[0]
    assert [(p.position, p.name, p.source_names) for p in r.param_pairs] == [
        (0, "l2.a", ("l3.a", "attn.w")), (1, "l2.b", ("l3.b", "mlp.w")), (2, "l2.c", ("l3.c", "norm.b"))]
    assert all(p.source_positions == (p.position, p.position) for p in r.param_pairs)
    # without lost_info, the layout is assumed to be the first source's
    r2 = plan_checkfree(infos, [2]).rebuilds[0]
    assert [p.name for p in r2.param_pairs] == ["l3.a", "l3.b", "l3.c"]


def test_fresh_optimizer_and_lr():
    r = plan_checkfree(pipeline(3, {1}), [1]).rebuilds[0]
    assert r.fresh_optimizer and r.approximate and r.lr_scale == 1.1 and not r.restart_warmup
    assert "fresh optimizer" in r.note and "x1.1" in r.note
    s = CheckFreeSettings(lr_scale=1.5, restart_warmup=True)
    r = plan_checkfree(pipeline(3, {1}), [1], s).rebuilds[0]
    assert r.lr_scale == 1.5 and r.restart_warmup and "warm-up restarts" in r.note
    assert scaled_lr(1e-3) == pytest.approx(1.1e-3) and scaled_lr(2e-4, s) == pytest.approx(3e-4)
    for bad in (0.99, 2.01, math.nan, math.inf):
        with pytest.raises(InvalidRequestError, match="lr_scale"):
            CheckFreeSettings(lr_scale=bad)
    CheckFreeSettings(lr_scale=1.0), CheckFreeSettings(lr_scale=2.0)
    with pytest.raises(InvalidRequestError):
        scaled_lr(-1.0)


@pytest.mark.parametrize("lost", [0, 3])
def test_edge_without_plus_is_impossible(lost):
    res = plan_checkfree(pipeline(4, {lost}), [lost])
    assert isinstance(res, CheckFreeImpossible) and not res.ok and res.stages == (lost,)
    assert f"stage {lost} is an edge stage" in res.reason and "checkfree_plus" in res.reason
    assert "next recovery rung" in res.reason


def test_plus_copies_partner_with_edge_copies():
    S = 5
    # stage 0 lost: copy of stage 1; the embedding (first in stage 0's layout) from stage 1's copy
    infos = [edge_stage(1, S)] + [stage(i, S) for i in (2, 3, 4)]
    lost0 = [stage(0, S, None, ("emb.w",) + NAMES, ((10, 4),) + SHAPES)]
    r = plan_checkfree(infos, [0], PLUS, lost_info=lost0).rebuilds[0]
    assert (r.stage, r.kind, r.sources, r.edge_copies) == (0, "copy", ((1, 1.0),), ("emb_copy.w",))
    assert r.fresh_optimizer and r.lr_scale == 1.1 and "emb_copy.w" in r.note
    assert [(p.name, p.source_names, p.source_positions) for p in r.param_pairs] == [
        ("emb.w", ("emb_copy.w",), (3,)), ("attn.w", ("attn.w",), (0,)),
        ("mlp.w", ("mlp.w",), (1,)), ("norm.b", ("norm.b",), (2,))]
    src = [torch.randn(s) for s in SHAPES + ((10, 4),)]
    out = apply_average(r, {1: src})
    assert all(torch.equal(o, src[p.source_positions[0]]) for o, p in zip(out, r.param_pairs))
    assert out[0].data_ptr() != src[3].data_ptr()
    # last stage lost: copy of S-2; the head copy comes last
    infos = [stage(i, S) for i in (0, 1, 2)] + [edge_stage(3, S)]
    r = plan_checkfree(infos, [4], PLUS).rebuilds[0]
    assert (r.stage, r.kind, r.sources, r.edge_copies) == (4, "copy", ((3, 1.0),), ("emb_copy.w",))
    assert [p.name for p in r.param_pairs] == list(NAMES) + ["emb_copy.w"]
    # partner without edge copies cannot restore the embedding
    res = plan_checkfree(pipeline(S, {0}), [0], PLUS)
    assert isinstance(res, CheckFreeImpossible) and res.stages == (0, 1) and "no copy" in res.reason


def test_adjacent_lost_names_both():
    res = plan_checkfree(pipeline(6, {2, 3}), [3, 2])
    assert isinstance(res, CheckFreeImpossible) and res.stages == (2, 3)
    assert res.reason.startswith("stages 2 and 3 are both lost: CheckFree needs a live neighbour on each side")
    assert res.reason.endswith("fall through to the next recovery rung")
    res = plan_checkfree(pipeline(6, {1, 2, 3}), [1, 2, 3])
    assert res.stages == (1, 2, 3) and "stages 1, 2 and 3 are all lost" in res.reason
    res = plan_checkfree([edge_stage(2, 3)], [0, 1], PLUS)  # edge + neighbour
    assert isinstance(res, CheckFreeImpossible) and res.stages == (0, 1)


def test_non_adjacent_losses_rebuild_each():
    plan = plan_checkfree(pipeline(5, {1, 3}), {3, 1})
    assert isinstance(plan, CheckFreePlan)
    assert [(r.stage, tuple(s for s, _ in r.sources)) for r in plan.rebuilds] == [(1, (2, 0)), (3, (4, 2))]
    plan = plan_checkfree([edge_stage(1, 4), edge_stage(2, 4)], [0, 3], PLUS)
    assert [(r.stage, r.kind, r.sources) for r in plan.rebuilds] == [(0, "copy", ((1, 1.0),)),
                                                                    (3, "copy", ((2, 1.0),))]


def test_shape_mismatch_is_impossible():
    S = 4
    infos = pipeline(S, {1})
    infos[1] = stage(2, S, 1.0, shapes=((4, 3), (3, 3), (5,)))
    res = plan_checkfree(infos, [1])
    assert isinstance(res, CheckFreeImpossible) and "shape mismatch" in res.reason and "parameter 1" in res.reason
    infos = pipeline(S, {1})
    infos[1] = stage(2, S, 1.0, NAMES[:2], SHAPES[:2])
    assert "stages 2 and 0 have 2 and 3 parameters" in plan_checkfree(infos, [1]).reason
    lost_info = [stage(1, S, None, shapes=((4, 3), (3, 2), (6,)))]
    res = plan_checkfree(pipeline(S, {1}), [1], lost_info=lost_info)
    assert isinstance(res, CheckFreeImpossible) and "of stage 1 was (6,)" in res.reason


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -1.0])
def test_missing_or_bad_grad_norm_is_impossible(bad):
    infos = pipeline(5, {2})
    infos[2] = stage(3, 5, bad)
    res = plan_checkfree(infos, [2])
    assert isinstance(res, CheckFreeImpossible) and res.stages == (1, 2, 3) and "stage 3" in res.reason
    assert ("no gradient norm" if bad is None else "invalid gradient norm") in res.reason


def test_missing_neighbour_info_is_impossible():
    res = plan_checkfree([stage(i, 5) for i in (0, 1, 4)], [2])
    assert isinstance(res, CheckFreeImpossible) and "no info for neighbour stage(s) [3]" in res.reason


def test_single_stage_pipeline_is_impossible():
    for s in (CheckFreeSettings(), PLUS):
        res = plan_checkfree([], [0], s, lost_info=[stage(0, 1, None)])
        assert isinstance(res, CheckFreeImpossible) and res.stages == (0,) and "single stage" in res.reason


def test_invalid_input_and_trivial_plan():
    assert plan_checkfree(pipeline(3, set()), []) == CheckFreePlan(())
    with pytest.raises(InvalidRequestError, match="out of range"):
        plan_checkfree(pipeline(3, set()), [3])
    with pytest.raises(InvalidRequestError, match="number of stages"):
        plan_checkfree([stage(0, 3), stage(1, 4)], [2])
    with pytest.raises(InvalidRequestError):
        StageInfo(0, 2, ("a",), ((1,), (2,)), 1.0)
    with pytest.raises(InvalidRequestError):
        StageInfo(0, 2, ("a",), ((1,),), 1.0, ("b",))
    # the lost stage's own entry in `stages` serves as its layout and is not used as a source
    r = plan_checkfree([stage(i, 3) for i in range(3)], [1]).rebuilds[0]
    assert [s for s, _ in r.sources] == [2, 0]


def test_apply_average_dtypes():
    r = plan_checkfree(pipeline(3, {1}, {2: 1.0, 0: 1.0}), [1]).rebuilds[0]
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        out = apply_average(r, {2: [torch.full(s, 1.0, dtype=dt) for s in SHAPES],
                                0: [torch.full(s, 3.0, dtype=dt) for s in SHAPES]})
        assert all(o.dtype == dt and torch.allclose(o.double(), torch.full(o.shape, 2.0, dtype=torch.float64))
                   for o in out)
    with pytest.raises(InvalidRequestError, match="non-float"):
        apply_average(r, {2: [torch.ones(s, dtype=torch.int32) for s in SHAPES],
                          0: [torch.ones(s, dtype=torch.int32) for s in SHAPES]})
    with pytest.raises(InvalidRequestError, match="differ"):
        apply_average(r, {2: [torch.ones(s) for s in SHAPES],
                          0: [torch.ones(s, dtype=torch.float64) for s in SHAPES]})
    with pytest.raises(InvalidRequestError, match="no tensor"):
        apply_average(r, {2: [torch.ones(s) for s in SHAPES]})
