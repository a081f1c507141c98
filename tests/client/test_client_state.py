"""Client state capture: dtype/byte layout round trips, state flattening through JSON,
bit-exact resume of training (model + AdamW + LR scheduler + RNG), DTensor shards."""

from __future__ import annotations

import json
import math
import mmap
import os
import random
import struct
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

from snapshotd.wire.dtypes import DTYPE_ITEMSIZE
from snapshotd_client.state import (
    capture_rng_state, dumps_meta, flatten_state, loads_meta, restore_rng_state, unflatten_state,
)
from snapshotd_client.tensors import (
    TensorSlot, as_bytes, dtype_name, pack_into, plan_layout, torch_dtype, view_from,
)

NAMES = [n for n in DTYPE_ITEMSIZE if isinstance(getattr(torch, n, None), torch.dtype)]


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, subnormals, ...) of dtype ``name``."""
    dt = torch_dtype(name)
    n = math.prod(shape)
    if dt == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (n * DTYPE_ITEMSIZE[name],), dtype=torch.uint8, generator=gen)
    return raw.view(dt).view(shape)


def _roundtrip(named: list[tuple[str, torch.Tensor]], align: int = 64, readonly: bool = False):
    slots, total = plan_layout(named, align=align)
    buf = bytearray(total)
    pack_into(buf, slots, named)
    src = bytes(buf) if readonly else buf
    return slots, [view_from(src, s) for s in slots]


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(as_bytes(a), as_bytes(b))


# ---------------------------------------------------------------- tensors.py

def test_dtype_names_cover_table_and_invert():
    assert set(NAMES) == set(DTYPE_ITEMSIZE)  # this torch has every dtype of the table
    for n in NAMES:
        assert dtype_name(torch_dtype(n)) == n
        assert torch_dtype(n).itemsize == DTYPE_ITEMSIZE[n]
    assert dtype_name(torch.chalf) == "complex32" and dtype_name(torch.half) == "float16"
    with pytest.raises(ValueError, match="qint8"):
        dtype_name(torch.qint8)
    with pytest.raises(ValueError, match="float128"):
        torch_dtype("float128")


@pytest.mark.parametrize("name", NAMES)
def test_every_dtype_roundtrips_bit_exact(name):
    gen = torch.Generator().manual_seed(len(name))
    base = _random_tensor(name, (6, 9), gen)
    named = [
        ("plain", _random_tensor(name, (5, 7), gen)),
        ("scalar", _random_tensor(name, (), gen)),
        ("empty", _random_tensor(name, (0,), gen)),
        ("empty2d", _random_tensor(name, (3, 0), gen)),
        ("transposed", base.t()),
        ("slice", base[2:5, 1:8]),  # storage offset + strides
        ("row", base[3]),  # contiguous with storage offset
        ("odd", _random_tensor(name, (3,), gen)),  # forces padding before next slot
        ("big", _random_tensor(name, (257,), gen)),
    ]
    assert named[5][1].storage_offset() > 0 and not named[5][1].is_contiguous()
    slots, views = _roundtrip(named)
    for (_, t), s, v in zip(named, slots, views):
        assert s.dtype == name and s.shape == tuple(t.shape)
        assert s.nbytes == t.numel() * DTYPE_ITEMSIZE[name]
        _assert_same_bits(t, v)


def test_values_extremes_and_conjugate():
    i64 = torch.tensor([torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max, 0, -1])
    u64 = torch.tensor([0, 2**64 - 1], dtype=torch.uint64)
    f = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 5e-324])
    c = torch.tensor([1 + 2j, -3 - 0j], dtype=torch.complex128).conj()  # lazy conj bit
    named = [("i64", i64), ("u64", u64), ("f", f), ("c", c), ("bf", f.bfloat16())]
    _, views = _roundtrip(named, readonly=True)
    assert views[0].tolist() == i64.tolist() and views[1][1].item() == 2**64 - 1
    assert struct.pack("<d", views[2][3].item()) == struct.pack("<d", -0.0)
    assert views[3].tolist() == [1 - 2j, -3 + 0j]
    for (_, t), v in zip(named, views):
        _assert_same_bits(t, v)


def test_layout_alignment_and_zero_size():
    named = [(f"t{i}", torch.zeros(n, dtype=torch.uint8)) for i, n in enumerate([1, 0, 63, 64, 65, 0, 3])]
    for align in (64, 16, 1):
        slots, total = plan_layout(named, align=align)
        assert all(s.offset % align == 0 for s in slots)
        assert [s.nbytes for s in slots] == [1, 0, 63, 64, 65, 0, 3]
        live = sorted((s.offset, s.offset + s.nbytes) for s in slots if s.nbytes)
        assert all(a[1] <= b[0] for a, b in zip(live, live[1:]))
        assert total % align == 0 and total >= live[-1][1]
    slots, total = plan_layout(named)
    assert [s.offset for s in slots] == [0, 64, 64, 128, 192, 320, 320] and total == 384
    assert plan_layout([]) == ([], 0)
    assert slots[0] == TensorSlot("t0", "uint8", (1,), 0, 1)  # plain: no global info
    with pytest.raises(ValueError, match="power of two"):
        plan_layout(named, align=48)
    with pytest.raises(ValueError, match="duplicate"):
        plan_layout([("a", torch.zeros(1)), ("a", torch.zeros(1))])


def test_unaligned_layout_still_views():
    named = [("a", torch.arange(3, dtype=torch.uint8)), ("b", torch.arange(5, dtype=torch.float64))]
    slots, views = _roundtrip(named, align=1)
    assert slots[1].offset == 3
    _assert_same_bits(named[1][1], views[1])


def test_pack_into_memoryview_and_errors():
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    slots, total = plan_layout([("t", t)])
    mv = memoryview(bytearray(total + 8))
    pack_into(mv, slots, [t])  # bare tensors accepted too
    _assert_same_bits(t, view_from(mv, slots[0]))
    with pytest.raises(ValueError, match="writable"):
        pack_into(bytes(total), slots, [t])
    with pytest.raises(ValueError, match="only CPU tensors"):
        pack_into(bytearray(total), slots, [torch.empty(3, 4, device="meta")])
    with pytest.raises(ValueError, match="slot expects"):
        pack_into(bytearray(total), slots, [t.double()])
    with pytest.raises(ValueError, match="1 slots but 2"):
        pack_into(bytearray(total), slots, [t, t])


def test_view_from_readonly_mmap_no_warning(tmp_path):
    named = [("w", torch.randn(4, 5)), ("b", torch.arange(7))]
    slots, total = plan_layout(named)
    buf = bytearray(total)
    pack_into(buf, slots, named)
    path = tmp_path / "region"
    path.write_bytes(buf)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            views = [view_from(mm, s) for s in slots]
        for (_, t), v in zip(named, views):
            _assert_same_bits(t, v)
        del views  # release buffer exports before the mmap closes


def test_as_bytes_shapes():
    assert as_bytes(torch.tensor(1.0)).tolist() == list(struct.pack("<f", 1.0))
    assert as_bytes(torch.zeros(0, 3)).shape == (0,)
    assert as_bytes(torch.tensor([True, False])).tolist() == [1, 0]
    t = torch.arange(6, dtype=torch.int16).view(2, 3).t()
    assert as_bytes(t).numel() == 12 and torch.equal(as_bytes(t), as_bytes(t.contiguous()))


# ---------------------------------------------------------------- state.py

def _through_json(obj, *, readonly=True):
    meta, named = flatten_state(obj)
    slots, total = plan_layout(named)
    buf = bytearray(total)
    pack_into(buf, slots, named)
    src = bytes(buf) if readonly else buf
    tensors = [view_from(src, s) for s in slots]
    text = dumps_meta(meta)
    return unflatten_state(loads_meta(text), tensors), meta, named, text


def _same(a, b) -> bool:
    """Deep equality that also checks types, tuple-ness, dict order, float bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a) and \
            _same(getattr(a, "_metadata", None), getattr(b, "_metadata", None))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_flatten_roundtrip_all_kinds():
    weird_nan = struct.unpack("<d", bytes.fromhex("0100000000f8ffff"))[0]
    tied = torch.randn(3, 2)
    od = OrderedDict([("w", tied), ("w_tied", tied)])
    od._metadata = OrderedDict([("", {"version": 2})])
    obj = {
        "floats": [0.1, -0.0, 0.0, float("nan"), weird_nan, float("inf"), -float("inf"), 1e308, 5e-324],
        "ints": [0, -1, 2**63 - 1, -2**63, 2**63, -2**64 - 5, 7**5000, True, False],
        "misc": (None, "ünïcode", b"\x00\xff raw", (1, (2, [3])), ()),
        "int_keys": {0: {"exp_avg": torch.ones(2)}, 1: "x", (1, "a"): None, None: 1.5},
        "mixed_keys": {"a": 1, 2: 3},
        "reserved": {"__tensor__": 5, "__tuple__": [1]},
        "odict": od,
        "np": {
            "f32": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
            "be": np.arange(4, dtype=">i8"),
            "strided": np.arange(20, dtype=np.uint16).reshape(4, 5)[::2, ::-1],
            "bool": np.array([True, False]),
            "c": np.array([1 + 1j], dtype=np.complex64),
            "u64": np.array([2**64 - 1], dtype=np.uint64),
            "zero_d": np.array(3.5),
            "empty": np.zeros((0, 4)),
        },
        "np_scalars": [np.float32(1.25), np.int64(-3), np.uint64(2**64 - 1), np.bool_(True),
                       np.float64("nan"), np.complex128(1 - 2j), np.str_("s"), np.datetime64("2024-01-02")],
        "tensors": [torch.tensor(3), torch.zeros(0, 2), torch.randn(4, 4).t(), torch.tensor([1.0]).bfloat16()],
    }
    back, meta, named, text = _through_json(obj)
    assert _same(back, obj)
    assert back["odict"]["w"] is back["odict"]["w_tied"]  # tied tensors stored once
    assert math.copysign(1.0, back["floats"][1]) == -1.0
    assert struct.pack("<d", back["floats"][4]) == struct.pack("<d", weird_nan)
    names = [n for n, _ in named]
    assert "int_keys/0/exp_avg" in names and "odict/w" in names and "odict/w_tied" not in names
    assert len(names) == len(set(names)) == meta["num_tensors"]
    assert dumps_meta(flatten_state(obj)[0]) == text  # deterministic
    json.loads(text)  # plain JSON (NaN/Infinity literals aside)


def test_scalar_roots_and_name_collisions():
    for root in [None, 1.5, "s", torch.arange(3), (), {}, []]:
        assert _same(_through_json(root)[0], root)
    _, named = flatten_state({1: torch.zeros(1), "1": torch.ones(1)})
    assert len({n for n, _ in named}) == 2


@pytest.mark.parametrize("bad, where, tname", [
    ({"opt": {"hook": lambda: 0}}, "'opt/hook'", "function"),
    ({"a": [1, {2, 3}]}, "'a/1'", "builtins.set"),
    (object(), "the root", "builtins.object"),
    ({"x": np.array(["s"])}, "'x'", "<U1"),
    ({"x": bytearray(b"1")}, "'x'", "bytearray"),
])
def test_unsupported_type_errors(bad, where, tname):
    with pytest.raises(TypeError) as ei:
        flatten_state(bad)
    msg = str(ei.value)
    assert where in msg and tname in msg and "supported" in msg


def test_reference_cycle_rejected():
    a: list = [1]
    a.append(a)
    with pytest.raises(ValueError, match="cycle"):
        flatten_state({"a": a})
    shared = [1, 2]
    assert _same(_through_json({"x": shared, "y": shared})[0], {"x": shared, "y": shared})


def test_unflatten_checks():
    meta, named = flatten_state({"t": torch.zeros(2)})
    with pytest.raises(ValueError, match="references 1 tensors"):
        unflatten_state(meta, [])
    with pytest.raises(ValueError, match="format"):
        unflatten_state({"format": "other", "num_tensors": 0, "root": None}, [])


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            torch.rand(4).tolist(), torch.randn(5).tolist())


def test_rng_state_roundtrip_bit_exact():
    random.seed(5)
    random.gauss(0, 1)  # python caches the second gaussian (gauss_next)
    np.random.seed(7)
    np.random.randn()  # odd count: numpy holds a cached gaussian
    torch.manual_seed(9)
    torch.randn(3)
    direct = capture_rng_state()
    assert direct["numpy"][3] == 1 and direct["python"][2] is not None
    back, _, _, _ = _through_json({"rng": direct})
    expected = _draws()
    restore_rng_state(direct)
    assert _draws() == expected
    restore_rng_state(back["rng"])
    assert _draws() == expected
    # lists where tuples were (e.g. a plain-JSON producer) restore as well
    as_lists = dict(back["rng"], python=[direct["python"][0], list(direct["python"][1]), direct["python"][2]],
                    numpy=list(direct["numpy"]))
    restore_rng_state(as_lists)
    assert _draws() == expected


# ------------------------------------------------- the key property: bit-exact resume

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.drop = torch.nn.Dropout(0.2)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _make(seed):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps):
    model.train()
    for _ in range(steps):
        x = torch.randn(6, 8)  # data and dropout masks both come from the RNG
        y = torch.randint(0, 3, (6,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def test_resume_training_bit_identical():
    model, opt, sched = _make(0)
    _train(model, opt, sched, 2)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": 2, "rng": capture_rng_state()}
    meta, named = flatten_state(state)
    names = {n for n, _ in named}
    assert {"optimizer/state/0/exp_avg", "optimizer/state/0/step", "model/bn.running_mean"} <= names
    slots, total = plan_layout(named)
    region = bytearray(total)
    pack_into(region, slots, named)
    text = dumps_meta(meta)
    region = bytes(region)  # as the restoring process sees it: read-only bytes + JSON
    del state, meta, named

    _train(model, opt, sched, 3)  # the original continues

    model2, opt2, sched2 = _make(123)  # fresh, different init
    views = [view_from(region, s) for s in slots]
    back = unflatten_state(loads_meta(text), [v.clone() for v in views])  # views are read-only
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    restore_rng_state(back["rng"])
    assert back["step"] == 2
    _train(model2, opt2, sched2, 3)

    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(as_bytes(a), as_bytes(b)), n
    for p, q in zip(model.parameters(), model2.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(as_bytes(opt.state[p][k]), as_bytes(opt2.state[q][k])), k
    assert sched.state_dict() == sched2.state_dict()
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


# ---------------------------------------------------------------- DTensor shards

_DTENSOR_RANK = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard
    from snapshotd_client.tensors import plan_layout, pack_into, view_from, as_bytes
    rank, init = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        full = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
        dt = distribute_tensor(full, init_device_mesh("cpu", (2,)), [Shard(0)])
        slots, total = plan_layout([("w", dt)])
        buf = bytearray(total)
        pack_into(buf, slots, [dt])
        s = slots[0]
        o = s.global_offset[0]
        ok = torch.equal(as_bytes(view_from(buf, s)), as_bytes(full[o:o + s.shape[0]]))
        print(json.dumps({"shape": s.shape, "gshape": s.global_shape, "goff": s.global_offset, "ok": ok}))
    finally:
        dist.destroy_process_group()
""")


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_dtensor_local_shard_and_global_offset(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", _DTENSOR_RANK, str(r), init], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["shape"] for o in outs] == [[3, 3], [2, 3]]
    assert all(o["gshape"] == [5, 3] and o["ok"] for o in outs)
    assert [o["goff"] for o in outs] == [[0, 0], [3, 0]]
