"""``SnapshotterConfig``: every option of the training-side Snapshotter, with its default.

Defaults come from the environment where a launcher sets them (``$SNAPSHOTD_TOKEN``,
``$RANK`` / ``$WORLD_SIZE`` via :func:`default_rank_world`, the job id via
:func:`resolve_job_id`). A plain dataclass: the Snapshotter validates and normalises it
in its constructor (``job_id=None`` is resolved there, and refused when nothing names
the job).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

import torch

from snapshotd.wire import config as cfgmod
from snapshotd.wire import manifest as mf
from snapshotd.core.checkfree import CheckFreeSettings  # noqa: F401 (SnapshotterConfig.checkfree)


@dataclass
class SnapshotterConfig:
    # None: from the launcher (resolve_job_id); a run no launcher names needs one explicitly.
    job_id: str | None = None
    rank: int | None = None  # default: torch.distributed rank, else $RANK, else 0
    world_size: int | None = None  # ranks of the job
    local_world_size: int | None = None  # ranks on this node (default $LOCAL_WORLD_SIZE, else all)
    # REFT-style: model and optimizer are identical on the data-parallel ranks, so each
    # stores only its 1/DP slice; restore gathers the slices from every DP rank.
    shard_replicated: bool = False
    dp_ranks: tuple[int, ...] | None = None  # the DP group's global ranks (default: all)
    socket_path: str | None = None  # default: $SNAPSHOTD_SOCKET or the daemon's default
    address: str | None = None  # "host:port" instead of a socket (needs a token)
    token: str | None = field(default_factory=lambda: os.environ.get(cfgmod.ENV_TOKEN))
    on_daemon_unavailable: str = "warn"  # or "raise"
    block_size_bytes: int = mf.DEFAULT_BLOCK_SIZE_BYTES
    checksum_on_client: bool = False  # end-to-end checksums computed by the trainer
    # Incremental snapshots (docs/INCREMENTAL.md): frozen parameters (requires_grad=False,
    # not in the optimizer) unchanged since their last copy into a reused staging segment
    # are not copied again, and the daemon hashes only the blocks written. Off by default:
    # it trusts that frozen parameters are written only through torch ops that bump their
    # version counter (never through .data, numpy views or raw pointers). No effect with
    # shard_replicated.
    incremental: bool = False
    timeout_s: float = 30.0
    # Older snapshots still waiting for other ranks/nodes: wait this long for them to
    # commit (back-pressure), then give up the oldest (it was torn) and go on.
    inflight_wait_s: float = 10.0
    # What a save does when this rank's staging slots all hold versions that have not
    # committed yet (the pipeline behind: a slow or shared link, a peer rebuilding):
    # "wait" (default) waits up to inflight_wait_s as above; "skip" skips this step's
    # snapshot at once and keeps the versions in flight, so the snapshot interval
    # stretches to what the daemons can carry and the training step never waits for
    # them (the bounded-slowdown mode for a network the job shares, docs/SHAPED.md).
    when_busy: str = field(default_factory=lambda: os.environ.get(cfgmod.ENV_WHEN_BUSY, "wait"))
    # Pipeline parallelism (for CheckFree): (stage index, number of stages) of this rank;
    # on the first / last stage the names of its embedding / de-embedding parameters
    # (edge_layers: never averaged, restored from the copies on the partner), and on a
    # CheckFree+ swap partner the names of its copies of them (edge_copies, see
    # snapshotd.core.checkfree). Each save records them in the rank's local state.
    pipeline_stage: tuple[int, int] | None = None
    edge_copies: tuple[str, ...] = ()
    edge_layers: tuple[str, ...] = ()
    # CheckFree rung of restore() (needs pipeline_stage): when this rank's own shard cannot
    # be opened or rebuilt (FAILED_PRECONDITION), rebuild the stage approximately from its
    # neighbours (snapshotd_client.checkfree_restore). None: disabled, the error propagates.
    # A neighbour stored with shard_replicated=True is gathered from its DP ranks' slices.
    checkfree: "CheckFreeSettings | None" = None
    stage_ranks: tuple[int, ...] | None = None  # rank of each stage (default: rank == stage)
    checkfree_sources: dict[int, str] | None = None  # rank -> daemon target to fetch it from
    # The last rung of restore() (snapshotd_client.durable, docs/DURABLE.md): the daemons'
    # --durable-url, where the newest verified durable checkpoint is loaded from when RAM,
    # parity and CheckFree cannot restore. None: $SNAPSHOTD_DURABLE_URL, else no durable rung.
    durable_url: str | None = field(default_factory=lambda: os.environ.get(cfgmod.ENV_DURABLE_URL))


def default_rank_world() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when it is initialised, else $RANK / $WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class JobIdentityError(ValueError):
    """No job id given and no launcher in the environment names the job."""


# Where a job id comes from when none is passed, most stable first: an explicit id, then
# the outermost scheduler (its id survives the relaunches of the launchers inside it: a
# Kubernetes pod retry starts a new `torchrun --standalone` with a new run id, and the
# Slurm example retries torchrun with a new --rdzv-id), then torchrun's own run id (the
# same across its --max-restarts).
JOB_ID_SOURCES = (
    ("SNAPSHOTD_JOB_ID", ""),  # explicit (cfgmod.ENV_JOB_ID)
    ("SNAPSHOTD_K8S_JOB_NAME", "k8s-"),  # set from the downward API, see the README
    ("SLURM_JOB_ID", "slurm-"),  # the same across `scontrol requeue` and every srun step
    ("TORCHELASTIC_RUN_ID", "torchrun-"),  # torchrun --rdzv-id; "none" (its default) is no id
)
_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def _job_id_from(raw: str, prefix: str) -> str:
    """``prefix + raw`` made a valid job id: other characters become '-', and an id over
    64 characters keeps its first 55 plus 8 hex digits of its hash (still unique)."""
    jid = prefix + _BAD.sub("-", raw.strip())
    if len(jid) > 64:
        jid = f"{jid[:55]}-{hashlib.sha256(jid.encode()).hexdigest()[:8]}"
    if not jid[0].isalnum():
        jid = "j" + jid[1:]
    return jid


def resolve_job_id(environ=None) -> tuple[str, str]:
    """(job id, the variable it came from) from the environment; JobIdentityError when
    none of ``JOB_ID_SOURCES`` is set. Every rank of a job must get the same id, and a
    relaunch of the same job too: that is what lets a restarted run restore."""
    env = os.environ if environ is None else environ
    for name, prefix in JOB_ID_SOURCES:
        raw = (env.get(name) or "").strip()
        if not raw or (name == "TORCHELASTIC_RUN_ID" and raw == "none"):
            continue
        if name == "SNAPSHOTD_JOB_ID":
            return mf.validate_job_id(raw), name
        return _job_id_from(raw, prefix), name
    raise JobIdentityError(
        "snapshotd: no job id. Pass Snapshotter(..., job_id=\"my-run\") or set "
        "$SNAPSHOTD_JOB_ID; under a launcher it is taken from $SNAPSHOTD_K8S_JOB_NAME "
        "(Kubernetes, set it from the downward API), $SLURM_JOB_ID or $TORCHELASTIC_RUN_ID "
        "(torchrun). The same id on a relaunch resumes that job's last snapshot; a new id "
        "starts fresh.")
