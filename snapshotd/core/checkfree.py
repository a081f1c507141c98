"""CheckFree planner: rebuild a lost pipeline stage from its neighbours, or say why not.

Third rung of the recovery ladder: local RAM -> rebuild from peers' data and parity ->
**CheckFree** -> durable checkpoint on disk -> a clear error. It is used only for a stage
whose shard parity cannot rebuild, and the result is approximate (training goes on).

Rule (CheckFree, "All is Not Lost: LLM Recovery without Checkpoints"): a lost stage i
becomes W_i = (a W_{i+1} + b W_{i-1}) / (a + b), a = |g_{i+1}| + eps,
b = |g_{i-1}| + eps, with the neighbours' gradient norms of the last step (after
clipping). Only a stage's *body* is averaged: every parameter except its ``edge_layers``
(the embedding of stage 0, the head of stage S-1) and its ``edge_copies`` (CheckFree+
copies of a neighbour's edge layers); the k-th body parameter of stage i pairs with the
k-th of stages i-1 and i+1 (shapes must match). The rebuilt stage gets a fresh optimizer
state and its learning rate times ``lr_scale``; its warm-up may restart.

CheckFree+ (edge stages, which have one neighbour): the swap partner (0 <-> 1,
S-1 <-> S-2, see :func:`swap_partner`) learns to stand in for the edge stage (the
trainer swaps their order on alternate micro-batches) and keeps a copy of its edge layers
(``edge_copies``). A lost edge stage becomes a copy of the partner's body, with its edge
layers copied from the partner's copies (and, S = 2, its own copies of the partner's edge
layers from the partner's originals). A stage's ``edge_copies`` list the copies of each
edge stage it partners, stage 0's first (:func:`copied_edges`), each in the order of that
stage's ``edge_layers``. A lost middle stage that keeps copies gets them back from the
(live) edge stage. Snapshots that declare no ``edge_layers`` fall back to a convention:
the edge layers come first in stage 0's layout, last in stage S-1's.

Two adjacent lost stages, a lost or unknown neighbour, an edge stage without CheckFree+,
a missing / non-finite gradient norm or layouts that do not pair up make the plan
:class:`CheckFreeImpossible`, whose reason says why; the caller falls through to the next
rung.

Pure: no I/O, no torch. The plan is carried out on tensors by the client
(:mod:`snapshotd_client.checkfree_apply`: ``apply_average``, ``apply_rebuild``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, NamedTuple, Sequence

from snapshotd.wire.errors import InvalidRequestError

NEXT_RUNG = "fall through to the next recovery rung"


@dataclass(frozen=True)
class StageInfo:
    index: int
    num_stages: int
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    grad_norm: float | None  # last step's gradient norm (after clipping); None: not recorded
    edge_copies: tuple[str, ...] = ()  # names (among param_names) of the edge stage's copied layers
    edge_layers: tuple[str, ...] = ()  # stage 0 / S-1 only: names of its own embedding / head layers

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
        if not set(self.edge_layers) <= set(self.param_names) or set(self.edge_layers) & set(self.edge_copies):
            raise InvalidRequestError(f"stage {self.index}: edge_layers must be among param_names and "
                                      "not among edge_copies")
        if self.edge_layers and self.index not in (0, self.num_stages - 1):
            raise InvalidRequestError(f"stage {self.index}: only the first and last stage have edge_layers")

    def body(self) -> list[tuple[str, tuple, int]]:
        """[(name, shape, position)] of the parameters CheckFree averages: all but the edge
        layers and the copies of another stage's edge layers."""
        skip = set(self.edge_layers) | set(self.edge_copies)
        return [(n, tuple(s), k) for k, (n, s) in enumerate(zip(self.param_names, self.param_shapes))
                if n not in skip]

    def entries(self, names: Sequence[str]) -> list[tuple[str, tuple, int]]:
        pos = {n: k for k, n in enumerate(self.param_names)}
        return [(n, tuple(self.param_shapes[pos[n]]), pos[n]) for n in names]


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


class EdgePair(NamedTuple):
    """A lost middle stage's copy of an edge stage's layer, copied back from that edge stage."""
    position: int  # position in the lost stage
    name: str
    source_stage: int
    source_name: str
    source_position: int


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
    edge_pairs: tuple[EdgePair, ...] = ()  # "average": the lost stage's own edge copies

    @property
    def method(self) -> str:
        return "CheckFree+" if self.kind == "copy" else "CheckFree"


@dataclass(frozen=True)
class CheckFreePlan:
    rebuilds: tuple[StageRebuild, ...]
    ok = True


@dataclass(frozen=True)
class CheckFreeImpossible:
    reason: str
    stages: tuple[int, ...]  # the lost stages that cannot be rebuilt (and offending neighbours)
    ok = False


def swap_partner(stage: int, num_stages: int) -> int | None:
    """The CheckFree+ swap partner of an edge stage (0 <-> 1, S-1 <-> S-2); None otherwise."""
    if num_stages < 2 or stage not in (0, num_stages - 1):
        return None
    return 1 if stage == 0 else num_stages - 2


def copied_edges(stage: int, num_stages: int) -> list[int]:
    """The edge stages whose layers ``stage`` keeps copies of, in the order its
    ``edge_copies`` list them (stage 1 copies stage 0, stage S-2 copies stage S-1; with
    S = 3 stage 1 copies both, stage 0's first; with S = 2 each copies the other)."""
    return [e for e in sorted({0, num_stages - 1})
            if e != stage and swap_partner(e, num_stages) == stage]


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


def _edge_names(info: StageInfo, n: int | None) -> list[str]:
    """The edge layers of edge stage ``info``: declared, or (older snapshots that declare
    none) by convention the first ``n`` non-copy parameters of stage 0, the last of S-1."""
    if info.edge_layers:
        return list(info.edge_layers)
    own = [x for x in info.param_names if x not in info.edge_copies]
    if not n:
        return []
    return own[:n] if info.index == 0 else own[-n:]


def _copy_segments(holder: StageInfo, known: Mapping[int, StageInfo]) -> dict[int, list[str]] | str:
    """{edge stage: the names among ``holder.edge_copies`` that copy its layers}, or why not."""
    es, copies = copied_edges(holder.index, holder.num_stages), list(holder.edge_copies)
    if not es:
        return {}
    counts = {e: (len(known[e].edge_layers) if e in known and known[e].edge_layers else None) for e in es}
    unknown = [e for e in es if counts[e] is None]
    if len(unknown) > 1:
        return (f"stage {holder.index} keeps copies for stages {_names(unknown)} and neither declares "
                "its edge_layers")
    if unknown:
        counts[unknown[0]] = len(copies) - sum(c for c in counts.values() if c is not None)
    if any(c < 0 for c in counts.values()) or sum(counts.values()) != len(copies):
        return (f"stage {holder.index} keeps {len(copies)} edge copies but stages {es} have "
                f"{[counts[e] for e in es]} edge layers")
    out, k = {}, 0
    for e in es:
        out[e], k = copies[k:k + counts[e]], k + counts[e]
    return out


def _match(what: str, lost: Sequence[tuple[str, tuple, int]], src: Sequence[tuple[str, tuple, int]],
           src_stage: int, stage: int, was: bool = True) -> str | None:
    """Why the layouts ``lost`` (of ``stage``; ``was``: a lost stage's) and ``src`` do not
    pair up position by position, or None."""
    if len(lost) != len(src):
        if was:
            return f"shape mismatch: stage {stage} had {len(lost)} {what}s, stage {src_stage} has {len(src)}"
        return f"shape mismatch: stages {src_stage} and {stage} have {len(src)} and {len(lost)} {what}s"
    for k, ((n0, s0, _), (n1, s1, _)) in enumerate(zip(lost, src)):
        if tuple(s0) != tuple(s1):
            return (f"shape mismatch: {what} {k}: {n1!r} of stage {src_stage} is {tuple(s1)}, {n0!r} of stage "
                    f"{stage} {'was' if was else 'is'} {tuple(s0)}")
    return None


def _own_copies(i: int, info: StageInfo | None, known: Mapping[int, StageInfo], allowed: Collection[int]):
    """(lost name, shape, position, source stage, source entry) for the lost stage's own edge
    copies, restored from the edge stages they copy (which must be live, in ``allowed``)."""
    if info is None or not info.edge_copies:
        return []
    segs = _copy_segments(info, known)
    if isinstance(segs, str):
        return segs
    out = []
    for e, names in segs.items():
        if e not in allowed:
            return f"its copies of stage {e}'s edge layers have no live source"
        src = known[e].entries(_edge_names(known[e], len(names)))
        bad = _match("edge copy", info.entries(names), src, e, i)
        if bad:
            return bad
        out += [(n, s, p, e, srcent) for (n, s, p), srcent in zip(info.entries(names), src)]
    return out


def _plan_copy(i: int, p: StageInfo, info: StageInfo | None, known: Mapping[int, StageInfo]):
    """CheckFree+: every parameter of edge stage i from its swap partner p."""
    segs = _copy_segments(p, known)
    if isinstance(segs, str):
        return segs
    seg = segs.get(i) or []
    if not seg:
        return f"partner stage {p.index} keeps no copy of stage {i}'s edge layers"
    body_src = p.body()
    if info is None:  # assume the partner's layout: its copies of our edge layers, then its body
        order = seg + [n for n, _, _ in body_src] if i == 0 else [n for n, _, _ in body_src] + seg
        shapes = {n: s for n, s, _ in p.entries(p.param_names)}
        info = StageInfo(i, p.num_stages, tuple(order), tuple(shapes[n] for n in order), None,
                         edge_layers=tuple(seg))
    edge = _edge_names(info, len(seg))
    bad = _match("edge layer", info.entries(edge), p.entries(seg), p.index, i)
    if bad is None:
        lost_body = [x for x in info.entries(info.param_names) if x[0] not in set(edge) | set(info.edge_copies)]
        bad = _match("parameter", lost_body, body_src, p.index, i)
    if bad:
        return bad
    src_of = dict(zip(edge, p.entries(seg)))
    src_of.update(zip((n for n, _, _ in lost_body), body_src))
    own = _own_copies(i, info, known, {p.index})
    if isinstance(own, str):
        return own
    src_of.update({n: srcent for n, _, _, _, srcent in own})
    missing = [n for n in info.param_names if n not in src_of]
    if missing:
        return f"no source for stage {i}'s parameters {missing}"
    pairs = tuple(ParamPair(k, n, (src_of[n][0],), (src_of[n][2],)) for k, n in enumerate(info.param_names))
    return pairs, tuple(seg)


def _plan_average(i: int, nbrs: list[StageInfo], info: StageInfo | None, known: Mapping[int, StageInfo]):
    """CheckFree: the body of middle stage i from its neighbours' bodies; its own copies of
    an edge stage's layers (if it keeps any) from that edge stage."""
    bodies = [x.body() for x in nbrs]
    bad = _match("parameter", bodies[1], bodies[0], nbrs[0].index, nbrs[1].index, was=False)
    if bad:
        return bad
    if info is None:
        lost_body = [(n, s, k) for k, (n, s, _) in enumerate(bodies[0])]
    else:
        lost_body = info.body()
        bad = _match("parameter", lost_body, bodies[0], nbrs[0].index, i)
        if bad:
            return bad
    pairs = tuple(ParamPair(p, n, tuple(b[k][0] for b in bodies), tuple(b[k][2] for b in bodies))
                  for k, (n, _, p) in enumerate(lost_body))
    own = _own_copies(i, info, known, {x.index for x in nbrs})
    if isinstance(own, str):
        return own
    edge_pairs = tuple(EdgePair(p, n, e, src[0], src[2]) for n, _, p, e, src in own)
    return pairs, edge_pairs


def plan_checkfree(stages: Sequence[StageInfo | None] | Mapping[int, StageInfo], lost: Collection[int],
                   settings: CheckFreeSettings | None = None,
                   lost_info: Sequence[StageInfo] | Mapping[int, StageInfo] | None = None,
                   ) -> CheckFreePlan | CheckFreeImpossible:
    """Plan the rebuild of every stage in ``lost`` from its live neighbours.

    ``stages``: info of the live stages (None entries skipped; keyed by ``.index``).
    ``lost_info``: the lost stages' layout (the last manifest's, or the freshly built
    model's); without it a lost stage is assumed to have its (first) source's layout and
    names, and no edge copies of its own. An entry of ``stages`` for a lost stage serves as
    its layout too. Malformed input raises InvalidRequestError.
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
    known = {**old, **live}
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
        nbrs = [swap_partner(i, S)] if edge else [i + 1, i - 1]
        missing = [j for j in nbrs if j not in live]
        if missing:
            problems.append((f"stage {i}: no info for neighbour stage(s) {missing}", (i, *missing)))
            continue
        info = old.get(i)
        edge_pairs: tuple[EdgePair, ...] = ()
        if edge:
            p = live[nbrs[0]]
            got = _plan_copy(i, p, info, known)
            if isinstance(got, str):
                problems.append((f"stage {i}: {got}", (i, p.index)))
                continue
            pairs, copies = got
            sources, kind = ((p.index, 1.0),), "copy"
            note = (f"stage {i} rebuilt as a copy of stage {p.index} (CheckFree+), edge layers from its "
                    f"copies {list(copies)}")
        else:
            bad = [m for j in nbrs if (m := _bad_norm(live[j]))]
            if bad:
                problems.append((f"stage {i}: " + "; ".join(bad), (i, *nbrs)))
                continue
            got = _plan_average(i, [live[j] for j in nbrs], info, known)
            if isinstance(got, str):
                problems.append((f"stage {i}: {got}", (i, *nbrs)))
                continue
            pairs, edge_pairs = got
            a = live[i + 1].grad_norm + settings.eps
            b = live[i - 1].grad_norm + settings.eps
            sources, kind, copies = ((i + 1, a / (a + b)), (i - 1, b / (a + b))), "average", ()
            note = (f"stage {i} rebuilt as {sources[0][1]:.4g} * stage {i + 1} + {sources[1][1]:.4g} * "
                    f"stage {i - 1} (CheckFree, grad norms {live[i + 1].grad_norm:.4g} / "
                    f"{live[i - 1].grad_norm:.4g})")
            if edge_pairs:
                note += f", its {len(edge_pairs)} edge-layer copies copied back from stage {edge_pairs[0].source_stage}"
        note += f"; approximate: fresh optimizer state, lr x{settings.lr_scale:g}" + (
            ", warm-up restarts" if settings.restart_warmup else "")
        rebuilds.append(StageRebuild(i, kind, sources, pairs, settings.lr_scale, settings.restart_warmup,
                                     note, copies, edge_pairs=edge_pairs))
    if problems:
        stages_out = tuple(sorted({s for _, st in problems for s in st}))
        return CheckFreeImpossible("; ".join(r for r, _ in problems) + f"; {NEXT_RUNG}", stages_out)
    return CheckFreePlan(tuple(rebuilds))


def scaled_lr(base_lr: float, settings: CheckFreeSettings | None = None) -> float:
    """The learning rate of a rebuilt stage: base_lr * lr_scale."""
    if not (isinstance(base_lr, (int, float)) and 0 <= base_lr < math.inf):
        raise InvalidRequestError(f"base_lr must be finite and >= 0, got {base_lr!r}")
    return base_lr * (settings or CheckFreeSettings()).lr_scale
