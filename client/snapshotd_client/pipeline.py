"""Pipeline-stage metadata for CheckFree / CheckFree+ recovery (see ``snapshotd.checkfree``).

With ``SnapshotterConfig(pipeline_stage=(i, S), edge_copies=(...))`` every snapshot stores,
in the rank's local state, a ``"pipeline"`` entry::

    {"stage": i, "num_stages": S, "grad_norm": float | None,
     "param_names": [...], "param_shapes": [[...], ...], "edge_copies": [...]}

(parameter names and shapes in ``model.named_parameters()`` order; ``grad_norm`` is the
value last given to ``Snapshotter.record_grad_norm``, None if unset or non-finite).
:func:`stage_info_from_meta` turns it into the planner's :class:`StageInfo`;
``Snapshotter.stage_info()`` does so for the last saved or restored snapshot.
"""

from __future__ import annotations

import math

from snapshotd.checkfree import StageInfo

__all__ = ["finite_or_none", "stage_info_from_meta", "swapped_stage_order"]


def finite_or_none(x) -> float | None:
    """``x`` (float, int or one-element tensor) as a float; None if None or non-finite."""
    if x is None:
        return None
    if hasattr(x, "item"):
        x = x.item()
    x = float(x)
    return x if math.isfinite(x) else None


def stage_info_from_meta(d: dict) -> StageInfo:
    """The :class:`StageInfo` of a snapshot's ``"pipeline"`` entry."""
    return StageInfo(
        index=int(d["stage"]),
        num_stages=int(d["num_stages"]),
        param_names=tuple(d["param_names"]),
        param_shapes=tuple(tuple(int(v) for v in s) for s in d["param_shapes"]),
        grad_norm=finite_or_none(d.get("grad_norm")),
        edge_copies=tuple(d.get("edge_copies") or ()),
    )


def swapped_stage_order(num_stages: int, microbatch: int) -> list[int]:
    """CheckFree+ execution order of the stages for micro-batch ``microbatch`` (>= 0).

    Even micro-batches run the natural order ``0..S-1``. Odd ones swap the first two and
    the last two stages (S >= 4: ``[1, 0, 2, ..., S-3, S-1, S-2]``), so that stage 1 learns
    to stand in for stage 0 and stage S-2 for stage S-1. Small pipelines:

    * S == 1: nothing to swap, always ``[0]``;
    * S == 2: the first two and the last two are the same pair, swapped once: ``[1, 0]``;
    * S == 3: the two swaps overlap on stage 1, so odd micro-batches alternate between them:
      ``microbatch % 4 == 1`` -> ``[1, 0, 2]``, ``microbatch % 4 == 3`` -> ``[0, 2, 1]``.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 0:
        raise ValueError(f"microbatch must be an int >= 0, got {microbatch!r}")
    order = list(range(num_stages))
    if microbatch % 2 == 0 or num_stages == 1:
        return order
    if num_stages == 3:
        if microbatch % 4 == 1:
            order[0], order[1] = order[1], order[0]
        else:
            order[1], order[2] = order[2], order[1]
        return order
    order[0], order[1] = order[1], order[0]
    if num_stages >= 4:
        order[-1], order[-2] = order[-2], order[-1]
    return order
