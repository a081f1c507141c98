"""The client API of issue 15 against a real daemon: state providers read at save time,
the callables' values handed back by restore, wrapper == bare module, the job id taken
from the launcher (or refused), and the restore log line visible without logging set up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from snapshotd_client.config import JobIdentityError, resolve_job_id
from snapshotd_client.snapshotter import Snapshotter

LAUNCHER_ENV = ("SNAPSHOTD_JOB_ID", "SNAPSHOTD_K8S_JOB_NAME", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def _snap(daemon, model, job="prov", **kw) -> Snapshotter:
    return Snapshotter(model, job_id=job, socket_path=daemon.socket, rank=0, world_size=1,
                       on_daemon_unavailable="raise", timeout_s=10, **kw)


class Counter:
    """A stand-in for a sampler / data iterator: state_dict() / load_state_dict()."""

    def __init__(self, pos: int = 0):
        self.pos, self.loads = pos, 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.pos, self.loads = d["pos"], self.loads + 1


def test_providers_are_read_at_each_save_and_handed_back(daemon):
    it, best, batch = Counter(), 9.0, None

    def provide():
        return {"it": it, "best": lambda: best, "batch": lambda: batch}

    with _snap(daemon, _model(0), state=provide()) as s:
        for step in (1, 2, 3):
            it.pos += 5
            best = 1.0 / step  # the loop rebinds: the lambda sees the new binding
            batch = (torch.full((2, 3), float(step)), torch.arange(step))
            assert s.save(step).result(10).committed
    it2 = Counter(pos=-1)
    with _snap(daemon, _model(1), state={"it": it2, "best": lambda: 0, "batch": lambda: 0}) as r:
        assert r.restored == {}
        assert r.restore() == 3
        assert it2.pos == 15 and it2.loads == 1  # loaded in place
        assert set(r.restored) == {"best", "batch"}
        assert r.restored["best"] == pytest.approx(1 / 3)
        x, y = r.restored["batch"]
        assert torch.equal(x, torch.full((2, 3), 3.0)) and torch.equal(y, torch.arange(3))
        assert r.extra_state == {}  # the providers are not extra_state entries


def test_extra_state_and_providers_together_and_old_snapshots(daemon):
    """extra_state keeps working; a provider replacing an extra_state entry of the same
    name in an older script's snapshot still gets that value back."""
    with _snap(daemon, _model(0), extra_state={"data": Counter(7), "best_val_loss": 2.5}) as s:
        assert s.save(1).result(10).committed
    data = Counter()
    with _snap(daemon, _model(1), extra_state={"data": data},
               state={"best_val_loss": lambda: 0.0}) as r:
        assert r.restore() == 1
        assert data.pos == 7 and r.restored == {"best_val_loss": 2.5}
    plain = {"note": "x"}
    with _snap(daemon, _model(1), extra_state=plain) as r:
        assert r.restore() == 1 and r.extra_state["best_val_loss"] == 2.5  # as before


def test_bad_providers_are_refused_clearly(daemon):
    with pytest.raises(TypeError, match="callable returning the current value"):
        _snap(daemon, _model(0), state={"best_val_loss": 3.0})
    with pytest.raises(ValueError, match="also an extra_state key"):
        _snap(daemon, _model(0), extra_state={"a": 1}, state={"a": lambda: 1})
    with pytest.raises(TypeError, match="non-empty strings"):
        _snap(daemon, _model(0), state={1: lambda: 1})


def test_wrapper_or_module_save_the_same_state(daemon, tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0,
                                         world_size=1)
    try:
        m = _model(3)
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        for wrapped in (ddp, torch.nn.DataParallel(m)):
            with _snap(daemon, wrapped, job="wrapped") as s:
                assert s.model is m
                rep, _ = s._collect(1)
                assert list(rep["model"]) == list(m.state_dict())  # no "module." prefix
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ddp(torch.ones(2, 4)).sum().backward()
        opt.step()
        with _snap(daemon, ddp, optimizer=opt, job="wrapped") as s:
            assert s.save(1).result(10).committed
    finally:
        torch.distributed.destroy_process_group()
    bare = _model(4)  # restored into the bare module of another process's model
    with _snap(daemon, bare, optimizer=torch.optim.SGD(bare.parameters(), lr=0.1),
               job="wrapped") as r:
        assert r.restore() == 1
    for a, b in zip(bare.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("env, expected", [
    ({"SNAPSHOTD_JOB_ID": "run-7", "SLURM_JOB_ID": "12"}, ("run-7", "SNAPSHOTD_JOB_ID")),
    ({"SNAPSHOTD_K8S_JOB_NAME": "train-a", "TORCHELASTIC_RUN_ID": "x"},
     ("k8s-train-a", "SNAPSHOTD_K8S_JOB_NAME")),
    ({"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "3", "TORCHELASTIC_RUN_ID": "4242-1"},
     ("slurm-4242", "SLURM_JOB_ID")),  # the Slurm job outlives torchrun's relaunches
    ({"TORCHELASTIC_RUN_ID": "ab/cd ef"}, ("torchrun-ab-cd-ef", "TORCHELASTIC_RUN_ID")),
])
def test_job_id_from_the_launcher(env, expected):
    assert resolve_job_id(env) == expected


def test_job_id_refused_when_nothing_names_the_job(monkeypatch, daemon):
    for bad in ({}, {"TORCHELASTIC_RUN_ID": "none"}, {"SLURM_JOB_ID": "  "}):
        with pytest.raises(JobIdentityError, match="no job id"):
            resolve_job_id(bad)
    long_id, _ = resolve_job_id({"SNAPSHOTD_K8S_JOB_NAME": "j" * 63})
    assert len(long_id) == 64 and long_id != resolve_job_id({"SNAPSHOTD_K8S_JOB_NAME": "j" * 62})[0]
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(JobIdentityError, match="SNAPSHOTD_JOB_ID"):
        Snapshotter(_model(0), socket_path=daemon.socket, rank=0, world_size=1)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with Snapshotter(_model(0), socket_path=daemon.socket, rank=0, world_size=1) as s:
        assert s.cfg.job_id == "slurm-77"


def test_restore_is_reported_without_logging_configured(daemon):
    """A script that never touches logging sees the restore line on stderr; one that
    configures logging gets it through its own handlers, once."""
    code = ("import torch, logging, sys\n"
            "from snapshotd_client import Snapshotter\n"
            "if sys.argv[2] == 'configured':\n"
            "    logging.basicConfig(level=logging.INFO, format='MINE %(message)s')\n"
            "m = torch.nn.Linear(2, 2)\n"
            "s = Snapshotter(m, socket_path=sys.argv[1], rank=0, world_size=1)\n"
            "n = s.restore()\n"
            "s.save(n + 1).result(10)\n"
            "s.close()\n")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["SNAPSHOTD_JOB_ID"] = "logjob"
    outs = {}
    for mode in ("bare", "configured"):
        p = subprocess.run([sys.executable, "-c", code, daemon.socket, mode], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        outs[mode] = p.stderr
    bare = [ln for ln in outs["bare"].splitlines() if "snapshotd" in ln]
    assert len(bare) == 1 and "nothing to restore for job logjob" in bare[0], outs["bare"]
    mine = [ln for ln in outs["configured"].splitlines() if "snapshotd" in ln]
    assert len(mine) >= 1 and all(ln.startswith("MINE ") for ln in mine), outs["configured"]
    assert any("restored job logjob rank 0 at step 1" in ln for ln in mine), outs["configured"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_callable_tensors_come_back_on_their_device(daemon):
    batch = (torch.arange(6, device="cuda").view(2, 3), torch.ones(2, device="cuda"))
    with _snap(daemon, _model(0), job="dev", state={"batch": lambda: batch}) as s:
        assert s.save(1).result(10).committed
    with _snap(daemon, _model(0), job="dev", state={"batch": lambda: None}) as r:
        assert r.restore() == 1
        x, y = r.restored["batch"]
        assert x.device == batch[0].device and torch.equal(x, batch[0]) and torch.equal(y, batch[1])
