"""CheckFree rung of ``Snapshotter.restore()``: rebuild a lost pipeline stage from its neighbours.

Used only when the daemon cannot give this rank its state back (FAILED_PRECONDITION: the
node was lost and parity cannot rebuild its shard, or a data-parallel peer's slice of it),
the Snapshotter has ``pipeline_stage`` set and ``checkfree=CheckFreeSettings(...)`` (None,
the default, disables this rung and the daemon's error propagates).

What it does, for version V (the latest committed version RegisterJob reported):

1. reads the neighbour stages' shards of V (a middle stage: i-1 and i+1; an edge stage,
   with ``checkfree_plus``: its swap partner) and their ``"pipeline"`` entries; a
   neighbour stored with ``shard_replicated=True`` is gathered from its DP ranks' slices;
2. plans with :func:`snapshotd.core.checkfree.plan_checkfree` (lost = this stage, its layout
   from the freshly built model); an impossible plan raises
   :class:`CheckFreeUnavailableError` (a ConflictError, so the next rung of the ladder
   sees the same class as the daemon's error) with the planner's reason, and changes
   nothing;
3. :func:`apply_checkfree` (also what ``bench/bench_checkfree.py`` calls): the plan's
   tensors (:func:`snapshotd_client.checkfree_apply.apply_rebuild`: the weighted average for CheckFree,
   the partner's body and edge copies for CheckFree+) are copied into this stage's
   parameters by position; the optimizer state is cleared and every param group's lr (and
   the LR scheduler's ``base_lrs``) multiplied by ``lr_scale``; unless ``restart_warmup``,
   the scheduler resumes at step V (its ``last_epoch``), else at 0;
4. sets ``restored_approximate = True`` and ``restored_method`` ("CheckFree" or
   "CheckFree+"), logs a WARNING, returns V.

Assumptions and limits:

* stage j's shard is rank ``stage_ranks[j]`` (option ``stage_ranks``, default
  ``range(S)``: rank == stage index); with data parallelism inside a stage, that is one
  of the stage's DP ranks and its manifest names the others (``dp_ranks``);
* neighbours are read through the local daemon (OpenShard copies another node's shard);
  if it refuses and ``checkfree_sources`` maps the rank to a daemon target
  ("unix:/path.sock" or "host:port"), the shard is streamed from there (FetchShard);
* everything else of the lost rank (RNG states, extra state, model buffers, the
  scheduler's own state beyond ``last_epoch``) stays as freshly constructed.
"""

from __future__ import annotations

import logging

import torch

from snapshotd.core.checkfree import CheckFreeImpossible, StageRebuild, plan_checkfree, swap_partner
from snapshotd_client.checkfree_apply import apply_rebuild
from snapshotd.wire.errors import CheckFreeUnavailableError, SnapshotdError  # noqa: F401 (re-exported)
from snapshotd_client import layout as lo
from snapshotd_client import pipeline as pl
from snapshotd_client import state as st
from snapshotd_client import tensors as tz
from snapshotd_client.transport import DaemonClient

log = logging.getLogger("snapshotd_client")


def _read_shard(snap, rank: int, version: int):
    """(manifest, payload buffer) of ``rank``'s committed shard of ``version``."""
    job = snap.cfg.job_id
    try:
        resp = snap.client.open_shard(job, rank, version)
        return resp.manifest, snap.segments.get(resp.segment_name, writable=False).buf
    except SnapshotdError as exc:
        target = (snap.cfg.checkfree_sources or {}).get(rank)
        if target is None:
            raise CheckFreeUnavailableError(
                f"CheckFree: cannot read neighbour rank {rank} of job {job!r} version {version} "
                f"through the local daemon ({exc}) and no checkfree_sources entry for it") from exc
        log.warning("snapshotd: local daemon cannot open rank %d (%s); fetching it from %s", rank, exc, target)
    if "/" in target and not target.startswith("unix:"):
        target = "unix:" + target
    cl = DaemonClient(target, token=snap.cfg.token, timeout_s=snap.cfg.timeout_s)
    try:
        return cl.fetch_shard(job, rank, version)
    except SnapshotdError as exc:
        raise CheckFreeUnavailableError(f"CheckFree: cannot fetch rank {rank} from {target}: {exc}") from exc
    finally:
        cl.close()


def _replicated(snap, m, buf, version: int):
    """The neighbour's whole replicated payload: its own bytes, or (``shard_replicated=True``)
    every DP rank's slice gathered into one buffer."""
    if m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes:
        return buf
    out = torch.empty(m.replicated_bytes, dtype=torch.uint8)
    for r in m.dp_ranks:
        om, obuf = (m, buf) if r == m.rank else _read_shard(snap, r, version)
        if om.replicated_bytes != m.replicated_bytes:
            raise CheckFreeUnavailableError(f"CheckFree: rank {r}'s slice belongs to another layout "
                                            f"than rank {m.rank}'s")
        if om.slice_bytes:
            src = tz.view_from(obuf, tz.TensorSlot("slice", "uint8", (om.slice_bytes,), 0, om.slice_bytes, (), ()))
            out[om.slice_offset:om.slice_offset + om.slice_bytes].copy_(src)
            del src
    return out.numpy()


def _neighbour(snap, rank: int, version: int):
    """(StageInfo, [model parameters in its param order, copied out of the segments]) of
    ``rank``'s shard; the error (logged) when it cannot be read: its node was lost too (the
    usual case; the peer's error is not always specific enough to tell); None (logged) when
    it has no pipeline entry."""
    try:
        m, buf = _read_shard(snap, rank, version)
        rep_buf = _replicated(snap, m, buf, version)
    except CheckFreeUnavailableError as exc:
        log.warning("snapshotd: %s", exc)
        return exc
    meta = st.loads_meta(m.meta_json)
    local = st.unflatten_state(meta["local"], [tz.view_from(buf, lo.slot_of(t)) for t in m.tensors])
    if "pipeline" not in local:
        log.warning("snapshotd: rank %d's shard has no pipeline metadata", rank)
        return None
    info = pl.stage_info_from_meta(local["pipeline"])
    rep = st.unflatten_state(meta["replicated"],
                             [tz.view_from(rep_buf, lo.slot_of(t)) for t in m.replicated_tensors])
    model_sd = rep.get("model", {})
    missing = [n for n in info.param_names if n not in model_sd]
    if missing:
        log.warning("snapshotd: rank %d's shard lacks parameters %s", rank, missing[:5])
        return None
    # Copies: no view may outlive the segment mapping (closed after the restore).
    return info, [model_sd[n].clone() for n in info.param_names]


def apply_checkfree(model, optimizer, lr_scheduler, rebuild: StageRebuild, neighbour_tensors,
                    settings, version: int) -> None:
    """Carry out one planned rebuild on a live stage: its parameters (by position in
    ``model.named_parameters()``) from ``neighbour_tensors`` ({stage: [tensors in that
    stage's param order]}), then a fresh optimizer and the scaled LR. Checks every shape
    before it writes anything."""
    new = apply_rebuild(rebuild, neighbour_tensors)
    params = [p for _, p in model.named_parameters()]
    for k, t in new:
        if not 0 <= k < len(params) or tuple(params[k].shape) != tuple(t.shape):
            raise CheckFreeUnavailableError(f"CheckFree: planned tensor {k} of shape {tuple(t.shape)} does not "
                                            f"fit the model's parameter {k}")
    with torch.no_grad():
        for k, t in new:
            params[k].copy_(t)
    reset_optimizer(optimizer, lr_scheduler, settings, version)


def restore_checkfree(snap, version: int, cause: Exception) -> int:
    """Rebuild ``snap``'s stage from its neighbours' shards of ``version``; return the step."""
    settings = snap.cfg.checkfree
    stage, S = snap.cfg.pipeline_stage
    ranks = tuple(snap.cfg.stage_ranks) if snap.cfg.stage_ranks else tuple(range(S))
    if len(ranks) != S:
        raise ValueError(f"stage_ranks {ranks} must name one rank per stage ({S})")
    log.warning("snapshotd: state of stage %d (rank %d) of version %d is lost (%s); trying CheckFree",
                stage, snap.rank, version, cause)
    partner = swap_partner(stage, S)
    if partner is None:
        wanted = [stage - 1, stage + 1]
    else:  # an edge stage: its swap partner, or nothing (plain CheckFree: the planner says why)
        wanted = [partner] if settings.checkfree_plus else []
    try:
        infos, models, lost, why = {}, {}, {stage}, []
        for j in wanted:
            if 0 <= j < S:
                got = _neighbour(snap, ranks[j], version)
                if isinstance(got, Exception):  # unreadable: lost too, so the planner names
                    lost.add(j)                 # the adjacent losses
                    why.append(f"stage {j}: {got}")
                elif got is not None:
                    infos[j], models[j] = got
        own = pl.stage_info_from_meta(snap.stage_recorder.entry())
        plan = plan_checkfree(infos, lost, settings, lost_info={stage: own})
        if isinstance(plan, CheckFreeImpossible):
            raise CheckFreeUnavailableError(
                f"stage {stage} of job {snap.cfg.job_id!r} version {version} is lost ({cause}) and "
                f"CheckFree cannot rebuild it: {plan.reason}" + (f" [{'; '.join(why)}]" if why else "")) from cause
        (rb,) = plan.rebuilds
        apply_checkfree(snap.model, snap.optimizer, snap.lr_scheduler, rb, models, settings, version)
    finally:  # the neighbours' segments: nothing above keeps a view of them (copies only)
        snap.segments.close()
    snap.restored_approximate = True
    snap.restored_method = rb.method
    snap.stage_recorder.last_meta = {**snap.stage_recorder.entry(), "grad_norm": None}
    log.warning("snapshotd: stage %d of job %s rebuilt APPROXIMATELY by %s at step %d (%s); RNG and extra "
                "state are fresh", stage, snap.cfg.job_id, rb.method, version, rb.note)
    return int(version)


def reset_optimizer(opt, sched, settings, version: int) -> None:
    """Fresh optimizer state and the rebuilt stage's LR: every param group's lr (and the
    scheduler's base_lrs) times ``lr_scale``; the scheduler at step ``version``, or at 0
    when ``restart_warmup``."""
    if opt is None:
        return
    opt.state.clear()
    for g in opt.param_groups:
        g["lr"] = g["lr"] * settings.lr_scale
        if "initial_lr" in g:
            g["initial_lr"] = g["initial_lr"] * settings.lr_scale
    if sched is None:
        return
    if hasattr(sched, "base_lrs"):
        sched.base_lrs = [b * settings.lr_scale for b in sched.base_lrs]
    if hasattr(sched, "last_epoch"):
        sched.last_epoch = 0 if settings.restart_warmup else int(version)
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is not None and len(lambdas) == len(opt.param_groups):  # LambdaLR: closed form
            for g, base, f in zip(opt.param_groups, sched.base_lrs, lambdas):
                g["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
