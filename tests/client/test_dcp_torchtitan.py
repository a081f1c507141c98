"""torchtitan's CheckpointManager on snapshotd (examples/torchtitan/snapshotd_checkpoint.py).

Runs only where torchtitan is importable (it is not a dependency of snapshotd; torchtitan
0.3.0 imports on torch 2.13 CPU). torchtitan's Trainer needs CUDA, so the manager is built
as the Trainer would, without it: a small model, torchtitan's OptimizersContainer (AdamW)
and LRSchedulersContainer, a world-1 gloo group. Two steps are saved through the manager
(sync, and with torchtitan's "async" mode), a fresh manager over a model and optimizer
built with other values finds step 2 in the daemon and restores them bit for bit.
Run: ``/tmp/ttvenv/bin/python -m pytest tests/client/test_dcp_torchtitan.py`` with
PYTHONPATH naming the repository, client/ and examples/torchtitan.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

torchtitan = pytest.importorskip(
    "torchtitan", reason="torchtitan is not installed here (not a snapshotd dependency); run this "
    "file with a Python that has torchtitan 0.3.0")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "examples", "torchtitan"))


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """A real daemon, run by the repository's own venv where there is one (its daemon
    dependencies need not be in torchtitan's venv)."""
    from conftest import DaemonProcess
    from snapshotd.wire import shm

    py = os.path.join(REPO, ".venv", "bin", "python")
    d = DaemonProcess(tmp_path)
    with monkeypatch.context() as m:
        if os.path.exists(py):
            m.setattr(sys, "executable", py)
        d.start()
    try:
        yield d
    finally:
        d.kill()
        for name in d.segments():
            shm.unlink(name)


@pytest.fixture
def world1(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _build(seed: int):
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    cfg = OptimizersContainer.Config(param_groups=[ParamGroupConfig(
        pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})], implementation="for-loop")
    opt = OptimizersContainer(cfg, model_parts=[model])
    return model, opt, LRSchedulersContainer(opt, lambda s: 1.0)


def _step(model, opt, lrs, i: int) -> None:
    opt.zero_grad()
    model(torch.full((4, 6), 0.1 * i)).square().sum().backward()
    opt.step()
    lrs.step()


def _manager(tmp_path, sock, job, mode, model, opt, lrs):
    from snapshotd_checkpoint import SnapshotdCheckpointManager
    from torchtitan.components.checkpointer.dcp import CheckpointManager

    cfg = CheckpointManager.Config(enable=True, folder="ck", interval=1, async_mode=mode)
    return SnapshotdCheckpointManager(cfg, job_id=job, socket_path=sock, dataloader=None,
                                      model_parts=[model], optimizers=opt, lr_schedulers=lrs,
                                      states={}, sd_adapter=None, base_folder=str(tmp_path))


def _clone(sd):
    if isinstance(sd, dict):
        return {k: _clone(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_clone(v) for v in sd]
    return sd.clone() if isinstance(sd, torch.Tensor) else sd


def _eq(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("mode", ["disabled", "async"])  # pinned: torchtitan needs an accelerator
def test_torchtitan_checkpoint_manager_saves_and_resumes_through_snapshotd(mode, daemon, world1, tmp_path):
    job = f"titan-{mode}"
    model, opt, lrs = _build(0)
    mgr = _manager(tmp_path, daemon.socket, job, mode, model, opt, lrs)
    assert mgr.load() is False  # nothing in the daemon yet: a fresh start
    for step in (1, 2):
        _step(model, opt, lrs, step)
        assert mgr.save(step)
    mgr.maybe_wait_for_saving()
    want_model, want_opt = _clone(model.state_dict()), _clone(opt.state_dict())
    _step(model, opt, lrs, 3)  # the live state moves on
    mgr.close()

    model2, opt2, lrs2 = _build(1)
    _step(model2, opt2, lrs2, 9)
    assert not _eq(model2.state_dict(), want_model)
    mgr2 = _manager(tmp_path, daemon.socket, job, mode, model2, opt2, lrs2)
    assert mgr2._find_load_step() == 2
    assert mgr2.load() is True
    assert _eq(model2.state_dict(), want_model)
    assert _eq(opt2.state_dict(), want_opt)
    assert not os.path.exists(os.path.join(str(tmp_path), "ck"))  # nothing went to files
    mgr2.close()
