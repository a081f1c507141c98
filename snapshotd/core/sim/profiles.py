"""Failure profiles: how often a job is interrupted, by what cause, and what each cause takes.

A :class:`FailureProfile` gives the interruption rate of a job as a function of its GPU
count and a list of :class:`Cause`\\ s (share of interruptions, scope, repair time). The
scope decides what a failure takes with it:

* ``process``  -- the trainer process dies (software bug, NCCL timeout, a GPU reset);
  host memory survives, so a snapshot held by the node's daemon survives too;
* ``node``     -- the node is lost (GPU/HBM/host hardware, host maintenance): its
  memory is gone, a spare takes its place and rebuilds from its peers;
* ``domain``   -- a switch or cable fault takes a whole failure domain (the nodes behind
  one top-of-rack switch) at once.

Built-in profiles (the figures they are calibrated on, with their sources):

* :func:`llama3` -- Llama 3 405B pre-training, 16,384 H100 over 54 days: 419 unplanned
  interruptions (job MTBF 3.09 h), causes from the paper's Table 5 (faulty GPU 30.1 %,
  HBM3 17.2 %, software 12.9 %, network switch/cable 8.4 %, host maintenance 7.6 %, ...),
  > 90 % effective training time. The cause table has 18 rows summing to 95.4 %; the
  shares are renormalised.
* :func:`rsc` -- Meta's RSC clusters (Kokolis et al., HPCA'25): projected job MTTF 7.9 h
  at 1,024 GPUs and 1.8 h at 16,384; the rate is interpolated as a power law in the GPU
  count between (and beyond) those two points. Same cause mix as ``llama3``.

In both, ~75 % of interruptions need only a process restart (DLRover's figure): software
and NCCL causes always, GPU and host causes with the probability that makes the total 75 %
(``restart_fraction``). A few *lemon* nodes fail far more often than the rest
(``lemon_fraction`` of the nodes at ``lemon_factor`` times the rate) until they have
failed ``lemon_strikes`` times and are excluded; ``fail_slow_share`` of the events are a
node running slow (``slow_factor``) until detected after ``slow_detect_s``.

:func:`fault_kinds` turns a profile into (kind, relative rate) pairs for a fault
injector (e.g. the chaos harness's soak: kill the trainer, kill the daemon, kill a whole
domain, slow a node), so the injector and the simulator draw from one model. Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from snapshotd.wire.errors import InvalidRequestError

SCOPES = ("process", "node", "domain")


@dataclass(frozen=True)
class Cause:
    name: str
    share: float  # fraction of the interruptions (after renormalising)
    scope: str  # "node" causes may still be process-only: see FailureProfile.restart_fraction
    repair_s: float = 4 * 3600.0  # how long the failed node or domain stays out of the pool


# Llama 3 405B, Table 5 ("Root-cause categorization of unexpected interruptions"), % of 419.
LLAMA3_CAUSES: tuple[Cause, ...] = (
    Cause("faulty GPU", 30.1, "node"),
    Cause("GPU HBM3 memory", 17.2, "node"),
    Cause("software bug", 12.9, "process", 0.0),
    Cause("network switch/cable", 8.4, "domain", 2 * 3600.0),
    Cause("host maintenance", 7.6, "node", 8 * 3600.0),
    Cause("GPU SRAM memory", 4.5, "node"),
    Cause("GPU system processor", 4.1, "node"),
    Cause("NIC", 1.7, "node"),
    Cause("NCCL watchdog timeout", 1.7, "process", 0.0),
    Cause("silent data corruption", 1.4, "node"),
    Cause("GPU thermal interface/sensor", 1.4, "node"),
    Cause("SSD", 0.7, "node"),
    Cause("power supply", 0.7, "node"),
    Cause("server chassis", 0.5, "node"),
    Cause("IO expansion board", 0.5, "node"),
    Cause("dependency", 0.5, "process", 0.0),
    Cause("CPU", 0.5, "node"),
    Cause("system memory", 0.5, "node"),
)


@dataclass(frozen=True)
class FailureProfile:
    """Interruption rate and cause mix of a job; see the module docstring."""

    name: str
    ref_gpus: int  # the job size the MTBF was measured at
    ref_mtbf_s: float  # job MTBF at ref_gpus
    exponent: float = 1.0  # job rate ~ gpus ** exponent (1: every GPU fails independently)
    causes: tuple[Cause, ...] = LLAMA3_CAUSES
    restart_fraction: float = 0.75
    lemon_fraction: float = 0.005
    lemon_factor: float = 20.0
    lemon_strikes: int = 2
    fail_slow_share: float = 0.05  # extra events, relative to the interruptions
    slow_factor: float = 2.0
    slow_detect_s: float = 600.0
    restart_s: float = 600.0  # detect, reschedule, re-initialise the job (not reported: assumed)
    notes: str = ""
    _norm: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.causes:
            raise InvalidRequestError("a failure profile needs at least one cause")
        for c in self.causes:
            if c.scope not in SCOPES or c.share < 0 or c.repair_s < 0:
                raise InvalidRequestError(f"cause {c.name!r}: scope must be one of {SCOPES}, "
                                          "share and repair_s >= 0")
        for name, v, lo, hi in (("ref_gpus", self.ref_gpus, 1, None), ("ref_mtbf_s", self.ref_mtbf_s, 1e-9, None),
                                ("restart_fraction", self.restart_fraction, 0, 1),
                                ("lemon_fraction", self.lemon_fraction, 0, 1), ("lemon_factor", self.lemon_factor, 1, None),
                                ("fail_slow_share", self.fail_slow_share, 0, None),
                                ("slow_factor", self.slow_factor, 1, None), ("restart_s", self.restart_s, 0, None)):
            if not isinstance(v, (int, float)) or math.isnan(v) or v < lo or (hi is not None and v > hi):
                raise InvalidRequestError(f"failure profile {self.name!r}: {name}={v!r} out of range")
        total = sum(c.share for c in self.causes)
        if total <= 0:
            raise InvalidRequestError("failure profile: the cause shares sum to 0")
        object.__setattr__(self, "_norm", tuple(c.share / total for c in self.causes))

    def shares(self) -> tuple[float, ...]:
        """The causes' shares, summing to 1."""
        return self._norm

    def job_mtbf_s(self, gpus: int) -> float:
        """Mean time between interruptions of a job on ``gpus`` GPUs (lemons included)."""
        if gpus < 1:
            raise InvalidRequestError(f"gpus must be >= 1, got {gpus}")
        return self.ref_mtbf_s * (self.ref_gpus / gpus) ** self.exponent

    def process_prob(self) -> dict[str, float]:
        """Per cause: the probability that one of its interruptions needs only a process
        restart. Process-scope causes: 1; domain causes: 0; node causes: the value that
        makes the overall share ``restart_fraction`` (capped to 0..1)."""
        sh = self.shares()
        proc = sum(s for s, c in zip(sh, self.causes) if c.scope == "process")
        node = sum(s for s, c in zip(sh, self.causes) if c.scope == "node")
        x = 0.0 if node <= 0 else min(1.0, max(0.0, (self.restart_fraction - proc) / node))
        return {c.name: (1.0 if c.scope == "process" else x if c.scope == "node" else 0.0) for c in self.causes}


def llama3(**overrides) -> FailureProfile:
    """Llama 3 405B: 419 interruptions in 54 days on 16,384 H100 (MTBF 3.09 h)."""
    base = FailureProfile("llama3", 16384, 54 * 86400 / 419, 1.0, LLAMA3_CAUSES,
                          notes="Llama 3 405B, 16,384 H100, 54 days, 419 unplanned interruptions")
    return replace(base, **overrides) if overrides else base


def rsc(**overrides) -> FailureProfile:
    """Meta RSC (HPCA'25): job MTTF 7.9 h at 1,024 GPUs, 1.8 h at 16,384 (power law between)."""
    exponent = math.log(7.9 / 1.8) / math.log(16384 / 1024)
    base = FailureProfile("rsc", 1024, 7.9 * 3600, exponent, LLAMA3_CAUSES,
                          notes="Meta RSC: MTTF 7.9 h at 1,024 GPUs, 1.8 h at 16,384")
    return replace(base, **overrides) if overrides else base


def custom(mtbf_h_per_gpu: float, *, domain_share: float = 0.084, process_share: float = 0.75,
           restart_s: float = 600.0, name: str = "custom") -> FailureProfile:
    """A profile from your own rates: the mean time between failures of ONE GPU (hours),
    the share of failures that take a whole domain, and the share a process restart fixes."""
    if not mtbf_h_per_gpu > 0 or not 0 <= domain_share <= 1 or not 0 <= process_share <= 1:
        raise InvalidRequestError("custom profile: need mtbf_h_per_gpu > 0 and shares in 0..1")
    if domain_share + process_share > 1:
        raise InvalidRequestError("custom profile: domain_share + process_share must be <= 1")
    causes = (Cause("process", process_share, "process", 0.0),
              Cause("node", max(0.0, 1 - process_share - domain_share), "node"),
              Cause("domain", domain_share, "domain", 2 * 3600.0))
    causes = tuple(c for c in causes if c.share > 0)
    return FailureProfile(name, 1, mtbf_h_per_gpu * 3600, 1.0, causes, restart_fraction=process_share,
                          restart_s=restart_s, notes=f"GPU MTBF {mtbf_h_per_gpu:g} h")


PROFILES = {"llama3": llama3, "rsc": rsc}


def profile(name: str) -> FailureProfile:
    """A built-in profile by name."""
    try:
        return PROFILES[name]()
    except KeyError:
        raise InvalidRequestError(f"unknown failure profile {name!r} (built in: {', '.join(PROFILES)})") from None


def fault_kinds(p: FailureProfile) -> list[tuple[str, float]]:
    """[(kind, relative rate)] summing to 1, for a fault injector: ``kill_trainer``
    (a process restart), ``kill_node`` (daemon and trainer: the node's memory is lost),
    ``kill_domain`` (every node of one failure domain at once) and ``slow_node``."""
    pp = p.process_prob()
    acc = {"kill_trainer": 0.0, "kill_node": 0.0, "kill_domain": 0.0}
    for s, c in zip(p.shares(), p.causes):
        if c.scope == "domain":
            acc["kill_domain"] += s
        else:
            acc["kill_trainer"] += s * pp[c.name]
            acc["kill_node"] += s * (1 - pp[c.name])
    acc["slow_node"] = p.fail_slow_share
    total = sum(acc.values())
    return [(k, v / total) for k, v in acc.items()]
