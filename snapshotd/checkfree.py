"""CheckFree planner: rebuild a lost pipeline stage from its neighbours, or say why not.

Third rung of the recovery ladder: local RAM -> rebuild from peers' data and parity ->
**CheckFree** -> durable checkpoint on disk -> a clear error. It is used only for a stage
whose shard parity cannot rebuild, and the result is approximate (training goes on).

Rule (CheckFree, "All is Not Lost: LLM Recovery without Checkpoints"): a lost stage i
becomes W_i = (a W_{i+1} + b W_{i-1}) / (a + b), a = |g_{i+1}| + eps,
b = |g_{i-1}| + eps, with the neighbours' gradient norms of the last step (after
clipping). The k-th parameter of stage i pairs with the k-th of stages i-1 and i+1
(shapes must match). The rebuilt stage gets a fresh optimizer state and its learning rate
times ``lr_scale``; its warm-up may restart. Edge stages have one neighbour: plain
CheckFree cannot rebuild them; CheckFree+ copies the swap partner (0 <- 1, S-1 <- S-2)
and restores the embedding / de-embedding from the copies the partner keeps (its
``edge_copies``; by convention they come first in stage 0's layout, last in stage S-1's).
Two adjacent lost stages, a lost or unknown neighbour, or a missing / non-finite gradient
norm make the plan :class:`CheckFreeImpossible`.

Pure: no I/O, no torch. Only :func:`apply_average` touches tensors (torch, imported lazily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, NamedTuple, Sequence

from .errors import InvalidRequestError

NEXT_RUNG = "fall through to the next recovery rung"


@dataclass(frozen=True)
class StageInfo:
    index: int
    num_stages: int
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    grad_norm: float | None  # last step's gradient norm (after clipping); None: not recorded
    edge_copies: tuple[str, ...] = ()  # names (among param_names) of the edge stage's copied layers

    def __post_init__(self):
        if not 0 <= self.index < self.num_stages:
            raise InvalidRequestError(f"stage index {self.index} out of range 0..{self.num_stages - 1}")
        if len(self.param_names) != len(self.param_shapes):
            raise InvalidRequestError(f"stage {self.index}: {len(self.param_names)} names but "
                                      f"{len(self.param_shapes)} shapes")
        if len(set(self.param_names)) != len(self.param_names):
            raise InvalidRequestError(f"stage {self.index}: duplicate parameter names")
        if not set(self.edge_copies) <= set(self.param_names):
            raise InvalidRequestError(f"stage {self.index}: edge_copies must be among param_names")


@dataclass(frozen=True)
class CheckFreeSettings:
    lr_scale: float = 1.1  # learning-rate multiplier of the rebuilt stage, in [1.0, 2.0]
    restart_warmup: bool = False
    checkfree_plus: bool = False  # rebuild edge stages as copies of their swap partner
    eps: float = 1e-4

    def __post_init__(self):
        if not (isinstance(self.lr_scale, (int, float)) and 1.0 <= self.lr_scale <= 2.0):
            raise InvalidRequestError(f"lr_scale must be in [1.0, 2.0], got {self.lr_scale!r}")
        if not isinstance(self.restart_warmup, bool) or not isinstance(self.checkfree_plus, bool):
            raise InvalidRequestError("restart_warmup and checkfree_plus must be bool")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < math.inf):
            raise InvalidRequestError(f"eps must be positive and finite, got {self.eps!r}")


class ParamPair(NamedTuple):
    position: int  # position in the lost stage
    name: str  # name in the lost stage
    source_names: tuple[str, ...]  # name in each source, in the order of StageRebuild.sources
    source_positions: tuple[int, ...]  # position in each source's tensor list


@dataclass(frozen=True)
class StageRebuild:
    stage: int
    kind: str  # "average" | "copy"
    sources: tuple[tuple[int, float], ...]  # (neighbour stage, weight); weights sum to 1
    param_pairs: tuple[ParamPair, ...]
    lr_scale: float
    restart_warmup: bool
    note: str = ""
    edge_copies: tuple[str, ...] = ()  # "copy": the partner's copies of the edge layers used
    fresh_optimizer: bool = True
    approximate: bool = True


@dataclass(frozen=True)
class CheckFreePlan:
    rebuilds: tuple[StageRebuild, ...]
    ok = True


@dataclass(frozen=True)
class CheckFreeImpossible:
    reason: str
    stages: tuple[int, ...]  # the lost stages that cannot be rebuilt (and offending neighbours)
    ok = False


def _index(infos: Iterable[StageInfo | None] | Mapping[int, StageInfo] | None, what: str) -> dict[int, StageInfo]:
    if infos is None:
        return {}
    items = infos.items() if isinstance(infos, Mapping) else ((None, x) for x in infos)
    out: dict[int, StageInfo] = {}
    for key, x in items:
        if x is None:
            continue
        if not isinstance(x, StageInfo) or (key is not None and key != x.index):
            raise InvalidRequestError(f"{what}: expected StageInfo keyed by its index, got {x!r}")
        if x.index in out:
            raise InvalidRequestError(f"{what}: stage {x.index} given twice")
        out[x.index] = x
    return out


def _runs(lost: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for s in lost:
        if runs and runs[-1][-1] == s - 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _names(xs: Sequence[int]) -> str:
    return f"{xs[0]} and {xs[1]}" if len(xs) == 2 else ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"


def _bad_norm(info: StageInfo) -> str | None:
    g = info.grad_norm
    if g is None:
        return f"stage {info.index} recorded no gradient norm"
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
        return f"stage {info.index} has an invalid gradient norm {g!r}"
    return None


def _entries(info: StageInfo, order: Sequence[str] | None = None) -> list[tuple[str, tuple, int]]:
    """[(name, shape, position)] of a source stage, in ``order`` (default: its own)."""
    pos = {n: k for k, n in enumerate(info.param_names)}
    return [(n, tuple(info.param_shapes[pos[n]]), pos[n]) for n in (order or info.param_names)]


def _pairs(stage: int, lost_info: StageInfo | None, srcs: list[tuple[int, list[tuple[str, tuple, int]]]]):
    """ParamPairs, or a message saying which shapes or counts do not match."""
    ref_stage, ref = srcs[0]
    for j, other in srcs[1:]:
        if len(other) != len(ref):
            return f"stages {ref_stage} and {j} have {len(ref)} and {len(other)} parameters"
        for k, ((n0, s0, _), (n1, s1, _)) in enumerate(zip(ref, other)):
            if s0 != s1:
                return f"parameter {k}: {n0!r} of stage {ref_stage} is {s0}, {n1!r} of stage {j} is {s1}"
    if lost_info is None:
        lost_layout = [(n, s) for n, s, _ in ref]
    else:
        lost_layout = list(zip(lost_info.param_names, map(tuple, lost_info.param_shapes)))
        if len(lost_layout) != len(ref):
            return f"stage {stage} had {len(lost_layout)} parameters, stage {ref_stage} has {len(ref)}"
        for k, ((n0, s0), (n1, s1, _)) in enumerate(zip(lost_layout, ref)):
            if s0 != s1:
                return f"parameter {k}: {n0!r} of stage {stage} was {s0}, {n1!r} of stage {ref_stage} is {s1}"
    return tuple(ParamPair(k, lost_layout[k][0], tuple(lay[k][0] for _, lay in srcs),
                           tuple(lay[k][2] for _, lay in srcs)) for k in range(len(ref)))


def plan_checkfree(stages: Sequence[StageInfo | None] | Mapping[int, StageInfo], lost: Collection[int],
                   settings: CheckFreeSettings | None = None,
                   lost_info: Sequence[StageInfo] | Mapping[int, StageInfo] | None = None,
                   ) -> CheckFreePlan | CheckFreeImpossible:
    """Plan the rebuild of every stage in ``lost`` from its live neighbours.

    ``stages``: info of the live stages (None entries skipped; keyed by ``.index``).
    ``lost_info``: the lost stages' layout from the last manifest; without it a lost stage
    is assumed to have its (first) source's layout and names. An entry of ``stages`` for a
    lost stage serves as its layout too. Malformed input raises InvalidRequestError.
    """
    settings = settings or CheckFreeSettings()
    live, old = _index(stages, "stages"), _index(lost_info, "lost_info")
    counts = {x.num_stages for x in (*live.values(), *old.values())}
    lost_l = sorted(set(lost))
    if not lost_l:
        return CheckFreePlan(())
    if len(counts) != 1:
        raise InvalidRequestError(f"stage infos disagree on (or omit) the number of stages: {sorted(counts)}")
    S = counts.pop()
    for s in lost_l:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < S:
            raise InvalidRequestError(f"lost stage {s!r} out of range 0..{S - 1}")
        if s not in old and s in live:
            old[s] = live[s]
        live.pop(s, None)
    if S == 1:
        return CheckFreeImpossible(f"stage 0 is lost and the pipeline has a single stage: no neighbour "
                                   f"to rebuild it from; {NEXT_RUNG}", (0,))
    problems: list[tuple[str, tuple[int, ...]]] = []
    for run in _runs(lost_l):
        if len(run) > 1:
            problems.append((f"stages {_names(run)} are {'both' if len(run) == 2 else 'all'} lost: CheckFree "
                             "needs a live neighbour on each side", tuple(run)))
    rebuilds = []
    for i in lost_l:
        if any(i in st for _, st in problems):
            continue
        edge = i in (0, S - 1)
        if edge and not settings.checkfree_plus:
            problems.append((f"stage {i} is an edge stage with one neighbour: plain CheckFree cannot rebuild it "
                             "(enable checkfree_plus)", (i,)))
            continue
        nbrs = [i - 1 if i else 1] if edge else [i + 1, i - 1]
        missing = [j for j in nbrs if j not in live]
        if missing:
            problems.append((f"stage {i}: no info for neighbour stage(s) {missing}", (i, *missing)))
            continue
        info = old.get(i)
        if edge:
            p = live[nbrs[0]]
            if not p.edge_copies:
                problems.append((f"stage {i}: partner stage {p.index} keeps no copy of its edge layers",
                                 (i, p.index)))
                continue
            body = [n for n in p.param_names if n not in p.edge_copies]
            order = list(p.edge_copies) + body if i == 0 else body + list(p.edge_copies)
            pairs = _pairs(i, info, [(p.index, _entries(p, order))])
            note = (f"stage {i} rebuilt as a copy of stage {p.index} (CheckFree+), edge layers from "
                    f"its copies {list(p.edge_copies)}")
            sources, kind, copies = ((p.index, 1.0),), "copy", tuple(p.edge_copies)
        else:
            bad = [m for j in nbrs if (m := _bad_norm(live[j]))]
            if bad:
                problems.append((f"stage {i}: " + "; ".join(bad), (i, *nbrs)))
                continue
            a = live[i + 1].grad_norm + settings.eps
            b = live[i - 1].grad_norm + settings.eps
            sources, kind, copies = ((i + 1, a / (a + b)), (i - 1, b / (a + b))), "average", ()
            pairs = _pairs(i, info, [(j, _entries(live[j])) for j in nbrs])
            note = (f"stage {i} rebuilt as {sources[0][1]:.4g} * stage {i + 1} + {sources[1][1]:.4g} * "
                    f"stage {i - 1} (CheckFree, grad norms {live[i + 1].grad_norm:.4g} / "
                    f"{live[i - 1].grad_norm:.4g})")
        if isinstance(pairs, str):
            problems.append((f"stage {i}: shape mismatch: {pairs}", (i, *nbrs)))
            continue
        note += f"; approximate: fresh optimizer state, lr x{settings.lr_scale:g}" + (
            ", warm-up restarts" if settings.restart_warmup else "")
        rebuilds.append(StageRebuild(i, kind, sources, pairs, settings.lr_scale, settings.restart_warmup,
                                     note, copies))
    if problems:
        stages_out = tuple(sorted({s for _, st in problems for s in st}))
        return CheckFreeImpossible("; ".join(r for r, _ in problems) + f"; {NEXT_RUNG}", stages_out)
    return CheckFreePlan(tuple(rebuilds))


def scaled_lr(base_lr: float, settings: CheckFreeSettings | None = None) -> float:
    """The learning rate of a rebuilt stage: base_lr * lr_scale."""
    if not (isinstance(base_lr, (int, float)) and 0 <= base_lr < math.inf):
        raise InvalidRequestError(f"base_lr must be finite and >= 0, got {base_lr!r}")
    return base_lr * (settings or CheckFreeSettings()).lr_scale


def apply_average(rebuild: StageRebuild, neighbour_tensors: Mapping[int, Sequence]) -> list:
    """The rebuilt stage's tensors, in its parameter order, from ``{stage: [tensors in that
    stage's param order]}``. "average": sum of weight * source accumulated in float32
    (float64 if the parameter is float64), then cast back to the parameter's dtype (the
    sources' dtype, which must agree). "copy": a clone of the partner's tensor."""
    import torch

    out = []
    for pair in rebuild.param_pairs:
        try:
            ts = [neighbour_tensors[j][p] for (j, _), p in zip(rebuild.sources, pair.source_positions)]
        except (KeyError, IndexError) as e:
            raise InvalidRequestError(f"stage {rebuild.stage}: no tensor for {pair.name!r} ({e!r})") from None
        t0 = ts[0]
        if any(t.shape != t0.shape or t.dtype != t0.dtype for t in ts):
            raise InvalidRequestError(f"stage {rebuild.stage}: sources of {pair.name!r} differ in shape or dtype")
        if rebuild.kind == "copy":
            out.append(t0.detach().clone())
            continue
        if not t0.is_floating_point():
            raise InvalidRequestError(f"stage {rebuild.stage}: cannot average non-float {pair.name!r} ({t0.dtype})")
        acc_dtype = torch.float64 if t0.dtype == torch.float64 else torch.float32
        acc = torch.zeros(t0.shape, dtype=acc_dtype, device=t0.device)
        for (_, w), t in zip(rebuild.sources, ts):
            acc.add_(t.detach().to(acc_dtype), alpha=w)
        out.append(acc.to(t0.dtype))
    return out
