"""torchrun's own restart, for real: ``torchrun --nproc-per-node=2 --max-restarts=2``, a rank
SIGKILLed mid-run, the elastic agent restarts both workers, they restore the last committed
snapshot from a real daemon and finish bit-exactly like a run that never failed.

This file is also the worker script torchrun runs (``python test_torchrun.py --out DIR``):
DDP over gloo on a tiny transformer (dropout on, so every rank's RNG matters), each rank its
own data stream, a snapshot every step. On the first attempt the workers pace their steps and
stop at ``--hold-at`` so the test's SIGKILL lands while the job runs; after the restart
(``$TORCHELASTIC_RESTART_COUNT`` > 0) they run to the end. Each rank writes ``done.<rank>.json``
with a digest of its final model and optimizer state, and of a failure-free reference run of
the same training that the same processes do next (its own job id, starting from nothing).

The launch sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: without it torch >= 2.5 hands the
restarted workers the agent's TCPStore still holding the first attempt's keys, and gloo's
``init_process_group`` connects to the dead workers' addresses (docs/INTEGRATIONS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

# kill once step KILL_AFTER is committed; the first attempt stops at HOLD_AT
STEPS, KILL_AFTER, HOLD_AT = 24, 5, 20


def train(job: str, steps: int, hold_at: int, attempt: int) -> dict:
    """One DDP training run of job ``job`` from its last committed snapshot to ``steps``."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from snapshotd_client import Snapshotter
    from snapshotd_tools.demo.trainer import DataStream, TinyLM, digest_state

    rank = dist.get_rank()
    torch.manual_seed(1234)
    model = TinyLM()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    data = DataStream(1235 + rank)
    torch.manual_seed(2234 + rank)
    snap = Snapshotter(model, opt, lr_scheduler=sched, extra_state={"data": data}, job_id=job,
                       shard_replicated=True, on_daemon_unavailable="raise")
    start = snap.restore()
    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, steps):
        x, y = data.next()
        loss = loss_fn(ddp(x).reshape(-1, 64), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        snap.save(step + 1)
        if attempt == 0 and hold_at:
            time.sleep(0.03)  # paced, so the kill lands mid-run rather than after the end
            while step + 1 >= hold_at:
                time.sleep(0.05)  # the test SIGKILLs rank 1 before this run may end
    snap.close()
    return {"start": start, "digest": digest_state(model, opt)}


def worker(argv=None) -> int:
    """torchrun's entry point: the job of $SNAPSHOTD_JOB_ID (killed on its first attempt), then,
    in the same processes, a failure-free reference run of the same training."""
    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--hold-at", type=int, default=0)
    a = p.parse_args(argv)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(os.path.join(a.out, f"pid.{rank}.{attempt}"), "w") as f:
        f.write(str(os.getpid()))
    job = os.environ["SNAPSHOTD_JOB_ID"]
    rec = {"rank": rank, "attempt": attempt,
           "run": train(job, a.steps, a.hold_at, attempt),
           "reference": train(job + "-ref", a.steps, 0, attempt)}
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(a.out, f"done.{rank}.json"), "w") as f:
        json.dump(rec, f)
    return 0


if __name__ == "__main__":
    sys.exit(worker())


# ---------------------------------------------------------------------------------------------
import pytest  # noqa: E402

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _launch(daemon, out, job, hold_at: int) -> subprocess.Popen:
    out.mkdir()
    env = dict(os.environ, SNAPSHOTD_SOCKET=daemon.socket, SNAPSHOTD_JOB_ID=job,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=2", "--max-restarts=2",
           os.path.abspath(__file__), "--out", str(out), "--hold-at", str(hold_at)]
    return subprocess.Popen(cmd, env=env, stdout=open(out / "torchrun.log", "wb"),
                            stderr=subprocess.STDOUT)


def _stop(run: subprocess.Popen, out) -> None:
    """Stop a torchrun that did not finish, and its workers (each in a session of its own,
    so they outlive the agent): those pids of out/pid.* that still run this file."""
    if run.poll() is not None:
        return
    run.kill()
    run.wait(10)
    for f in out.glob("pid.*"):
        try:
            pid = int(f.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as c:
                if os.path.basename(__file__).encode() in c.read():
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):  # gone already, or a pid file half written
            pass


def _wait(cond, timeout_s: float, what: str, proc=None, log=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"torchrun exited {proc.returncode} while waiting for {what}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)


def _committed(client, job: str) -> int:
    from snapshotd.wire.errors import UnknownJobError

    try:
        return client.list_versions(job).latest_committed_version
    except UnknownJobError:  # the workers have not registered yet
        return 0


def _results(out) -> list[dict]:
    return [json.loads((out / f"done.{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")
def test_torchrun_max_restarts_resumes_bit_exact_after_sigkill(daemon, tmp_path):
    run = _launch(daemon, tmp_path / "run", "torchrun-crash", hold_at=HOLD_AT)
    client = daemon.client()
    try:
        log = tmp_path / "run" / "torchrun.log"
        _wait(lambda: _committed(client, "torchrun-crash") >= KILL_AFTER,
              150, f"step {KILL_AFTER} committed", run, log)  # generous: a loaded machine
        killed_at = _committed(client, "torchrun-crash")
        os.kill(int((tmp_path / "run" / "pid.1.0").read_text()), signal.SIGKILL)  # rank 1, mid-run
        assert run.wait(140) == 0, log.read_text()[-3000:]
    finally:
        _stop(run, tmp_path / "run")
        client.close()
    res = _results(tmp_path / "run")
    # the elastic agent restarted the workers, and they resumed from a committed step ...
    assert [r["attempt"] for r in res] == [1, 1], res
    starts = {r["run"]["start"] for r in res}
    assert len(starts) == 1 and killed_at <= starts.pop() <= HOLD_AT, res
    # ... while the reference run of the same processes started from nothing
    assert [r["reference"]["start"] for r in res] == [0, 0], res
    # every rank ends bit-identical to the failure-free run (model and optimizer state)
    digests = {r[k]["digest"] for r in res for k in ("run", "reference")}
    assert len(digests) == 1, res
