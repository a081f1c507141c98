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
    # with the client's own checksums: the daemon checks the dirty blocks and that the
    # others' checksums are those it keeps from the segment's last adoption
    with _snap(daemon, m, opt, "poke", checksum_on_client=True) as s:
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
            x = s.save(step).result(20)
            skipped.append(x.tensors_skipped)
            assert x.bytes_hashed < x.bytes or not x.tensors_skipped, x
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


_CHILD = r"""
import hashlib, json, os, signal, sys
sys.path.insert(0, sys.argv[2])
import torch
import test_incremental as ti
m, opt = ti._model(3)
s = ti._snap(type("D", (), {"socket": sys.argv[1]}), m, opt, "crash")
for step in range(1, 8):
    ti._train(m, opt)
    stats = s.save(step).result(20)
print(json.dumps({"skipped": stats.tensors_skipped,
                  "digests": {k: hashlib.sha256(v).hexdigest() for k, v in ti._live_bytes(m, opt).items()}}),
      flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no clean exit
"""


def test_restore_after_a_trainer_crash_is_bit_exact(daemon):
    p = subprocess.run([sys.executable, "-c", _CHILD, daemon.socket, os.path.dirname(__file__)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    want = json.loads(p.stdout.strip().splitlines()[-1])
    assert want["skipped"] == 8  # the last save was incremental
    m, opt = _model(99)
    with _snap(daemon, m, opt, "crash") as s:
        assert s.restore() == 7
    got = {k: hashlib.sha256(v).hexdigest() for k, v in _live_bytes(m, opt).items()}
    assert got == want["digests"]


def _payload(seed: int, n: int) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()


def _adopt(c, job, version, writer, data, hint=None):
    """Stage ``data`` as ``version`` through AcquireStaging/AdoptShard; (name, token, reply)."""
    r = c.acquire_staging(job, 0, version, len(data), writer_id=writer)
    from snapshotd.wire import shm
    seg = shm.open_segment(r.segment_name, writable=True)
    try:
        seg.buf[:len(data)] = data
    finally:
        seg.close()
    m = pb.ShardManifest(job_id=job, rank=0, version=version, payload_bytes=len(data),
                         block_size_bytes=BS, checksum_algo=mf.CHECKSUM_ALGO)
    return r.segment_name, r.content_token, c.adopt(r.segment_name, m, writer_id=writer, hint=hint)


def test_content_token_names_one_writers_bytes_and_the_hint_is_checked(daemon_factory):
    """The daemon's guarantee: a segment's token stays the same only while one writer id is
    its only writer; anything else (another writer, an unnamed one, a restarted daemon)
    gets a new token, and a hint on a stale base is not used (every block hashed)."""
    d = daemon_factory().start()
    c = d.client()
    c.register_job("tok", 1)
    n = 4 * BS
    tokens, names = {}, {}
    for v in (1, 2, 3, 4):
        names[v], tokens[v], _ = _adopt(c, "tok", v, "A", _payload(v, n))
    # One daemon commits each version at once: the two segments of the ring alternate.
    assert names[3] == names[1] != names[2] == names[4], names
    assert tokens[3] == tokens[1] and tokens[4] == tokens[2]  # same writer: same token
    # Version 5 lands where 3 was adopted; only block 2 written: one block hashed, and the
    # checksums kept for the others are right (FetchShard verifies every block).
    data = bytearray(_payload(3, n))
    data[2 * BS:3 * BS] = _payload(50, BS)
    hint = pb.IncrementalHint(base_version=3, content_token=tokens[3], dirty_blocks=bytes([0b100]))
    name5, tok5, r5 = _adopt(c, "tok", 5, "A", bytes(data), hint)
    assert (name5, tok5, r5.bytes_hashed, r5.committed) == (names[3], tokens[3], BS, True)
    assert bytes(c.fetch_shard("tok", 0, 5)[1]) == bytes(data)
    # A stale base (that segment's last adoption was 4, not 2): every block hashed.
    stale = pb.IncrementalHint(base_version=2, content_token=tokens[4], dirty_blocks=b"\x00")
    _, _, r6 = _adopt(c, "tok", 6, "A", _payload(4, n), stale)
    assert r6.bytes_hashed == n and r6.committed
    # A hint whose bitmap has the wrong length: refused, nothing delivered.
    r = c.acquire_staging("tok", 0, 7, n, writer_id="A")
    bad = pb.IncrementalHint(base_version=5, content_token=r.content_token, dirty_blocks=b"\x01\x00")
    m = pb.ShardManifest(job_id="tok", rank=0, version=7, payload_bytes=n, block_size_bytes=BS,
                         checksum_algo=mf.CHECKSUM_ALGO)
    with pytest.raises(InvalidRequestError, match="bitmap"):
        c.adopt(r.segment_name, m, writer_id="A", hint=bad)
    assert c.list_versions("tok").latest_committed_version == 6
    # Another writer, or none, on that segment: a new token each time.
    t_b = c.acquire_staging("tok", 0, 7, n, writer_id="B").content_token
    t_none = c.acquire_staging("tok", 0, 7, n).content_token
    t_a = c.acquire_staging("tok", 0, 7, n, writer_id="A").content_token
    t_big = c.acquire_staging("tok", 0, 7, 2 * n, writer_id="A").content_token  # a new segment
    assert len({r.content_token, t_b, t_none, t_a, t_big}) == 5
    with pytest.raises(InvalidRequestError, match="writer_id"):
        c.acquire_staging("tok", 0, 7, n, writer_id="x" * 65)
    # A restarted daemon: every segment's token is new.
    c.close()
    d.kill()
    d.start()
    c = d.client()
    c.register_job("tok", 1)
    after = c.acquire_staging("tok", 0, 7, n, writer_id="A").content_token
    assert after not in set(tokens.values()) | {t_a, t_big, tok5}
    c.close()


def test_daemon_restart_means_a_full_copy_then_incremental_again(daemon):
    m, opt = _model(4)
    with _snap(daemon, m, opt, "restart") as s:
        for step in range(1, 6):
            _train(m, opt)
            s.save(step).result(20)
        daemon.kill()
        daemon.start()
        s._registered = False  # (a save would find out by failing; this test does not wait)
        skipped = []
        for step in range(6, 12):
            _train(m, opt)
            skipped.append(s.save(step).result(20).tensors_skipped)
            _check_committed(daemon, "restart", m, opt, step)
    assert skipped[0] == 0 and skipped[-1] == 8, skipped


def test_only_frozen_parameters_alone_on_their_storage_are_candidates():
    """The tracker's candidate rule, without a daemon: trainable parameters, buffers,
    optimizer state and anything sharing a storage with them are never skipped."""
    from snapshotd_client.incremental import IncrementalTracker

    m, opt = _model(5)
    _train(m, opt)
    m[1].base.register_buffer("alias", m[1].base.weight.detach()[0])  # shares a frozen storage
    sd = m.state_dict()
    rep = list(sd.values()) + [v for st in opt.state_dict()["state"].values() for v in st.values()]
    got = IncrementalTracker(m, opt).frozen_mask(rep)
    mask = dict(zip(sd, got))
    assert mask["0.base.weight"] and mask["3.base.bias"]
    assert not mask["1.base.weight"] and not mask["1.base.alias"]  # a buffer on its storage
    assert not any(mask[k] for k in sd if ".A" in k or ".B" in k or k.startswith("4."))
    assert len(got) == len(rep) > len(sd) and not any(got[len(sd):])  # optimizer state
    # No incremental with shard_replicated: every DP rank must lay its payload out alike.
    for shard, want in ((False, True), (True, False)):
        s = Snapshotter(m, opt, job_id="x", socket_path="/nonexistent", rank=0, world_size=1,
                        incremental=True, shard_replicated=shard)
        assert (s.incremental is not None, bool(s.writer_id)) == (want, want)
        s.close()
    # Records of segments no longer in the ring are dropped (they hold tensor references).
    from snapshotd_client import incremental as inc

    tr = IncrementalTracker(m, opt)
    for i in range(inc._MAX_RECORDS + 3):
        tr.plan(f"seg{i}", object(), 7, rep, got)
    assert tr.tracked() == tuple(f"seg{i}" for i in range(3, inc._MAX_RECORDS + 3))
