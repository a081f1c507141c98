"""The job and the strategies the simulator compares, and what each strategy costs.

A :class:`Job` is the cluster side (nodes, GPUs, state bytes per node, NIC, host copy
and disk bandwidth, step time, nodes per failure domain). A strategy says how the job
protects its state:

* :class:`Snapshotd` -- snapshots every ``interval_s`` into host memory, Reed-Solomon
  parity over groups of ``group_size`` nodes with ``parity`` (m) parity rows, and a
  durable copy (written from host memory in the background) every ``durable_interval_s``;
* :class:`Replication` -- the same, but every snapshot is copied whole to ``replicas``
  other nodes (Gemini / NVRx style); for recoverability that is a code with k = 1;
* :class:`DiskCheckpoint` -- a synchronous checkpoint to shared storage every
  ``interval_s`` (:func:`young_daly` gives the classic interval);
* :class:`CheckFree` -- a pipeline job that keeps no snapshot of its stages: a lost
  stage is rebuilt from its neighbours (approximate: ``penalty_steps`` of extra
  training), with a durable checkpoint to fall back on.

:func:`costs` turns (job, strategy) into seconds and bytes: the training stall per save,
the background time until a save is committed, the restore times and the memory it needs
per node. Units: bytes, bytes per second, seconds. Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from snapshotd.wire.errors import InvalidRequestError

GB = 1e9


@dataclass(frozen=True)
class Job:
    nodes: int
    state_bytes_per_node: float
    gpus_per_node: int = 8
    nic_bytes_per_s: float = 50 * GB  # per node, what the peer plane may use (400 Gb/s)
    step_s: float = 10.0
    nodes_per_domain: int = 8  # nodes behind one switch / in one rack
    host_copy_bytes_per_s: float = 50 * GB  # device -> host copy of one node (all its GPUs)
    disk_bytes_per_s: float = 1 * GB  # this node's share of the shared storage's write rate
    memory_bytes_per_node: float = 0.0  # host memory snapshotd may use (0: unknown)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "nodes_per_domain"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("state_bytes_per_node", "nic_bytes_per_s", "step_s", "host_copy_bytes_per_s",
                     "disk_bytes_per_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
                raise InvalidRequestError(f"{name} must be a number > 0, got {v!r}")
        if not self.memory_bytes_per_node >= 0:
            raise InvalidRequestError("memory_bytes_per_node must be >= 0")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Snapshotd:
    group_size: int
    parity: int
    interval_s: float
    durable_interval_s: float

    @property
    def name(self) -> str:
        return f"snapshotd n={self.group_size} m={self.parity}"


@dataclass(frozen=True)
class Replication:
    replicas: int
    interval_s: float
    durable_interval_s: float

    @property
    def name(self) -> str:
        return f"replication x{self.replicas + 1}"


@dataclass(frozen=True)
class DiskCheckpoint:
    interval_s: float

    @property
    def name(self) -> str:
        return "disk checkpoint"


@dataclass(frozen=True)
class CheckFree:
    stages: int
    durable_interval_s: float
    penalty_steps: int = 50  # extra steps until the loss is back (bench_checkfree measures it)

    @property
    def name(self) -> str:
        return f"CheckFree ({self.stages} stages)"


Strategy = Snapshotd | Replication | DiskCheckpoint | CheckFree


@dataclass(frozen=True)
class Costs:
    interval_s: float  # compute between two saves (the snapshot interval)
    stall_s: float  # training stops this long per save
    commit_s: float  # after the stall, until the save is recoverable from memory
    durable_every: int  # every how many-th save is also made durable (0: none)
    durable_write_s: float  # background write of one durable copy
    restore_local_s: float  # the node's own memory (process restart)
    restore_peer_s: float  # a replacement node rebuilt from its peers
    restore_disk_s: float  # everything read back from shared storage
    memory_bytes: float  # host memory per node: two versions (committed + in flight), data + redundancy
    traffic_bytes: float  # bytes each node sends per save


def young_daly(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's first-order optimal checkpoint interval sqrt(2 C MTBF)."""
    if not checkpoint_s > 0 or not mtbf_s > 0:
        raise InvalidRequestError("young_daly needs checkpoint_s > 0 and mtbf_s > 0")
    return math.sqrt(2 * checkpoint_s * mtbf_s)


def _check_interval(what: str, v: float) -> float:
    if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
        raise InvalidRequestError(f"{what} must be a number of seconds > 0, got {v!r}")
    return float(v)


def _durable_every(interval: float, durable: float) -> int:
    return max(1, round(_check_interval("durable_interval_s", durable) / interval))


def costs(job: Job, s: Strategy) -> Costs:
    """What strategy ``s`` costs on ``job``; raises InvalidRequestError on a bad strategy."""
    st = job.state_bytes_per_node
    local = st / job.host_copy_bytes_per_s
    disk = st / job.disk_bytes_per_s
    if isinstance(s, Snapshotd):
        n, m = s.group_size, s.parity
        if not 0 <= m < n or job.nodes % n:
            raise InvalidRequestError(f"snapshotd: need 0 <= m < n and n dividing {job.nodes} nodes (n={n}, m={m})")
        k = n - m
        iv = max(_check_interval("interval_s", s.interval_s), job.step_s)
        # each data block goes to the m parity holders of its stripe; a replacement reads
        # k shards for each of its n/k * state bytes of data and parity.
        return Costs(iv, local, m * st / job.nic_bytes_per_s, _durable_every(iv, s.durable_interval_s), disk,
                     local, n * st / job.nic_bytes_per_s, disk, 2 * (1 + m / k) * st, m * st)
    if isinstance(s, Replication):
        r = s.replicas
        if r < 1 or job.nodes % (r + 1):
            raise InvalidRequestError(f"replication: need replicas >= 1 and replicas+1 dividing {job.nodes}")
        iv = max(_check_interval("interval_s", s.interval_s), job.step_s)
        return Costs(iv, local, r * st / job.nic_bytes_per_s, _durable_every(iv, s.durable_interval_s), disk,
                     local, st / job.nic_bytes_per_s, disk, 2 * (1 + r) * st, r * st)
    if isinstance(s, DiskCheckpoint):
        iv = max(_check_interval("interval_s", s.interval_s), job.step_s)
        return Costs(iv, disk, 0.0, 1, 0.0, disk, disk, disk, 0.0, st)
    if isinstance(s, CheckFree):
        if s.stages < 2 or job.nodes % s.stages:
            raise InvalidRequestError(f"CheckFree: need >= 2 stages dividing {job.nodes} nodes")
        # no snapshot at all: the "save" cycle is the durable checkpoint, synchronous
        iv = max(_check_interval("durable_interval_s", s.durable_interval_s), job.step_s)
        return Costs(iv, disk, 0.0, 1, 0.0, disk, st / job.nic_bytes_per_s, disk, 0.0, st)
    raise InvalidRequestError(f"unknown strategy {s!r}")
