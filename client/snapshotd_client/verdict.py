"""One verdict for all ranks of a job at restore time.

``Snapshotter.restore()`` must never leave the ranks of a job in different states: some
at version V, some at an older version, some starting over. Two things can split them:
the ranks' daemons may disagree about the latest committed version (a node that missed
the commit word, one cut off from its peers), and one rank may be unable to open the
version the others load. So, before anything is loaded:

1. every rank asks its daemon for the latest committed version; the ranks take the
   newest any of them reports (:meth:`RestoreVerdict.version`): a committed claim is
   always sound (every node held v whole when it committed), and a node that lags
   promotes v, or rebuilds it, when it is asked to open it;
2. every rank opens its shard of that version (and, stored sharded, its DP peers'
   slices) and reports how that went (:data:`OPENED` ... :data:`FAILED`); the ranks
   take the worst outcome (:meth:`RestoreVerdict.outcomes`), and either all load, or
   all fail (each raises), or all skip the restore together (a daemon unreachable,
   ``on_daemon_unavailable="warn"``: every rank starts over, none loads). A rank whose
   own state is lost and that has a CheckFree rung rebuilds its stage at the same
   version, and its outcome counts once that rebuild succeeded or failed.

The agreement goes through torch.distributed when its default process group is
initialised and has the job's world size: every rank of the job must then call
``restore()``, as a collective (ranks in messages are the process group's). Without a process group, each
rank has its daemon's answer, which is already the newest version any live peer of that
daemon reports committed; a daemon cut off from every peer can only answer for itself,
so multi-node jobs should restore with a process group initialised.

Training thread only. No pickle: only integer tensors cross between ranks.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("snapshotd_client")

# Outcomes of opening the agreed version on one rank, in rising severity: the ranks act
# on the worst one reported.
OPENED = 0  # opened (or nothing to restore): load it
REBUILT = 1  # own state lost, rebuilt approximately (CheckFree) at the same version
UNAVAILABLE = 2  # the daemon could not be reached
FAILED = 3  # the version cannot be loaded here, and no rung could replace it
NAMES = {OPENED: "opened", REBUILT: "rebuilt by CheckFree", UNAVAILABLE: "daemon unreachable",
         FAILED: "cannot load it"}


def _group_spans(world_size: int) -> bool:
    """The default process group has the job's size (the same answer on every rank of it,
    so every rank takes part in the collectives, or none does)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_world_size() != world_size:
        log.debug("snapshotd: the process group has %d ranks, the job %d: restore agrees through "
                  "the daemons only", dist.get_world_size(), world_size)
        return False
    return world_size > 1


class RestoreVerdict:
    """The ranks' agreement for one restore (see the module docstring)."""

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank = world_size, rank
        self.collective = _group_spans(world_size)
        if self.collective:
            self.rank = torch.distributed.get_rank()  # outcomes are indexed by the group's ranks
        self.device = torch.device("cpu")
        if self.collective and str(torch.distributed.get_backend()) == "nccl":  # CUDA tensors only
            self.device = torch.device("cuda", torch.cuda.current_device())

    def version(self, mine: int) -> int:
        """The newest committed version any rank's daemon reports (``mine`` without a group)."""
        if not self.collective:
            return mine
        t = torch.tensor([mine], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        v = int(t.item())
        if v != mine:
            log.warning("snapshotd: this rank's daemon reports version %d committed, another rank's "
                        "%d: every rank restores %d", mine, v, v)
        return v

    def outcomes(self, mine: int) -> list[int]:
        """Every rank's outcome, by rank (``[mine]`` without a group)."""
        if not self.collective:
            return [mine]
        out = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        out[self.rank] = mine
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return [int(x) for x in out.tolist()]


def describe(codes: list[int], worst: int) -> str:
    """'rank(s) 2, 5: cannot load it' for the ranks whose outcome is ``worst``."""
    ranks = [r for r, c in enumerate(codes) if c == worst]
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {NAMES[worst]}"


def run_restore(snap) -> int:
    """``Snapshotter.restore()``: agree, open, agree, load (see the module docstring).
    Returns the step restored (0: nothing to restore, or every rank skipped it)."""
    from snapshotd.wire.errors import ConflictError, DaemonUnavailableError

    job, t0 = snap.cfg.job_id, time.monotonic()
    verdict = RestoreVerdict(snap.world_size, snap.rank)
    mine, code, err, resp, plan = 0, OPENED, None, None, None
    try:  # no fence yet: a lagging node must still hold the version it is asked for
        mine = snap._ensure_registered(restarting=False)
    except DaemonUnavailableError as exc:
        code, err = UNAVAILABLE, exc
    except Exception as exc:  # refused: every rank hears of it before anyone loads
        code, err = FAILED, exc
    version = verdict.version(mine)
    if code == OPENED and version:
        log.info("snapshotd: restoring job %s rank %d from step %d (a node that lost its shards "
                 "rebuilds them first)", job, snap.rank, version)
        try:
            resp, plan = _open(snap, version)
        except DaemonUnavailableError as exc:
            code, err = UNAVAILABLE, exc
        except ConflictError as exc:  # our state (or a DP peer's slice of it) is lost for good
            lost = snap.cfg.checkfree is not None and snap.cfg.pipeline_stage is not None
            code, err = (REBUILT if lost else FAILED), exc.with_traceback(None)
        except Exception as exc:
            code, err = FAILED, exc
    t_open, step = time.monotonic(), version
    try:
        codes = verdict.outcomes(code)
        if max(codes) >= UNAVAILABLE:
            return _abort(snap, version, codes, code, err)
        if code == REBUILT:  # the CheckFree rung, at the version every rank loads
            try:
                step = snap._restore_fallback(version, err)
            except Exception as exc:
                code, err = FAILED, exc
        if REBUILT in codes:  # every rank knows a rebuild ran: agree on how it went
            codes = verdict.outcomes(code)
            if max(codes) == FAILED:
                return _abort(snap, version, codes, code, err)
        if version and code == OPENED:
            try:
                if plan is None:
                    step, snap.stage_recorder.last_meta = snap.loader.load(
                        resp.segment_name, resp.manifest, version, snap.model, snap.optimizer,
                        snap.lr_scheduler, snap.extra_state)
                    snap.restored_method = "exact"
                else:
                    target = snap.providers.load_target(snap.extra_state)
                    step, snap.stage_recorder.last_meta = plan.load(
                        snap.model, snap.optimizer, snap.lr_scheduler, target)
                    snap.providers.take_restored(target, snap.extra_state)
                    snap.restored_method = ("exact" if plan.old_world == snap.world_size
                                            else "resharded")
                    snap.restored_from_world_size = plan.old_world
            except Exception as exc:
                code, err = FAILED, exc
        # A restore starts the job over from the agreed version: versions the previous
        # run delivered but never committed are dropped everywhere -- only now, once every
        # rank opened the agreed version (a node that missed its commit word still held
        # it), and before the last agreement, so no rank saves before every rank fenced.
        fenced = None
        try:
            snap._ensure_registered(restarting=True)
        except DaemonUnavailableError as exc:
            fenced = exc
        except Exception as exc:  # refused: fail with every rank, not alone
            code, err = FAILED, exc
        if verdict.collective or code == FAILED:  # a failed load fails every rank
            codes = verdict.outcomes(code)
            if max(codes) == FAILED:
                return _abort(snap, version, codes, code, err)
    finally:
        snap.segments.close()
    if fenced is not None:
        snap._unavailable("the fence after the restore", fenced)
    if version == 0:
        log.info("snapshotd: nothing to restore for job %s", job)
    elif code == OPENED and resp is not None:
        m, dt = resp.manifest, time.monotonic() - t0
        size = m.replicated_bytes + m.payload_bytes - m.slice_bytes
        log.info("snapshotd: restored job %s rank %d at step %d: %.1f MiB in %.2f s (%.0f MiB/s; "
                 "daemon open %.2f s, load %.2f s)", job, snap.rank, step, size / 2**20, dt,
                 size / 2**20 / max(dt, 1e-9), t_open - t0, time.monotonic() - t_open)
    return int(step)


def _open(snap, version: int):
    """Open what this rank loads of ``version``: (its own OpenShardResponse or None, and
    None for the exact rung, or an opened :class:`~snapshotd_client.reshard.Reshard`
    when the version was saved at another world size or holds DTensors)."""
    from snapshotd.wire.errors import DaemonUnavailableError
    from snapshotd_client.reshard import Reshard, stored_world_size

    rs = Reshard(snap.client, snap.segments, snap.cfg.job_id, snap.rank, snap.world_size)
    try:
        resp = snap.client.open_shard(snap.cfg.job_id, snap.rank, version)
    except DaemonUnavailableError:
        raise
    except Exception as exc:  # a rank the saving run did not have, or this rank's state lost
        if snap.rank == 0:
            raise
        try:
            m0 = snap.client.open_shard(snap.cfg.job_id, 0, version, no_copy=True).manifest
        except Exception:
            raise exc from None
        if snap.rank < stored_world_size(m0, snap.world_size):
            raise
        rs.open(version, None, snap.model, snap.optimizer)
        return None, rs
    m = resp.manifest
    if stored_world_size(m, snap.world_size) == snap.world_size and not any(
            e.global_shape for e in m.replicated_tensors):
        snap.loader.open_slices(m, version)
        return resp, None
    rs.open(version, resp, snap.model, snap.optimizer)
    return resp, rs


def _abort(snap, version: int, codes: list[int], code: int, err) -> int:
    """Every rank gives the restore up the same way: raises (some rank cannot load the
    version), or skips it and returns 0 (a daemon unreachable, ``on_daemon_unavailable=
    "warn"``: every rank starts over) -- never some ranks loading and others not."""
    from snapshotd.wire.errors import ConflictError, DaemonUnavailableError

    worst = max(codes)
    why = describe(codes, worst)
    if worst == UNAVAILABLE:
        if code != UNAVAILABLE:
            err = DaemonUnavailableError(f"restore of job {snap.cfg.job_id!r} skipped on every rank "
                                         f"({why})")
        snap._unavailable("restore", err)  # raises, or warns
        return 0
    if code != FAILED:
        err = ConflictError(f"restore of job {snap.cfg.job_id!r} version {version} given up on every "
                            f"rank ({why}): no rank loads it")
    raise err
