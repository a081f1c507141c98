"""The client's CUDA path: side-stream copies into pinned shared memory (needs a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_cuda_save_restore_bit_exact(daemon):
    from snapshotd_client import Snapshotter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    snap = Snapshotter(model, opt, job_id="gpu", socket_path=daemon.socket, rank=0, world_size=1)
    x = torch.randn(32, 256, device="cuda")
    for step in range(3):
        model(x).square().mean().backward()
        opt.step()  # the pre-hook waits for the previous snapshot's device copy
        opt.zero_grad()
        snap.save(step + 1)
    snap.wait()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_rng = torch.cuda.get_rng_state_all()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.cuda.manual_seed_all(123)
    assert snap.restore() == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), want_rng))
    snap.close()
