"""The save path without fixed costs (issue 16): staging segments acquired ahead by the
hand-off (AdoptShard's next_version), the host copy through cached views, the python RNG
state packed as a tensor. Real daemon, real shared memory; no timing here (bench/)."""

from __future__ import annotations

import mmap
import random

import pytest
import torch

from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire import manifest as mf
from snapshotd.wire.errors import InvalidRequestError
from snapshotd_client import layout as lo
from snapshotd_client import state as st
from snapshotd_client.device_copy import StagingCopier
from snapshotd_client.snapshotter import Snapshotter
from snapshotd_client.transport import DaemonClient


def _model(seed: int):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    return m, opt


def _train(m, opt) -> None:
    m(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()


def _snap(daemon, m, opt, job):
    return Snapshotter(m, opt, job_id=job, socket_path=daemon.socket, rank=0, world_size=1,
                       on_daemon_unavailable="raise", timeout_s=20)


def _count_acquires(snap) -> list[int]:
    asked = []
    real = snap.client.acquire_staging

    def spy(job_id, rank, version, nbytes, force=False):
        asked.append(version)
        return real(job_id, rank, version, nbytes, force)

    snap.client.acquire_staging = spy
    return asked


def _restored(daemon, job):
    m, opt = _model(99)
    with _snap(daemon, m, opt, job) as s:
        step = s.restore()
    return step, m


def _saves(daemon, job, steps, stage_ahead=True):
    """Save ``steps`` (each awaited) with training in between; (versions the trainer
    asked the daemon to stage itself, the last saved model state)."""
    m, opt = _model(0)
    with _snap(daemon, m, opt, job) as s:
        s.stage_ahead = stage_ahead
        asked = _count_acquires(s)
        for step in steps:
            _train(m, opt)
            assert s.save(step).result(20).version == step
        assert s.client.list_versions(job).latest_committed_version == steps[-1]
        return asked, {k: v.clone() for k, v in m.state_dict().items()}


def test_steady_saves_make_no_acquire_call_and_restore_bit_exact(daemon):
    for job, steps, ahead, want_asked in (
            # the first three saves set the interval; the hand-off of the third stages the fourth
            ("ahead", range(1, 8), True, [1, 2, 3]),
            ("asks", range(1, 8), False, list(range(1, 8))),  # the old way: every save asks
            # 8 was staged after 6 but 7 comes instead: asked for as usual; 9 is steady again
            ("offbeat", (2, 4, 6, 7, 8, 9), True, [2, 4, 6, 7, 8])):
        asked, want = _saves(daemon, job, list(steps), ahead)
        assert asked == want_asked, job
        step, back = _restored(daemon, job)
        assert step == list(steps)[-1]
        assert all(torch.equal(back.state_dict()[k], v) for k, v in want.items()), job


def _staged_manifest(c, job, version, payload):
    c.register_job(job, 1)
    r = c.acquire_staging(job, 0, version, len(payload))
    from snapshotd.wire import shm

    seg = shm.open_segment(r.segment_name, writable=True)
    seg.buf[:len(payload)] = payload
    seg.close()
    m = pb.ShardManifest(job_id=job, rank=0, version=version, payload_bytes=len(payload),
                         block_size_bytes=mf.DEFAULT_BLOCK_SIZE_BYTES, checksum_algo=mf.CHECKSUM_ALGO,
                         meta_json=st.dumps_meta({"replicated": None, "local": None}))
    return r.segment_name, m


def test_adopt_with_next_version(daemon):
    c = DaemonClient(f"unix:{daemon.socket}", timeout_s=20)
    try:
        name, m = _staged_manifest(c, "nextv", 1, b"x" * 1000)
        with pytest.raises(InvalidRequestError, match="next_version 1 is not newer"):
            c.adopt(name, m, next_version=1, next_payload_bytes=1000)
        assert c.list_versions("nextv").latest_committed_version == 0  # nothing changed
        r = c.adopt(name, m, next_version=2, next_payload_bytes=1000)
        assert r.committed and r.next_segment_name and r.next_segment_bytes >= 1000
        assert r.next_segment_name != name and not r.next_refused
        # a refusal of the second part does not undo the first
        name2, m2 = r.next_segment_name, pb.ShardManifest()
        m2.CopyFrom(m)
        m2.version = 2
        r2 = c.adopt(name2, m2, next_version=3, next_payload_bytes=1 << 50)
        assert r2.committed and not r2.next_segment_name
        assert "MemoryBudgetExceeded" in r2.next_refused
        assert c.list_versions("nextv").latest_committed_version == 2
    finally:
        c.close()


class _Seg:
    def __init__(self, size):
        self.name, self.size, self.buf = f"fake{size}", size, mmap.mmap(-1, size)


def _tensors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    return [base.t(),  # strided source
            torch.randn(7, generator=g).to(torch.bfloat16), torch.randint(-9, 9, (3, 3), dtype=torch.int8),
            torch.tensor(True), torch.zeros(0, 4), torch.tensor([float("nan"), -0.0, 1e-40]),
            torch.randn(4, dtype=torch.float64), torch.arange(5, dtype=torch.int64)]


def test_fast_host_copy_writes_what_pack_into_writes():
    ts = _tensors()
    rep = [(f"r{i}", t) for i, t in enumerate(ts[:5])]
    loc = [(f"l{i}", t) for i, t in enumerate(ts[5:])]
    lay = lo.plan_shard(rep, loc)
    fast, slow = _Seg(lay.payload_bytes), _Seg(lay.payload_bytes)
    c = StagingCopier()
    assert c.copy(fast, lay, ts[:5], ts[5:]) is None
    assert fast.name in c._views  # the fast path ran (and kept its views)
    lo.copy_slice(slow.buf, lay.replicated, ts[:5], 0, lay.replicated_bytes, lay.replicated_bytes)
    lo.copy_local(slow.buf, lay.local, ts[5:])
    assert fast.buf[:] == slow.buf[:]
    ts[0].mul_(2)  # the same views serve the next save, with the new values
    c.copy(fast, lay, ts[:5], ts[5:])
    lo.copy_slice(slow.buf, lay.replicated, ts[:5], 0, lay.replicated_bytes, lay.replicated_bytes)
    assert fast.buf[:] == slow.buf[:]
    c.unpin(fast)  # SegmentCache's on_close: nothing may point into the mapping after it
    assert fast.name not in c._views


def test_fast_host_copy_falls_back_for_conjugate_and_sliced_layouts():
    z = torch.randn(3, dtype=torch.complex64).conj()  # conjugate bit set: values must be resolved
    lay = lo.plan_shard([("z", z)], [])
    a, b = _Seg(lay.payload_bytes), _Seg(lay.payload_bytes)
    StagingCopier().copy(a, lay, [z], [])
    lo.copy_slice(b.buf, lay.replicated, [z], 0, lay.replicated_bytes, lay.replicated_bytes)
    assert a.buf[:] == b.buf[:]
    x = torch.arange(64, dtype=torch.float32)
    half = lo.plan_shard([("x", x)], [], dp_size=2, dp_rank=1)  # this rank stores a slice
    c = StagingCopier()
    seg = _Seg(half.payload_bytes)
    c.copy(seg, half, [x], [])
    assert not c._views
    assert bytes(seg.buf[:128]) == x[32:].numpy().tobytes()


def test_packed_python_rng_state_round_trips_and_bad_words_change_nothing():
    random.seed(5)
    d = st.capture_rng_state(packed=True)
    assert isinstance(d["python"][1], torch.Tensor) and d["python"][1].dtype == torch.int64
    meta, named = st.flatten_state(d)
    assert len(st.dumps_meta(meta)) < 2000  # 625 words travel as tensor bytes, not JSON
    back = st.unflatten_state(st.loads_meta(st.dumps_meta(meta)), [t.clone() for _, t in named])
    want = [random.random() for _ in range(3)]
    st.restore_rng_state(back)
    assert [random.random() for _ in range(3)] == want
    before = random.getstate()
    bad = dict(back, python=(back["python"][0], back["python"][1].to(torch.int32), None))
    with pytest.raises(ValueError, match="python RNG state words"):
        st.restore_rng_state(bad)
    assert random.getstate() == before
