"""A nanoGPT-style script (snapshotd_tools.demo.gpt_trainer), 2 DDP ranks over gloo with a
real daemon: one rank SIGKILLed at iteration N, the job relaunched, and the resumed run
ends bit-identical (weights, optimizer state, best_val_loss) to a run that never failed,
using only what the README tells a user to write (the README's first example IS the
script's marked region: checked here too).

The script's own ``--nproc 2`` launcher stands in for torchrun (torchrun itself is
tests/integration/test_torchrun*.py): it sets RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_*,
forks the ranks after importing torch once, and kills the others when one dies; the test
sets TORCHELASTIC_RUN_ID and relaunches with the same one, as torchrun's restart would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = os.path.join(REPO, "tools", "snapshotd_tools", "demo", "gpt_trainer.py")
ITERS, CRASH_AT, WORLD = 24, 13, 2


def _run(daemon, run_id: str, *args: str) -> tuple[list[int], list[dict], str]:
    """One launch of the group (the script's own ``--nproc`` launcher, which kills the
    other ranks when one dies, as torchrun does): (exit codes, JSON events, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SNAPSHOTD_JOB_ID", "SLURM_JOB_ID", "SNAPSHOTD_K8S_JOB_NAME", "RANK")}
    env.update(TORCHELASTIC_RUN_ID=run_id, SNAPSHOTD_SOCKET=daemon.socket, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, SCRIPT, "--nproc", str(WORLD), "--max-iters", str(ITERS),
                        *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    events = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    codes = next((e["codes"] for e in events if e["event"] == "exit"), None)
    assert codes is not None, (p.returncode, p.stderr[-3000:])
    return codes, events, p.stderr


def _done(events: list[dict]) -> list[dict]:
    return sorted((e for e in events if e["event"] == "done"), key=lambda e: e["rank"])


def _losses(events: list[dict]) -> dict[int, float]:
    return {e["iter"]: e["loss"] for e in events if e["event"] == "iter"}


def test_readme_first_example_is_the_scripts_snapshotd_part():
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## Using it in a training loop", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    src = open(SCRIPT).read()
    region = src.split("# --- README: first example ---\n", 1)[1].split(
        "    # --- end of README example ---", 1)[0]
    assert textwrap.dedent(region) == block


def test_gpt_sigkilled_rank_resumes_bit_exact(daemon):
    rc, events, err = _run(daemon, "gpt-ref")
    assert rc == [0, 0], err[-3000:]
    ref, ref_losses = _done(events), _losses(events)
    assert len(ref) == WORLD and ref[0]["digest"] == ref[1]["digest"]  # DDP kept them in step
    assert ref[0]["job_id"] == "torchrun-gpt-ref"  # from the launcher, nothing passed
    assert sorted(ref_losses) == list(range(1, ITERS + 1))

    rc, events, err = _run(daemon, "gpt-crash", "--crash-at", str(CRASH_AT))
    assert rc[1] == -signal.SIGKILL and rc[0] != 0, (rc, err[-3000:])
    assert max(_losses(events)) <= CRASH_AT + 1 and not _done(events)
    committed = daemon.client().list_versions("torchrun-gpt-crash").latest_committed_version
    assert CRASH_AT - 2 <= committed <= CRASH_AT

    rc, events, err = _run(daemon, "gpt-crash", "--crash-at", str(CRASH_AT))  # relaunched
    assert rc == [0, 0], err[-3000:]
    for r in range(WORLD):  # visible without the script configuring logging
        line = rf"snapshotd: restored .*torchrun-gpt-crash.* rank {r}\b.*\b{committed}\b"
        assert re.search(line, err), err[-3000:]
    losses = _losses(events)
    assert sorted(losses) == list(range(committed + 1, ITERS + 1)), "resumed at the commit"
    # the losses after the restore continue the reference curve exactly ...
    assert losses == {i: v for i, v in ref_losses.items() if i > committed}
    # ... and every rank ends bit-identical: weights, optimizer state, best_val_loss
    got = _done(events)
    assert [(g["rank"], g["digest"], g["best_val_loss"], g["iter"]) for g in got] == \
        [(r["rank"], r["digest"], r["best_val_loss"], r["iter"]) for r in ref]
