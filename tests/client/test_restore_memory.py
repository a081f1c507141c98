"""Nothing ``Snapshotter.restore()`` hands to user code points into a mapping it later unmaps.

A module that keeps the tensors it is given (its ``set_extra_state``, its own
``_load_from_state_dict``, a load_state_dict pre-hook) -- ordinary usage that works with
``torch.load`` -- must be able to read and mutate them after the Snapshotter is closed and
the daemon restarted. The trainer runs in a subprocess, so a SIGSEGV (reading an unmapped
segment, or writing a read-only one) is a failed test, not a crashed pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from conftest import REPO
from snapshotd_client.loader import copied_in_place

N = 1 << 18  # floats per kept tensor (1 MiB): whole pages, unmapped once the segment is closed

TRAINER = textwrap.dedent(r"""
    import json, sys
    import torch
    from snapshotd_client.snapshotter import Snapshotter

    SOCK, N = sys.argv[1], int(sys.argv[2])

    class Keeper(torch.nn.Module):
        # keeps what set_extra_state receives, as a module restored with torch.load may
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.table = torch.zeros(N)
        def get_extra_state(self):
            return {"table": self.table, "note": "kept"}
        def set_extra_state(self, s):
            self.table = s["table"]

    class Hooked(torch.nn.Module):
        # a module with its own loading code, keeping the tensor it was handed
        def __init__(self):
            super().__init__()
            self.register_buffer("codebook", torch.zeros(N))
            self.raw = None
        def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
            self.raw = state_dict[prefix + "codebook"]
            super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    def build(hooked, fill):
        # plain: only torch's loader and a set_extra_state (the parameters go in as views);
        # hooked: own loading code and a pre-hook (everything is copied out first)
        m = torch.nn.Sequential(Keeper(), Hooked() if hooked else torch.nn.Identity(),
                                torch.nn.Linear(8, 8))
        kept = {}
        if hooked:
            m.register_load_state_dict_pre_hook(
                lambda mod, sd, prefix, *a: kept.update(w=sd[prefix + "2.weight"]))
        if fill:
            m[0].table = torch.arange(N, dtype=torch.float32)
            if hooked:
                m[1].codebook.copy_(torch.arange(N, dtype=torch.float32) * 2)
        return m, kept

    def snap(job, m, extra):
        return Snapshotter(m, extra_state=extra, job_id=job, socket_path=SOCK, rank=0,
                           world_size=1, on_daemon_unavailable="raise", timeout_s=20)

    restored = {}
    for hooked in (False, True):
        job = "hooked" if hooked else "plain"
        src, _ = build(hooked, True)
        with snap(job, src, {"t": torch.full((N,), 7.0)}) as s:
            assert s.save(1).result(20).committed
        dst, kept = build(hooked, False)
        s = snap(job, dst, {"t": torch.zeros(1)})
        assert s.restore() == 1
        restored[job] = (src[2].weight.detach().clone(), dst, kept, s.extra_state["t"])
        s.close()
    print("RESTORED", flush=True)
    sys.stdin.readline()  # the test restarts the daemon meanwhile

    out = {}
    ar = torch.arange(N, dtype=torch.float32)
    for job, (want_w, dst, kept, extra_t) in restored.items():
        # read everything we were handed, then write into it in place
        out[job + ".table"] = bool(torch.equal(dst[0].table, ar))
        out[job + ".extra"] = bool(torch.equal(extra_t, torch.full((N,), 7.0)))
        dst[0].table.add_(1)
        extra_t.fill_(1)
        ok = torch.equal(dst[0].table, ar + 1) and float(extra_t.sum()) == N
        if job == "hooked":
            out["hooked.raw"] = bool(torch.equal(dst[1].raw, ar * 2))
            out["hooked.codebook"] = bool(torch.equal(dst[1].codebook, ar * 2))
            out["hooked.hook_w"] = bool(torch.equal(kept["w"], want_w))
            dst[1].raw.mul_(3)
            kept["w"].zero_()
            ok = ok and torch.equal(dst[1].raw, ar * 6) and float(kept["w"].abs().sum()) == 0
        out[job + ".mutated"] = bool(ok)
        # the model's own parameters never alias what was kept
        out[job + ".weight"] = bool(torch.equal(dst[2].weight, want_w))
    print("RESULT " + json.dumps(out), flush=True)
""")


def test_tensors_kept_by_user_code_outlive_the_client_and_the_daemon(daemon, tmp_path):
    script = tmp_path / "keeper.py"
    script.write_text(TRAINER)
    p = subprocess.Popen([sys.executable, str(script), daemon.socket, str(N)], cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "RESTORED", (line, p.wait(30), p.stderr.read()[-3000:])
        daemon.kill()  # the daemon goes away and comes back: nothing of ours may depend on it
        daemon.start()
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, f"trainer exited {p.returncode} (negative: killed by that signal): {err[-3000:]}"
    result = json.loads(out.split("RESULT ", 1)[1])
    want = [f"{j}.{k}" for j in ("plain", "hooked") for k in ("table", "extra", "mutated", "weight")]
    want += ["hooked.raw", "hooked.codebook", "hooked.hook_w"]
    assert result == {k: True for k in want}, result


class _Extra(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def get_extra_state(self):
        return {"x": torch.zeros(2)}

    def set_extra_state(self, s):
        pass


class _OwnLoad(torch.nn.Linear):
    def _load_from_state_dict(self, *a, **kw):
        super()._load_from_state_dict(*a, **kw)


def test_only_tensors_torch_copies_into_the_model_are_handed_over_as_views():
    m = torch.nn.Sequential(_Extra(), torch.nn.BatchNorm1d(2))
    assert copied_in_place(m) == {"0.lin.weight", "0.lin.bias", "1.weight", "1.bias",
                                  "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert "0._extra_state" in m.state_dict()  # handed to set_extra_state: never a view
    # anything that could keep what it is handed: every tensor is copied out first
    assert copied_in_place(torch.nn.Sequential(torch.nn.Linear(2, 2), _OwnLoad(2, 2))) == set()
    hooked = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    hooked[1].register_load_state_dict_pre_hook(lambda *a: None)
    assert copied_in_place(hooked) == set()
