"""Incremental snapshots (issue 16, docs/INCREMENTAL.md): frozen parameters a reused
staging segment already holds are not copied again, the daemon hashes only the blocks
written, and every restore is still bit-exact. Real daemons, real shared memory, real
torch training; no timing here (bench/bench_lora.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire import manifest as mf
from snapshotd.wire.errors import InvalidRequestError
from snapshotd_client.snapshotter import Snapshotter

BS = 16 << 10  # small blocks: a changed adapter dirties few of them


class LoRALinear(torch.nn.Module):
    """A frozen base weight plus a trained low-rank update (B @ A)."""

    def __init__(self, n: int, r: int = 2):
        super().__init__()
        self.base = torch.nn.Linear(n, n)
        self.base.requires_grad_(False)
        self.A = torch.nn.Parameter(torch.randn(r, n) * 0.01)
        self.B = torch.nn.Parameter(torch.zeros(n, r))

    def forward(self, x):
        return self.base(x) + x @ self.A.t() @ self.B.t()


def _model(seed: int, n: int = 96, layers: int = 4, fused: bool = False):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(*[LoRALinear(n) for _ in range(layers)], torch.nn.BatchNorm1d(n))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    return m, opt


def _train(m, opt, n: int = 96) -> None:
    m(torch.randn(8, n)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _snap(daemon, m, opt, job, incremental=True, **kw):
    return Snapshotter(m, opt, job_id=job, socket_path=daemon.socket, rank=0, world_size=1,
                       on_daemon_unavailable="raise", timeout_s=20, block_size_bytes=BS,
                       incremental=incremental, **kw)


def _state(m, opt) -> dict:
    out = {f"model/{k}": v.clone() for k, v in m.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        out.update({f"opt/{i}/{k}": v.clone() for k, v in s.items()})
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8)
                                                        if a[k].dim() else a[k], b[k].view(-1).view(torch.uint8)
                                                        if b[k].dim() else b[k]), k


def _live_bytes(m, opt) -> dict:
    """The replicated tensors of a save of (m, opt) by their snapshot names, as bytes."""
    out = {f"model/{k}": v for k, v in m.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"optimizer/state/{i}/{k}": v for k, v in st.items()})
    return {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.dim() else
            v.reshape(1).view(torch.uint8).numpy().tobytes() for k, v in out.items()}


def _check_committed(daemon, job, m, opt, version: int) -> None:
    """The daemon's committed shard holds exactly the live bytes of every tensor."""
    man, buf = daemon.client().fetch_shard(job, 0)
    assert man.version == version
    got = {e.name: bytes(buf[e.offset:e.offset + e.nbytes]) for e in man.replicated_tensors}
    live = _live_bytes(m, opt)
    assert got.keys() == live.keys()
    stale = [k for k in live if got[k] != live[k]]
    assert not stale, f"version {version}: stale in the snapshot: {stale}"


def _restored(daemon, job, **kw) -> tuple[int, dict]:
    m, opt = _model(99, **kw)
    with _snap(daemon, m, opt, job) as s:
        step = s.restore()
    return step, _state(m, opt)


def _frozen_bytes(m) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)


def test_frozen_weights_are_not_copied_changed_ones_are_and_restore_is_bit_exact(daemon):
    m, opt = _model(0)
    frozen = _frozen_bytes(m)
    with _snap(daemon, m, opt, "lora") as s:
        stats = []
        for step in range(1, 9):
            _train(m, opt)
            stats.append(s.save(step).result(20))
        live = _state(m, opt)
    # Each staging segment is filled whole the first time; afterwards only what changed.
    assert stats[0].bytes_copied >= frozen and stats[0].tensors_skipped == 0
    warm = [x for x in stats if x.tensors_skipped]
    assert len(warm) >= 4, [(x.version, x.tensors_skipped) for x in stats]
    for x in warm:
        assert x.tensors_skipped == 8 and x.bytes_skipped == frozen  # 4 weights, 4 biases
        assert x.bytes_copied + x.bytes_skipped <= x.bytes
        assert x.bytes_copied < 0.2 * x.bytes
        assert 0 < x.bytes_hashed < 0.5 * x.bytes  # the daemon hashed the dirty blocks only
    step, got = _restored(daemon, "lora")
    assert step == 8
    _assert_same(got, live)


def test_in_place_change_to_a_frozen_weight_is_captured(daemon):
    """The test that fails when detection is wrong: a "frozen" weight changed in place
    (no_grad add_, load_state_dict) after the segments are warm must be in the snapshot."""
    m, opt = _model(1)
    with _snap(daemon, m, opt, "poke") as s:
        for step in range(1, 7):
            _train(m, opt)
            s.save(step).result(20)
        with torch.no_grad():
            m[0].base.weight[3, 5] += 1.0  # a view's in-place op bumps the shared counter
        sd = m[2].state_dict()
        sd["base.bias"] = sd["base.bias"] + 0.5
        m[2].load_state_dict(sd)
        skipped = []
        for step in range(7, 12):  # every segment of the ring gets the change
            skipped.append(s.save(step).result(20).tensors_skipped)
            _check_committed(daemon, "poke", m, opt, step)
        live = _state(m, opt)
    # copied again: weight 0 and all of layer 2 (load_state_dict copies into every tensor)
    assert skipped[0] == 5 and skipped[-1] == 8, skipped
    step, got = _restored(daemon, "poke")
    assert step == 11
    _assert_same(got, live)


def test_fused_adamw_and_batchnorm_stay_exact(daemon):
    """Fused AdamW on CPU writes parameters and moments, and BatchNorm its running
    statistics, without bumping their version counters: none of them is ever a candidate,
    so the snapshot has them right anyway."""
    m, opt = _model(2, fused=True)
    w = m[0].A.detach()
    v0, ra, rv = w._version, m[-1].running_mean.detach(), m[-1].running_mean._version
    with _snap(daemon, m, opt, "fused") as s:
        for step in range(1, 8):
            _train(m, opt)
            s.save(step).result(20)
        live = _state(m, opt)
    assert w._version == v0 and ra._version == rv  # what makes them unsafe to skip (torch 2.13)
    step, got = _restored(daemon, "fused", fused=True)
    assert step == 7
    _assert_same(got, live)
