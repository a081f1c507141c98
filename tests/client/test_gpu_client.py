"""The client's CUDA path: side-stream copies into pinned shared memory (needs a GPU)."""

from __future__ import annotations

import ctypes
import mmap

import pytest
import torch

pytestmark = pytest.mark.gpu


def _is_pinned(seg) -> bool:
    """Whether the CUDA driver knows this mapping as page-locked host memory."""
    t = torch.frombuffer(seg.buf, dtype=torch.uint8, count=64)
    try:
        return t.is_pinned()
    finally:
        del t  # the view holds a buffer export: the mapping could not be closed


def _train_and_save(model, opt, snap, x, steps) -> None:
    for step in steps:
        model(x).square().mean().backward()
        opt.step()  # the pre-hook waits for the previous snapshot's device copy
        opt.zero_grad()
        snap.save(step)
    snap.wait()


def _check_restore(model, snap, step: int) -> None:
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_rng = torch.cuda.get_rng_state_all()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.cuda.manual_seed_all(123)
    assert snap.restore() == step
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), want_rng))


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned-fallback"])
def test_cuda_save_restore_bit_exact(daemon, pinned):
    """Save from the GPU, restore bit-exact, then save again after the restore: the
    restore unmaps every segment, so the staging mappings must be unregistered from the
    driver first and registered again on the next save. ``unpinned-fallback`` is the
    path taken when cudaHostRegister is refused."""
    from snapshotd_client import Snapshotter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    snap = Snapshotter(model, opt, job_id="gpu", socket_path=daemon.socket, rank=0, world_size=1)
    snap.copier.pin_failed = not pinned
    x = torch.randn(32, 256, device="cuda")

    _train_and_save(model, opt, snap, x, range(1, 4))
    held = snap.copier.pinned()
    if pinned:
        assert held and all(_is_pinned(seg) for seg, _ in held.values())
    else:
        assert not held
    _check_restore(model, snap, 3)
    assert snap.pinned_segments == ()  # restore closed every mapping: none left registered

    _train_and_save(model, opt, snap, x, range(4, 6))
    if pinned:
        assert snap.pinned_segments
        now = snap.copier.pinned()
        assert all(_is_pinned(seg) for seg, _ in now.values())
        assert not any(now[n][0] is held[n][0] for n in now if n in held)
        del now
    _check_restore(model, snap, 5)
    snap.close()
    assert snap.pinned_segments == ()


def test_failed_cuda_call_leaves_no_stale_error():
    """A refused cudaHostRegister is reported as text and does not surface later as an
    unrelated error at PyTorch's next kernel launch (it checks cudaGetLastError)."""
    from snapshotd_client.device_copy import cuda_call as _cuda_call

    torch.ones(1, device="cuda")
    size = 1 << 20
    buf = mmap.mmap(-1, size)
    ptr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert _cuda_call("cudaHostRegister", ptr, size, 0) is None
    try:
        err = _cuda_call("cudaHostRegister", ptr, size, 0)  # registered already
        assert err is not None and "cudaError" in err
        x = torch.arange(4, device="cuda") * 2
        torch.cuda.synchronize()
        assert x.tolist() == [0, 2, 4, 6]
    finally:
        assert _cuda_call("cudaHostUnregister", ptr) is None
    buf.close()


def test_buffers_changed_by_the_next_forward_are_saved_as_they_were(daemon):
    """The device copy overlaps the next forward pass, which updates BatchNorm's running
    statistics in place: the snapshot must hold the values at save(), not a mix. The
    state is made large (the buffers come last in the layout) so the copy is still
    running when the forward changes them."""
    from snapshotd_client import Snapshotter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 4096),
                                torch.nn.BatchNorm1d(4096)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    snap = Snapshotter(model, opt, job_id="gpu-bn", socket_path=daemon.socket, rank=0, world_size=1)
    x = torch.randn(64, 4096, device="cuda")
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    snap.save(1)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(5):  # forwards queued behind the save: they change the running stats
        model(x)
    snap.wait()
    torch.cuda.synchronize()
    assert not torch.equal(model[2].running_mean, want["2.running_mean"])  # they did change
    assert snap.restore() == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    snap.close()
