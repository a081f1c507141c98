"""The save path's caches (issue 16, per-save fixed cost): FlatCache (the walk of the
state), PackedRngCapture (python's RNG words), the hand-off thread. Each cache must give
exactly what a fresh walk gives, whatever changed since the last save: a new param
group, optimizer state appearing after the first step, a provider returning another
type, a tensor replaced by a new one of the same shape, the LR, the RNGs. The unit tests
compare with ``flatten_state``/``dumps_meta`` and check that the cache was used (hits);
the last test does it through a Snapshotter and a real daemon, and restores."""

from __future__ import annotations

import mmap
import random
import threading
from collections import OrderedDict, defaultdict

import numpy as np
import pytest
import torch

from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd_client import layout as lo
from snapshotd_client import state as st
from snapshotd_client.device_copy import StagingCopier
from snapshotd_client.flatcache import FlatCache, compose_meta_json
from snapshotd_client.snapshotter import Snapshotter
from snapshotd_client.worker import HandoffWorker


def _same_as_fresh(fc: FlatCache, obj) -> None:
    meta, named = fc.flatten(obj)
    want_meta, want = st.flatten_state(obj)
    assert meta.json() == st.dumps_meta(want_meta)
    assert [n for n, _ in named] == [n for n, _ in want]
    for (_, a), (_, b) in zip(named, want):  # the same tensors (numpy arrays: new ones)
        assert a is b or (a.dtype == b.dtype and torch.equal(a, b))


def _model(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def _step(m, opt) -> None:
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def _rep(m, opt) -> dict:
    return {"model": m.state_dict(), "optimizer": opt.state_dict()}


def test_unchanged_structure_hits_and_equals_a_fresh_walk():
    m, opt = _model()
    _step(m, opt)
    fc = FlatCache()
    for _ in range(3):
        _same_as_fresh(fc, _rep(m, opt))
    assert (fc.hits, fc.misses) == (2, 1)


def test_optimizer_state_appearing_after_the_first_step_and_a_new_param_group():
    m, opt = _model()
    fc = FlatCache()
    _same_as_fresh(fc, _rep(m, opt))  # no optimizer state yet
    _step(m, opt)
    _same_as_fresh(fc, _rep(m, opt))  # state for every parameter now
    _same_as_fresh(fc, _rep(m, opt))
    assert fc.hits == 1
    extra = torch.nn.Linear(2, 2)
    opt.add_param_group({"params": list(extra.parameters()), "lr": 5e-3})
    _same_as_fresh(fc, _rep(m, opt))
    assert fc.misses == 3


def test_lr_and_other_scalars_change_without_a_new_template():
    m, opt = _model()
    _step(m, opt)
    fc = FlatCache()
    _same_as_fresh(fc, _rep(m, opt))
    for lr in (3e-3, 0.0, -0.0, float("nan"), float("inf"), 7):  # 7: int where a float was
        opt.param_groups[0]["lr"] = lr
        _same_as_fresh(fc, _rep(m, opt))
    opt.param_groups[0]["betas"] = (0.5, 0.25)
    _same_as_fresh(fc, _rep(m, opt))
    assert fc.misses == 2  # a new template only for the int where a float was


def test_a_tensor_replaced_by_a_new_one_of_the_same_shape_is_the_one_saved():
    m, opt = _model()
    _step(m, opt)
    fc = FlatCache()
    _same_as_fresh(fc, _rep(m, opt))
    new = torch.nn.Parameter(torch.full_like(m[0].weight, 7.0))
    m[0].weight = new
    opt.state[opt.param_groups[0]["params"][0]]["exp_avg"] = torch.ones(3, 4)
    rep = _rep(m, opt)
    _same_as_fresh(fc, rep)
    _, named = fc.flatten(rep)
    got = dict(named)
    assert torch.equal(got["model/0.weight"], new.detach())
    assert torch.equal(got["optimizer/state/0/exp_avg"], torch.ones(3, 4))
    assert fc.misses == 1


def test_a_tensor_met_twice_or_no_longer_twice_changes_the_indices():
    a, b = torch.ones(2), torch.zeros(2)
    fc = FlatCache()
    _same_as_fresh(fc, {"x": a, "y": b})
    _same_as_fresh(fc, {"x": a, "y": a})  # tied: stored once
    _same_as_fresh(fc, {"x": a, "y": a})
    _same_as_fresh(fc, {"x": b, "y": a})
    assert fc.hits == 1


@pytest.mark.parametrize("values", [
    [1.5, 2, True, None, "s", b"x", torch.ones(1), [1.5], (1.5,), {"v": 1.5},
     np.float32(1.5), np.int64(3), np.ones(2, dtype=np.float32), np.ones(2), 1 << 70],
])
def test_a_provider_returning_another_type(values):
    fc = FlatCache()
    for v in values + values[::-1]:
        _same_as_fresh(fc, {"extra": {"p": {"value": v, "device": None}}, "step": 3})


def test_keys_of_other_types_and_unsupported_values_are_what_a_fresh_walk_gives():
    class S(str):
        pass

    fc = FlatCache()
    for obj in ({1: torch.ones(1)}, {True: torch.ones(1)}, {"__tensor__": 1}, {None: 2},
                OrderedDict(a=1), {"a": 1}):
        _same_as_fresh(fc, obj)
    od = OrderedDict(a=torch.ones(1))
    od._metadata = OrderedDict(x={"version": 1})
    _same_as_fresh(fc, od)
    od._metadata = OrderedDict(x={"version": True})
    _same_as_fresh(fc, od)
    _same_as_fresh(fc, {"a": 1})
    before = fc.misses
    for _ in range(2):  # a dict subclass: no template, a full walk every time
        _same_as_fresh(fc, {"a": defaultdict(int, x=1)})
    assert fc.misses == before + 2
    for bad in ({S("a"): 1}, {"a": object()}, {"a": np.array(["s"])}):
        with pytest.raises(TypeError):
            fc.flatten(bad)


def test_rng_capture_follows_every_generator():
    cap = st.PackedRngCapture()
    first = cap()
    assert cap()["python"][1] is first["python"][1]  # unchanged words: the same tensor
    random.random()
    np.random.rand()
    torch.rand(1)
    now, fresh = cap(), st.capture_rng_state(packed=True)
    assert torch.equal(now["python"][1], fresh["python"][1])
    assert not torch.equal(now["python"][1], first["python"][1])
    assert now["python"][2] == fresh["python"][2]
    assert np.array_equal(now["numpy"][1], fresh["numpy"][1]) and now["numpy"][2] == fresh["numpy"][2]
    assert torch.equal(now["torch"], fresh["torch"])


def test_handoff_worker_runs_in_order_and_hands_back_errors():
    w = HandoffWorker("t-handoff")
    seen = []
    futs = [w.submit(seen.append, i) for i in range(5)]
    bad = w.submit(lambda: 1 / 0)
    assert [f.result(10) for f in futs] == [None] * 5 and seen == list(range(5))
    with pytest.raises(ZeroDivisionError):
        bad.result(10)
    assert w.submit(threading.current_thread).result(10).name == "t-handoff"
    w.shutdown()
    with pytest.raises(RuntimeError):
        w.submit(print)


def test_snapshotter_manifests_follow_every_change_and_restore(daemon):
    m, opt = _model(1)
    box = [1.5]
    snap = Snapshotter(m, opt, job_id="fastj", socket_path=daemon.socket, rank=0, world_size=1,
                       on_daemon_unavailable="raise", timeout_s=20, state={"p": lambda: box[0]})
    sent = []
    real = snap.client.adopt

    def spy(name, manifest, *a, **k):  # the Snapshotter hands the manifest serialized
        sent.append(pb.ShardManifest.FromString(manifest).meta_json)
        return real(name, manifest, *a, **k)

    snap.client.adopt = spy
    extra = torch.nn.Linear(2, 2)
    changes = [lambda: None, lambda: _step(m, opt),
               lambda: opt.param_groups[0].__setitem__("lr", 3e-3),
               lambda: opt.add_param_group({"params": list(extra.parameters())}),
               lambda: setattr(m[0], "weight", torch.nn.Parameter(torch.full((3, 4), 2.0))),
               lambda: (random.random(), np.random.rand(), torch.rand(1)),
               lambda: box.__setitem__(0, torch.arange(3)), lambda: box.__setitem__(0, [1, "a"]),
               lambda: None]
    want = None
    try:
        for step, change in enumerate(changes, 1):
            change()
            want_params = [p.detach().clone() for p in m.parameters()]
            rep, loc = snap._collect(step)
            want = st.dumps_meta({"replicated": st.flatten_state(rep)[0],
                                  "local": st.flatten_state(loc)[0], "world_size": 1})
            rng = st.capture_rng_state()
            snap.save(step)
            snap.wait()
            assert sent[-1] == want, f"step {step}"
        assert snap._rep_flat.hits >= 3 and snap._loc_flat.hits >= 3
    finally:
        snap.close()
    random.seed(0)
    torch.manual_seed(0)
    m2, opt2 = _model(2)
    opt2.add_param_group({"params": list(torch.nn.Linear(2, 2).parameters())})
    with Snapshotter(m2, opt2, job_id="fastj", socket_path=daemon.socket, rank=0, world_size=1,
                     on_daemon_unavailable="raise", timeout_s=20, state={"p": lambda: 0}) as s2:
        assert s2.restore() == len(changes)
        assert s2.restored["p"] == [1, "a"]
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), want_params))
    assert opt2.param_groups[0]["lr"] == 3e-3 and len(opt2.param_groups) == 2
    assert random.getstate() == rng["python"]
    assert torch.equal(torch.get_rng_state(), rng["torch"])


def test_per_parameter_states_checked_together_still_see_a_renamed_key():
    t = [torch.full((2,), float(i)) for i in range(4)]
    fc = FlatCache()
    _same_as_fresh(fc, {"state": {0: {"a": t[0], "b": t[1]}, 1: {"a": t[2], "b": t[3]}}})
    _same_as_fresh(fc, {"state": {0: {"a": t[0], "b": t[1]}, 1: {"a": t[2], "c": t[3]}}})
    _same_as_fresh(fc, {"state": {0: {"a": t[0], "b": t[1]}, 1: {"a": t[2], "c": 1}}})
    _same_as_fresh(fc, {"state": {0: {"a": t[0], "b": t[1]}, 1: {"a": t[2], "c": 1.0}}})
    assert fc.misses == 4


class _Seg:
    def __init__(self, size):
        self.name, self.size, self.buf = f"seg{size}", size, mmap.mmap(-1, size)


def test_host_copy_mixes_typed_and_bits_views_and_takes_tensors_that_need_grad():
    p = torch.nn.Parameter(torch.tensor([float("nan"), -0.0, 3.0]))
    ts = [p.detach().requires_grad_(), torch.from_numpy(np.arange(5, dtype=np.uint32)),
          torch.randn(3, dtype=torch.complex64), torch.ones(0), torch.arange(6.0).reshape(2, 3).t()]
    named = [(f"t{i}", t) for i, t in enumerate(ts)]
    lay = lo.plan_shard(named[:3], named[3:])
    fast, slow = _Seg(lay.payload_bytes), _Seg(lay.payload_bytes)
    c = StagingCopier()
    for _ in range(2):  # the views made by the first copy serve the second
        assert c.copy(fast, lay, ts[:3], ts[3:]) is None
        assert fast.name in c._views
        lo.copy_slice(slow.buf, lay.replicated, ts[:3], 0, lay.replicated_bytes, lay.replicated_bytes)
        lo.copy_local(slow.buf, lay.local, ts[3:])
        assert fast.buf[:] == slow.buf[:]
        ts[2].mul_(2)
    assert c.last_bytes_copied == sum(s.nbytes for s in lay.replicated + lay.local)
