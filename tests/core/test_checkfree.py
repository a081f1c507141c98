"""Tests for snapshotd.core.checkfree: the CheckFree rule, CheckFree+ edge copies, settings and
every reason a stage cannot be rebuilt from its neighbours."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snapshotd.core.checkfree import (
    CheckFreeImpossible,
    CheckFreePlan,
    CheckFreeSettings,
    StageInfo,
    plan_checkfree,
    scaled_lr,
)
from snapshotd.wire.errors import InvalidRequestError
from snapshotd_client.checkfree_apply import apply_average, apply_rebuild  # the plan, carried out

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


# -- declared edge layers (what the pipeline trainer records) ------------------------------

EMB, HEAD = (("emb.tok", (10, 4)), ("emb.pos", (6, 4))), (("head.w", (10, 4)),)


def edge_pipeline(S, g=None):
    """Stage 0 = embedding + body, S-1 = body + head; stage 1 keeps copies of stage 0's
    layers, stage S-2 of stage S-1's (with S = 3 stage 1 keeps both, stage 0's first)."""
    g = g or {}
    out = []
    for i in range(S):
        names, shapes, layers, copies = list(NAMES), list(SHAPES), [], []
        if i == 0:
            names, shapes, layers = [n for n, _ in EMB] + names, [s for _, s in EMB] + shapes, [n for n, _ in EMB]
        if i == S - 1:
            names, shapes = names + [n for n, _ in HEAD], shapes + [s for _, s in HEAD]
            layers = layers + [n for n, _ in HEAD]
        for e, layer in ((0, EMB), (S - 1, HEAD)):
            partner = 1 if e == 0 else S - 2
            if partner == i and e != i:
                names += ["copy." + n for n, _ in layer]
                shapes += [s for _, s in layer]
                copies += ["copy." + n for n, _ in layer]
        out.append(StageInfo(i, S, tuple(names), tuple(shapes), g.get(i, 1.0 + i), tuple(copies), tuple(layers)))
    return out


def _tensors(info, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in info.param_shapes]


@pytest.mark.parametrize("S", [2, 3, 4, 5])
def test_plus_with_declared_edge_layers_copies_every_parameter(S):
    infos = edge_pipeline(S)
    tensors = {i: _tensors(x, i) for i, x in enumerate(infos)}
    for lost in {0, S - 1}:
        live = [x for x in infos if x.index != lost]
        r = plan_checkfree(live, [lost], PLUS, lost_info=[infos[lost]]).rebuilds[0]
        p = 1 if lost == 0 else S - 2
        assert (r.kind, r.sources, r.method) == ("copy", ((p, 1.0),), "CheckFree+")
        got = dict(apply_rebuild(r, {p: tensors[p]}))
        assert sorted(got) == list(range(len(infos[lost].param_names)))  # every parameter, once
        src = dict(zip(infos[p].param_names, tensors[p]))
        for k, name in enumerate(infos[lost].param_names):
            if name in infos[lost].edge_layers:
                want = src["copy." + name]  # the partner's copy of our edge layer
            elif name.startswith("copy."):
                want = src[name[5:]]  # S = 2: our copy of the partner's edge layer
            else:
                want = src[name]  # the body
            assert torch.equal(got[k], want), (S, lost, name)


@pytest.mark.parametrize("S,lost", [(3, 1), (4, 1), (4, 2), (5, 2)])
def test_middle_stage_averages_body_and_copies_back_its_edge_copies(S, lost):
    infos = edge_pipeline(S, {lost + 1: 3.0, lost - 1: 1.0})
    tensors = {i: _tensors(x, i) for i, x in enumerate(infos)}
    live = [x for x in infos if x.index != lost]
    r = plan_checkfree(live, [lost], lost_info=[infos[lost]]).rebuilds[0]  # plain CheckFree
    assert r.kind == "average" and r.method == "CheckFree"
    got = dict(apply_rebuild(r, {j: tensors[j] for j in (lost - 1, lost + 1)}))
    assert sorted(got) == list(range(len(infos[lost].param_names)))
    a, b = 3.0 + 1e-4, 1.0 + 1e-4
    for k, name in enumerate(infos[lost].param_names):
        if name.startswith("copy."):
            e = 0 if name[5:].startswith("emb") else S - 1
            want = tensors[e][infos[e].param_names.index(name[5:])]
            assert torch.equal(got[k], want), name
        else:
            nxt = tensors[lost + 1][infos[lost + 1].param_names.index(name)]
            prv = tensors[lost - 1][infos[lost - 1].param_names.index(name)]
            assert torch.allclose(got[k], (a * nxt + b * prv) / (a + b), atol=1e-6), name
    expected_copies = [n for n in infos[lost].param_names if n.startswith("copy.")]
    assert [e.name for e in r.edge_pairs] == expected_copies


def test_ambiguous_or_inconsistent_edge_copies_are_impossible():
    # S = 3: stage 1 keeps copies for stages 0 and 2, and neither declares its edge layers
    infos = [stage(0, 3), stage(1, 3, 1.0, NAMES + ("c0", "c2"), SHAPES + ((10, 4), (10, 4)), ("c0", "c2")),
             stage(2, 3)]
    res = plan_checkfree(infos[:2], [2], PLUS)
    assert isinstance(res, CheckFreeImpossible) and "neither declares its edge_layers" in res.reason
    # declared layers that do not add up to the copies kept
    infos = edge_pipeline(4)
    bad0 = StageInfo(0, 4, infos[0].param_names, infos[0].param_shapes, 1.0, (), ("emb.tok",))
    res = plan_checkfree(infos[1:], [0], PLUS, lost_info=[bad0])
    assert isinstance(res, CheckFreeImpossible) and "keeps 2 edge copies" in res.reason
    # a copy whose shape differs from the layer it copies
    shapes = list(infos[1].param_shapes)
    shapes[infos[1].param_names.index("copy.emb.pos")] = (7, 4)
    odd1 = StageInfo(1, 4, infos[1].param_names, tuple(shapes), 1.0, infos[1].edge_copies)
    res = plan_checkfree([odd1, infos[2], infos[3]], [0], PLUS, lost_info=[infos[0]])
    assert isinstance(res, CheckFreeImpossible) and "shape mismatch" in res.reason and "(7, 4)" in res.reason
    # edge_layers only on edge stages, never overlapping the copies
    with pytest.raises(InvalidRequestError, match="first and last"):
        StageInfo(1, 3, ("a",), ((1,),), 1.0, (), ("a",))
    with pytest.raises(InvalidRequestError, match="not among edge_copies"):
        StageInfo(0, 3, ("a",), ((1,),), 1.0, ("a",), ("a",))


def test_apply_checkfree_sets_weights_resets_optimizer_scales_lr():
    from snapshotd_client.checkfree_restore import CheckFreeUnavailableError, apply_checkfree

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))

    def infos_of(models, norms):
        return [StageInfo(i, 3, tuple(n for n, _ in m.named_parameters()),
                          tuple(tuple(p.shape) for p in m.parameters()), norms[i]) for i, m in enumerate(models)]

    models = [net(s) for s in range(3)]
    infos = infos_of(models, [1.0, 5.0, 3.0])
    for restart in (False, True):
        lost = net(9)
        opt = torch.optim.AdamW(lost.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        lost(torch.ones(1, 3)).sum().backward()
        opt.step()
        assert opt.state
        settings = CheckFreeSettings(lr_scale=1.2, restart_warmup=restart)
        (rb,) = plan_checkfree([infos[0], infos[2]], [1], settings, lost_info=[infos[1]]).rebuilds
        tensors = {j: [p.detach().clone() for p in models[j].parameters()] for j in (0, 2)}
        apply_checkfree(lost, opt, sched, rb, tensors, settings, version=4)
        a, b = 3.0 + 1e-4, 1.0 + 1e-4
        for p, p2, p0 in zip(lost.parameters(), models[2].parameters(), models[0].parameters()):
            assert torch.allclose(p.detach(), (a * p2 + b * p0).detach() / (a + b), atol=1e-6)
        assert not opt.state  # fresh optimizer
        step = 0 if restart else 4  # the warm-up restarts, or the schedule resumes at the step
        assert sched.last_epoch == step
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 1.2 * min(1.0, (step + 1) / 10))
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 1.2 * min(1.0, (step + 2) / 10))
    # a plan that does not fit the model is refused before anything is written
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    before = [p.detach().clone() for p in other.parameters()]
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(CheckFreeUnavailableError, match="does not fit"):
        apply_checkfree(other, opt, None, rb, tensors, CheckFreeSettings(), version=4)
    assert all(torch.equal(x, y) for x, y in zip(before, other.parameters()))
    assert opt.param_groups[0]["lr"] == 0.1
