"""The Slurm example for real: a single-node Slurm runs deploy/slurm/snapshotd.sbatch.

The test starts its own MUNGE and Slurm (munged, slurmctld, slurmd in the foreground, as
root, with a private key, socket, ports, state and spool directories, so it touches no
system configuration and cannot meet another Slurm on the machine), submits the sbatch
example with the example trainer, and checks that the job started a daemon on the node,
waited for its health, trained, lost rank 0 to a SIGKILL, relaunched torchrun, restored
the committed step on every rank, finished, found the daemon healthy, and freed the
daemon's shared memory. Then it stops the three daemons it started.

Needs Debian's slurm-wlm and munge (``scripts/setup-slurm``) and root. Without them the
test is skipped with the reason, except under CI (``$CI`` set), where it fails.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from snapshotd_tools import localcluster as lc

from conftest import REPO
SBATCH = os.path.join(REPO, "deploy", "slurm", "snapshotd.sbatch")
TRAIN = os.path.join(REPO, "deploy", "examples", "train_ddp.py")
STEPS, CRASH_AT, NPROC = 8, 4, 2


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)


def _require(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI is set, so the Slurm example must run here "
                    "(run scripts/setup-slurm as root first)")
    pytest.skip(why)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class SlurmCluster:
    """munged + slurmctld + slurmd for one node, all private to ``root``."""

    def __init__(self, root: str):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        self.conf = os.path.join(root, "slurm.conf")
        self.env["SLURM_CONF"] = self.conf

    def _log(self, name: str) -> str:
        try:
            with open(os.path.join(self.root, name)) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def start(self) -> "SlurmCluster":
        r = self.root
        munge = os.path.join(r, "munge")
        os.makedirs(munge, mode=0o755)
        for d in ("state", "spool", "out"):
            os.makedirs(os.path.join(r, d))
        key = os.path.join(munge, "munge.key")
        if _tool("mungekey"):
            subprocess.run([_tool("mungekey"), "-c", "-k", key], check=True, capture_output=True)
        else:
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        self.munge_socket = os.path.join(munge, "munge.sock")
        self.procs.append(subprocess.Popen(
            [_tool("munged"), "-F", "-f", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={munge}/munged.pid", f"--log-file={r}/munged.log",
             f"--seed-file={munge}/munged.seed"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 15
        while not os.path.exists(self.munge_socket):
            if self.procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self._log('munged.log')}")
            time.sleep(0.05)

        host = socket.gethostname().split(".")[0]
        self.node = host
        ctl_port, slurmd_port = lc.free_ports(2)
        mem_mib = max(1024, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (2 << 20))
        with open(self.conf, "w") as f:
            f.write(f"""\
ClusterName=snaptest{os.getpid()}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctl_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mib} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        for cmd in (["slurmctld", "-D", "-i", "-f", self.conf], ["slurmd", "-D", "-f", self.conf]):
            self.procs.append(subprocess.Popen([_tool(cmd[0]), *cmd[1:]], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        state = ""
        while state not in ("idle", "mixed", "allocated"):
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited {p.returncode}: "
                                       f"{self._log('slurmctld.log')}{self._log('slurmd.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not idle after 30 s ({state!r}): {self._log('slurmd.log')}")
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                                 capture_output=True, text=True)
            state = out.stdout.strip().rstrip("*")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env,
                       capture_output=True, timeout=30)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            _stop(p)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _require(all(_tool(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")),
             "Slurm and MUNGE are not installed (scripts/setup-slurm installs Debian's "
             "slurm-wlm and munge)")
    _require(os.geteuid() == 0, "starting slurmd and munged needs root")
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        subprocess.run(["srun", "-N1", "-n1", "true"], env=cluster.env, check=True,
                       capture_output=True, timeout=30)
        yield cluster
    finally:
        cluster.stop()


def _events(text: str) -> list[dict]:
    """The trainers' JSON event lines. Every rank of the step writes into the one Slurm
    output file, and the step's I/O forwarding can put one rank's line right after
    another's before its newline (seen in CI: two "done" records on one line), so each
    line is read as a run of whole JSON objects."""
    out, dec = [], json.JSONDecoder()
    for line in text.splitlines():
        i = 0 if line.startswith('{"event"') else -1
        while i >= 0:
            rec, end = dec.raw_decode(line, i)
            out.append(rec)
            i = line.find('{"event"', end)
    return out


SRUN_LINE_CHUNK = 1024  # srun --label cuts an output line longer than this into labelled pieces


def _stats(text: str) -> dict:
    """The JSON that `snapshotd stats` printed under srun --label ("0: {" ... "0: }").
    A line longer than 1024 bytes (the cluster status string) arrives cut into pieces,
    each with its own label (seen in CI: a newline inside a JSON string): pieces of
    exactly that length are joined to the next one again."""
    lines, glue = [], False
    for ln in text.splitlines():
        if not ln.startswith("0: "):
            continue
        piece = ln[3:]
        if glue:
            lines[-1] += piece
        else:
            lines.append(piece)
        glue = len(piece.encode()) == SRUN_LINE_CHUNK
    start = lines.index("{")
    end = lines.index("}", start)
    return json.loads("\n".join(lines[start:end + 1]))


def test_sbatch_example_restores_after_a_crash_and_ends_healthy(slurm):
    grpc_port, peer_port, rdzv = lc.free_ports(3)
    env = dict(slurm.env)
    env.update({
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        "SNAP_NPROC_PER_NODE": str(NPROC), "SNAP_GRPC_PORT": str(grpc_port),
        "SNAP_PEER_PORT": str(peer_port), "SNAP_RDZV_PORT": str(rdzv),
        "SNAPSHOTD_MEMORY_BUDGET_BYTES": "512MiB", "SNAPSHOTD_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
    })
    out_pattern = os.path.join(slurm.root, "out", "%j.out")
    t0 = time.monotonic()
    run = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={out_pattern}", "--time=5", SBATCH,
         TRAIN, "--steps", str(STEPS), "--crash-at", str(CRASH_AT), "--require-daemon"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - t0
    job = run.stdout.strip().split(";")[0]
    outs = glob.glob(os.path.join(slurm.root, "out", "*.out"))
    text = open(outs[0]).read() if outs else ""
    assert run.returncode == 0, f"sbatch exit {run.returncode}: {run.stderr}\n{text[-6000:]}"
    print(f"Slurm job {job} took {elapsed:.1f} s")

    ev = _events(text)
    restored = [e for e in ev if e["event"] == "restored"]
    # attempt 1 starts fresh on every rank, crashes after step CRASH_AT committed ...
    assert sorted(e["step"] for e in restored[:NPROC]) == [0] * NPROC, text[-4000:]
    assert [e["step"] for e in ev if e["event"] == "crash"] == [CRASH_AT]
    assert "training attempt 1 failed" in text
    # ... and attempt 2 restores that step (model, optimizer, data position) on every rank.
    assert sorted((e["rank"], e["step"], e["data_position"]) for e in restored[NPROC:]) == \
        [(r, CRASH_AT, CRASH_AT) for r in range(NPROC)]
    steps = [e["step"] for e in ev if e["event"] == "step"]
    assert steps == list(range(1, CRASH_AT + 1)) + list(range(CRASH_AT + 1, STEPS + 1))
    done = [e for e in ev if e["event"] == "done"]
    assert sorted(e["rank"] for e in done) == list(range(NPROC))
    assert {e["start"] for e in done} == {CRASH_AT}
    assert len({e["digest"] for e in done}) == 1, "the replicas diverged after the restore"

    # healthy: before training, after the failure, and at the end
    assert text.count(f"{slurm.node}: daemon SERVING at {slurm.node}:{grpc_port}") == 3
    assert "training finished on attempt 2" in text
    assert "RESULT: finished after 2 attempt(s); 1 daemon(s) healthy" in text
    stats = _stats(text)
    jobs = {j["jobId"]: j for j in stats["jobs"]}
    assert int(jobs[f"slurm-{job}"]["latestCommittedVersion"]) == STEPS
    assert int(jobs[f"slurm-{job}"]["worldSize"]) == NPROC
    assert int(stats.get("requestsRefused", 0)) == 0

    # the job cleaned up after itself: daemon gone, shared memory and node-local state freed
    assert "daemons stopped, shared memory freed" in text
    assert glob.glob(f"/dev/shm/snapshotd.slurm{job}.*") == []
    assert not os.path.exists(f"/tmp/snapshotd-slurm-{job}")
    ps = subprocess.run(["pgrep", "-f", f"--instance slurm{job}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", f"a daemon of job {job} is still running: {ps.stdout}"
