"""A fork server for trainer ranks: import torch once, start a rank in milliseconds.

Why: the harness restarts the training job after every crash fault, and a fresh Python
process spends about 3.5 s of CPU before its first step (``import torch`` 2 s,
``torch.use_deterministic_algorithms`` 1.4 s). Four ranks on two cores made every
restart cost about 8 s, which capped the soak at one fault per minute. The fork server
pays that once: it imports torch, the client and the trainers, then waits for
commands; each rank is an ``os.fork`` of it that runs the trainer module as
``__main__``. Every rank is still its own real process (its own pid, killed with real
signals, its gloo sockets, gRPC channels and shared-memory mappings its own); only the
imported, not yet used, torch is shared copy-on-write.

The server is single-threaded and runs no torch op before forking (forking a process
whose thread pools are running is unsafe). Its channel is a ``SOCK_SEQPACKET`` Unix
socket pair; a command is one JSON message with two file descriptors attached (the
rank's stdout, the write end of a pipe the harness reads, and its stderr log)::

    {"spawn": id, "module": "snapshotd_tools.chaos.trainer", "argv": [...], "env": {...}}
      -> {"spawned": id, "pid": pid}       (or {"spawned": id, "error": "..."})
    (later)  {"exited": pid, "rc": rc}     (rc < 0: killed by signal -rc, as in subprocess)

No pickle crosses the boundary: JSON and file descriptors only. The server exits when
the harness closes its end, killing any rank still running.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

# What the ranks import, but not the modules they run as __main__ (runpy warns about,
# and would execute a second copy of, a module already imported under its own name).
PRELOAD = ("torch.distributed", "snapshotd_tools.demo.dp_trainer", "snapshotd_tools.demo.trainer",
           "snapshotd.core.checkfree", "snapshotd_client", "snapshotd_client.pipeline")


def _rc(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _run_child(cmd: dict, out_fd: int, err_fd: int) -> None:
    """In the forked child: become the rank and never return."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (null, out_fd, err_fd):
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update(cmd["env"])
        import runpy

        sys.argv = [cmd["module"], *cmd["argv"]]
        try:
            runpy.run_module(cmd["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the rank's failure, reported as its exit status
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(fd: int) -> int:
    """The server's loop on the inherited socket ``fd``."""
    sock = socket.socket(fileno=fd)
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import importlib

    for mod in PRELOAD:
        importlib.import_module(mod)
    children: set[int] = set()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sock.send(json.dumps({"ready": os.getpid()}).encode())

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            sock.send(json.dumps({"exited": pid, "rc": _rc(status)}).encode())

    try:
        while True:
            ready, _, _ = select.select([sock, wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
                reap()
            if sock not in ready:
                continue
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
            if not msg:
                return 0  # the harness is gone
            try:
                cmd = json.loads(msg)
                if len(fds) != 2 or not isinstance(cmd.get("argv"), list):
                    raise ValueError("a spawn needs argv and two descriptors (stdout, stderr)")
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    _run_child(cmd, fds[0], fds[1])
                children.add(pid)
                reply = {"spawned": cmd.get("spawn"), "pid": pid}
            except (ValueError, OSError) as exc:
                reply = {"spawned": None, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                for f in fds:
                    os.close(f)
            sock.send(json.dumps(reply).encode())
            reap()
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ForkedProc:
    """A rank started by the fork server, with the slice of ``subprocess.Popen``'s
    interface the harness uses (pid, stdout, poll, wait, send_signal)."""

    def __init__(self, server: "ForkServer", pid: int, stdout):
        self.server, self.pid, self.stdout = server, pid, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.server.cond:
            while self.poll() is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
                if not self.server.alive:
                    raise RuntimeError(f"the fork server died; rank pid {self.pid} unaccounted")
                self.server.cond.wait(left if left is not None else 1.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class ForkServer:
    """The harness's handle on one fork server process."""

    def __init__(self, log_path: str, startup_timeout_s: float = 120.0):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "snapshotd_tools.chaos.forkserver", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        theirs.close()
        self.sock = mine
        self.cond = threading.Condition()
        self.exits: dict[int, int] = {}
        self.replies: dict = {}
        self.alive = True
        self._n = 0
        self._send_lock = threading.Lock()
        mine.settimeout(startup_timeout_s)
        try:
            hello = json.loads(mine.recv(4096) or b"{}")
        except (OSError, ValueError) as exc:
            self.close()
            raise RuntimeError(f"the trainer fork server did not start ({exc}); see {log_path}") from None
        if "ready" not in hello:
            self.close()
            raise RuntimeError(f"the trainer fork server did not start; see {log_path}")
        mine.settimeout(None)
        threading.Thread(target=self._listen, daemon=True, name="forkserver").start()

    def _listen(self) -> None:
        try:
            while True:
                msg = self.sock.recv(1 << 16)
                if not msg:
                    break
                ev = json.loads(msg)
                with self.cond:
                    if "exited" in ev:
                        self.exits[ev["exited"]] = ev["rc"]
                    else:
                        # A new rank's pid may be an old rank's, reused by the kernel (pids
                        # wrap at pid_max: within an hour on a busy machine). Its old exit
                        # code must not be taken for the new rank's: a soak saw ranks that
                        # "exited 1" with no error at all. The server sends a rank's
                        # "spawned" before its "exited", so what is dropped here is stale.
                        self.exits.pop(ev.get("pid"), None)
                        self.replies[ev.get("spawned")] = ev
                    self.cond.notify_all()
        except OSError:
            pass
        finally:
            with self.cond:
                self.alive = False
                self.cond.notify_all()

    def exit_code(self, pid: int) -> int | None:
        with self.cond:
            return self.exits.get(pid)

    def spawn(self, module: str, argv: list[str], env: dict, stderr_path: str) -> ForkedProc:
        r, w = os.pipe()
        err = os.open(stderr_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with self._send_lock:
            self._n += 1
            ident = self._n
            try:
                socket.send_fds(self.sock, [json.dumps({"spawn": ident, "module": module, "argv": argv,
                                                        "env": env}).encode()], [w, err])
            finally:
                os.close(w)
                os.close(err)
        with self.cond:
            while ident not in self.replies:
                if not self.alive:
                    os.close(r)
                    raise RuntimeError("the trainer fork server died")
                self.cond.wait(1.0)
            reply = self.replies.pop(ident)
        if "pid" not in reply:
            os.close(r)
            raise RuntimeError(f"the fork server could not start {module}: {reply.get('error')}")
        return ForkedProc(self, reply["pid"], os.fdopen(r, "r"))

    def close(self) -> None:
        try:
            # shutdown, not only close: our listener thread is blocked in recv on this
            # socket, and a close alone would not reach the server until that returns.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()  # the server kills its remaining ranks and exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
