"""Pipeline-stage metadata for CheckFree / CheckFree+ recovery (see ``snapshotd.core.checkfree``).

With ``SnapshotterConfig(pipeline_stage=(i, S), edge_layers=(...), edge_copies=(...))``
every snapshot stores, in the rank's local state, a ``"pipeline"`` entry::

    {"stage": i, "num_stages": S, "grad_norm": float | None,
     "param_names": [...], "param_shapes": [[...], ...], "edge_copies": [...],
     "edge_layers": [...]}

(parameter names and shapes in ``model.named_parameters()`` order; ``grad_norm`` is the
value last given to ``Snapshotter.record_grad_norm``, None if unset or non-finite).
:func:`stage_info_from_meta` turns it into the planner's :class:`StageInfo`;
``Snapshotter.stage_info()`` does so for the last saved or restored snapshot.
:class:`StageRecorder` holds one Snapshotter's side of it (training thread only).
"""

from __future__ import annotations

import math

from snapshotd.core.checkfree import StageInfo

__all__ = ["StageRecorder", "finite_or_none", "stage_info_from_meta", "stage_meta", "swapped_stage_order"]


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
        edge_layers=tuple(d.get("edge_layers") or ()),
    )


def stage_meta(model, stage: int, num_stages: int, grad_norm=None, edge_copies=(), edge_layers=()) -> dict:
    """The ``"pipeline"`` entry of ``model`` (a torch module) as stage ``stage`` of
    ``num_stages``: what ``Snapshotter`` records with each snapshot (and what a simulation
    of the pipeline in one process feeds to the planner, so both take the same path)."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    missing = [n for n in (*edge_copies, *edge_layers) if n not in names]
    if missing:
        raise ValueError(f"edge_copies / edge_layers {missing} are not parameters of the model")
    if edge_layers and stage not in (0, num_stages - 1):
        raise ValueError(f"edge_layers: stage {stage} is neither the first nor the last stage")
    return {"stage": int(stage), "num_stages": int(num_stages), "grad_norm": finite_or_none(grad_norm),
            "param_names": names, "param_shapes": [[int(d) for d in p.shape] for _, p in named],
            "edge_copies": list(edge_copies), "edge_layers": list(edge_layers)}


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


class StageRecorder:
    """One Snapshotter's pipeline-stage metadata: the gradient norm last recorded, the
    stage layout (computed once, on the first save, from ``cfg.pipeline_stage``,
    ``cfg.edge_copies`` and ``cfg.edge_layers``) and ``last_meta``, the ``"pipeline"``
    entry of the last save or restore (None: that snapshot had none)."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self._grad_norm = None  # last record_grad_norm() value (float or 0-dim tensor)
        self._layout = None  # "pipeline" entry less the grad norm, computed once
        self.last_meta: dict | None = None

    def record_grad_norm(self, norm) -> None:
        """See ``Snapshotter.record_grad_norm``."""
        import torch

        if isinstance(norm, torch.Tensor):
            if norm.numel() != 1:
                raise ValueError("record_grad_norm: expected a one-element tensor")
            self._grad_norm = norm.detach()
        elif norm is None:
            self._grad_norm = None
        else:
            self._grad_norm = float(norm)

    @property
    def grad_norm(self) -> float | None:
        """The last recorded gradient norm as a float; None if unset or non-finite."""
        return finite_or_none(self._grad_norm)

    def entry(self) -> dict:
        """The ``"pipeline"`` entry of a snapshot taken now (needs ``cfg.pipeline_stage``)."""
        if self._layout is None:
            i, n = self.cfg.pipeline_stage
            self._layout = stage_meta(self.model, i, n, None, self.cfg.edge_copies, self.cfg.edge_layers)
        return {**self._layout, "grad_norm": self.grad_norm}
