"""CheckFree rung of ``Snapshotter.restore()``: rebuild a lost pipeline stage from its neighbours.

Used only when the daemon cannot give this rank its own shard back (FAILED_PRECONDITION:
the node was lost and parity cannot rebuild it), the Snapshotter has ``pipeline_stage``
set and ``checkfree=CheckFreeSettings(...)`` (None, the default, disables this rung and
the daemon's error propagates).

What it does, for version V (the latest committed version RegisterJob reported):

1. opens the neighbour stages' shards of V and reads their ``"pipeline"`` entries;
2. plans with :func:`snapshotd.checkfree.plan_checkfree` (lost = this stage); an
   impossible plan raises :class:`CheckFreeUnavailableError` (a ConflictError) with the
   planner's reason;
3. averages the neighbours' model parameters (``apply_average``) into this stage's
   parameters (by position, per the plan's ``param_pairs``);
4. clears the optimizer state and multiplies every param group's lr (and the LR
   scheduler's ``base_lrs``) by ``lr_scale``; unless ``restart_warmup``, the scheduler
   resumes at step V (its ``last_epoch``);
5. sets ``snapshotter.restored_approximate = True``, logs a WARNING, returns V.

Assumptions and limits:

* one pipeline stage per rank: stage j's shard is rank ``stage_ranks[j]`` (option
  ``stage_ranks``, default ``range(S)``: rank == stage index);
* neighbours' shards are stored with ``shard_replicated=False`` (the full replicated part,
  i.e. model and optimizer, at offset 0 of the rank's payload);
* neighbours are read through the local daemon (OpenShard copies another node's shard);
  if it refuses and ``checkfree_sources`` maps the neighbour's rank to a daemon target
  ("unix:/path.sock" or "host:port"), the shard is streamed from there (FetchShard);
* everything else of the lost rank (RNG states, extra state, model buffers, the
  scheduler's own state beyond ``last_epoch``) stays as freshly constructed.
"""

from __future__ import annotations

import logging

import torch

from snapshotd.checkfree import CheckFreeImpossible, apply_average, plan_checkfree
from snapshotd.errors import ConflictError, SnapshotdError
from snapshotd_client import layout as lo
from snapshotd_client import pipeline as pl
from snapshotd_client import state as st
from snapshotd_client import tensors as tz
from snapshotd_client.transport import DaemonClient

log = logging.getLogger("snapshotd_client")


class CheckFreeUnavailableError(ConflictError):
    """The stage's shard is lost and CheckFree cannot rebuild it either (the reason says why)."""


def _read_neighbour(snap, rank: int, version: int):
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
    finally:
        cl.close()


def _decode(m, buf) -> tuple[dict, dict]:
    """(model state_dict of views, local state) of a shard stored with shard_replicated=False."""
    if m.slice_offset != 0 or m.slice_bytes != m.replicated_bytes:
        raise CheckFreeUnavailableError(
            f"CheckFree: rank {m.rank}'s shard holds a slice of its replicated state "
            "(shard_replicated=True is not supported)")
    meta = st.loads_meta(m.meta_json)
    buf = buf if buf is not None else bytearray(0)
    rep = st.unflatten_state(meta["replicated"],
                             [tz.view_from(buf, lo.slot_of(t)) for t in m.replicated_tensors])
    local = st.unflatten_state(meta["local"], [tz.view_from(buf, lo.slot_of(t)) for t in m.tensors])
    return rep.get("model", {}), local


def _neighbour(snap, rank: int, version: int):
    """(StageInfo, [model parameters in its param order, copied out of the segment]) of
    ``rank``'s shard, or None (logged) when it cannot be read or has no pipeline entry."""
    try:
        m, buf = _read_neighbour(snap, rank, version)
    except CheckFreeUnavailableError as exc:
        log.warning("snapshotd: %s", exc)
        return None  # the planner says why that is not enough
    model_sd, local = _decode(m, buf)
    if "pipeline" not in local:
        log.warning("snapshotd: rank %d's shard has no pipeline metadata", rank)
        return None
    info = pl.stage_info_from_meta(local["pipeline"])
    # Copies: no view may outlive the segment mapping (closed after the restore).
    return info, [model_sd[n].clone() for n in info.param_names]


def restore_checkfree(snap, version: int, cause: Exception) -> int:
    """Rebuild ``snap``'s stage from its neighbours' shards of ``version``; return the step."""
    settings = snap.cfg.checkfree
    stage, S = snap.cfg.pipeline_stage
    ranks = tuple(snap.cfg.stage_ranks) if snap.cfg.stage_ranks else tuple(range(S))
    if len(ranks) != S:
        raise ValueError(f"stage_ranks {ranks} must name one rank per stage ({S})")
    log.warning("snapshotd: shard of stage %d (rank %d) of version %d is lost (%s); trying CheckFree",
                stage, snap.rank, version, cause)
    try:
        infos, models = {}, {}
        for j in (stage - 1, stage + 1):
            if 0 <= j < S:
                got = _neighbour(snap, ranks[j], version)
                if got is not None:
                    infos[j], models[j] = got
        names = [n for n, _ in snap.model.named_parameters()]
        own = pl.stage_info_from_meta(snap._pipeline_entry())
        plan = plan_checkfree(infos, {stage}, settings, lost_info={stage: own})
        if isinstance(plan, CheckFreeImpossible):
            raise CheckFreeUnavailableError(
                f"stage {stage} of job {snap.cfg.job_id!r} version {version} is lost ({cause}) and "
                f"CheckFree cannot rebuild it: {plan.reason}") from cause
        (rb,) = plan.rebuilds
        new = apply_average(rb, models)
        params = [p for _, p in snap.model.named_parameters()]
        with torch.no_grad():
            for pair, t in zip(rb.param_pairs, new):
                params[pair.position].copy_(t)
    finally:
        try:
            snap.segments.close()
        except BufferError:  # a view still alive on an error path: the mapping goes with it
            log.debug("snapshotd: segment still exported, left to the garbage collector")
    _reset_optimizer(snap, settings, version)
    snap.restored_approximate = True
    log.warning("snapshotd: stage %d of job %s rebuilt APPROXIMATELY by CheckFree at step %d "
                "(%d parameters: %s); optimizer state reset, lr x%g; RNG and extra state are fresh",
                stage, snap.cfg.job_id, version, len(names), rb.note, settings.lr_scale)
    return int(version)


def _reset_optimizer(snap, settings, version: int) -> None:
    opt, sched = snap.optimizer, snap.lr_scheduler
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
    if not settings.restart_warmup and hasattr(sched, "last_epoch"):
        sched.last_epoch = int(version)  # the step the job resumes at
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is not None and len(lambdas) == len(opt.param_groups):  # LambdaLR: closed form
            for g, base, f in zip(opt.param_groups, sched.base_lrs, lambdas):
                g["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
