"""Restore contenders: get the state back into the model after a trainer crash.

The contenders restore in one fresh process (``python -m bench.compare_restore``), as a
restarted trainer would, taking turns (round robin, so none gets a warmer process than
the others): each time it builds its model and a fresh AdamW optimizer (not timed: every
contender needs that), then the timed part loads the saved state into them, and the
result is checked against the saved state's fingerprint:

  snapshotd   Snapshotter(...).restore() from the local daemon (shared memory);
  torch.load  torch.load(file) + model/optimizer load_state_dict, from /dev/shm or from
              disk (the file's pages are dropped from the page cache before each
              repeat with posix_fadvise, so "disk" means the disk). (``mmap=True`` is
              available as kind "torch.load-mmap" but not in the suite: it leaves the
              optimizer's moments as unread views of the file, so it defers the work to
              the first step and breaks when the next torch.save rewrites that file);
  DCP load    get_state_dict + dcp.load + set_state_dict (the documented recipe), from
              disk, pages dropped likewise.

After a node loss, snapshotd rebuilds the lost node from its peers; that figure comes
from the m=2 cluster run (``compare_snapshot.snapshotd_cluster(rebuild=True)``, which
uses ``bench_cluster.measure_rebuild``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

KINDS = ("snapshotd", "torch.load", "torch.load-mmap", "dcp")


def _restore_once(kind: str, target: str, model, opt) -> None:
    import torch

    if kind == "snapshotd":
        from snapshotd_client import Snapshotter

        snap = Snapshotter(model, opt, job_id="bench", socket_path=target, rank=0, world_size=1,
                           on_daemon_unavailable="raise")
        try:
            if snap.restore() < 1:
                raise RuntimeError("the daemon had nothing to restore")
        finally:
            snap.close()
    elif kind in ("torch.load", "torch.load-mmap"):
        sd = torch.load(target, mmap=kind == "torch.load-mmap")
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
    elif kind == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=target)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        raise ValueError(f"unknown restore kind {kind!r}")


def worker(argv=None) -> int:
    """Internal: ``python -m bench.compare_restore SPEC_JSON``; prints one JSON line."""
    if not argv and len(sys.argv) > 1:
        argv = sys.argv[1:]
    if not argv or len(argv) != 1:
        print("usage: python -m bench.compare_restore SPEC_JSON (internal to python -m bench)",
              file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    from bench import common as cm

    warnings.simplefilter("ignore")
    import importlib

    for mod in ("torch.distributed.checkpoint.state_dict", "snapshotd_client"):
        importlib.import_module(mod)  # imports are not part of a restore

    out = {it["name"]: {"contender": it["name"], "kind": it["kind"], "restore_all_s": [],
                        "verified": True} for it in spec["items"]}
    for _ in range(spec["repeats"]):  # round robin: every contender sees the same process
        for it in spec["items"]:
            model, opt = cm.build_state(spec["state_bytes"], spec["tensor_bytes"], fill=False)
            if it.get("drop_cache"):
                cm.drop_page_cache(it["target"])
            t0 = time.perf_counter()
            _restore_once(it["kind"], it["target"], model, opt)
            dt = time.perf_counter() - t0
            r = out[it["name"]]
            r["restore_all_s"].append(dt)
            r["verified"] = r["verified"] and cm.fingerprint(model, opt) == spec["expect"]
            del model, opt
    for r in out.values():
        r["restore_s"] = cm.med(r["restore_all_s"])
        r["first_s"] = r["restore_all_s"][0]
    print(json.dumps(list(out.values())), flush=True)
    return 0


def run_worker(items: list[dict], state_bytes: int, tensor_bytes: int, repeats: int,
               expect: str, timeout_s: float = 900) -> list[dict]:
    """Restore every item ({name, kind, target, drop_cache}) in one fresh process, round
    robin, ``repeats`` times each; raises if it failed or restored the wrong bytes."""
    spec = {"items": items, "state_bytes": state_bytes, "tensor_bytes": tensor_bytes,
            "repeats": repeats, "expect": expect}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "bench.compare_restore", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout_s, cwd=root)
    lines = [x for x in r.stdout.splitlines() if x.startswith("[")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"restore worker failed ({r.returncode}): {r.stderr[-2000:]}")
    res = json.loads(lines[-1])
    bad = [x["contender"] for x in res if not x["verified"]]
    if bad:
        raise RuntimeError(f"restore worker: the state restored by {bad} does not match the saved one")
    return res


if __name__ == "__main__":
    sys.exit(worker())
