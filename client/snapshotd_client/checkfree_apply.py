"""Carrying out a CheckFree plan on tensors: the rebuilt stage's weights.

:func:`snapshotd.core.checkfree.plan_checkfree` (pure, no torch) decides which stages are
combined with which weights; this module does the arithmetic on the neighbours' tensors
(:func:`apply_average` for a CheckFree average or a CheckFree+ copy, :func:`apply_rebuild`
for those plus the lost stage's own edge-layer copies). Called by
:mod:`snapshotd_client.checkfree_restore`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from snapshotd.core.checkfree import StageRebuild
from snapshotd.wire.errors import InvalidRequestError


def apply_average(rebuild: StageRebuild, neighbour_tensors: Mapping[int, Sequence]) -> list:
    """The rebuilt stage's tensors, in its parameter order, from ``{stage: [tensors in that
    stage's param order]}``. "average": sum of weight * source accumulated in float32
    (float64 if the parameter is float64), then cast back to the parameter's dtype (the
    sources' dtype, which must agree). "copy": a clone of the partner's tensor."""
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


def apply_rebuild(rebuild: StageRebuild, neighbour_tensors: Mapping[int, Sequence]) -> list[tuple[int, object]]:
    """[(position in the lost stage, new tensor)] for every parameter the plan rebuilds: the
    combined ones (:func:`apply_average`) and the lost stage's own edge copies (cloned from
    the edge stage). ``neighbour_tensors``: {stage: [tensors in that stage's param order]}
    for every source stage."""
    out = [(pair.position, t) for pair, t in zip(rebuild.param_pairs, apply_average(rebuild, neighbour_tensors))]
    for e in rebuild.edge_pairs:
        try:
            t = neighbour_tensors[e.source_stage][e.source_position]
        except (KeyError, IndexError) as exc:
            raise InvalidRequestError(f"stage {rebuild.stage}: no tensor for {e.name!r} ({exc!r})") from None
        out.append((e.position, t.detach().clone()))
    return out
