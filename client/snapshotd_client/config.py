"""``SnapshotterConfig``: every option of the training-side Snapshotter, with its default.

Defaults come from the environment where a launcher sets them (``$SNAPSHOTD_JOB_ID``,
``$SNAPSHOTD_TOKEN``, ``$RANK`` / ``$WORLD_SIZE`` via :func:`default_rank_world`).
A plain dataclass: the Snapshotter validates and normalises it in its constructor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from snapshotd.wire import config as cfgmod
from snapshotd.wire import manifest as mf
from snapshotd.core.checkfree import CheckFreeSettings  # noqa: F401 (SnapshotterConfig.checkfree)


@dataclass
class SnapshotterConfig:
    job_id: str = field(default_factory=lambda: os.environ.get(cfgmod.ENV_JOB_ID, "default"))
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
    timeout_s: float = 30.0
    # Older snapshots still waiting for other ranks/nodes: wait this long for them to
    # commit (back-pressure), then give up the oldest (it was torn) and go on.
    inflight_wait_s: float = 10.0
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


def default_rank_world() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when it is initialised, else $RANK / $WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
