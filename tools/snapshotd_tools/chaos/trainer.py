"""The chaos harness's trainer: ``snapshotd_tools.demo.dp_trainer`` plus a state digest per
event and the trainer's own record of what committed.

Run exactly like ``python -m snapshotd_tools.demo.dp_trainer`` (same flags). Every ``restored``
and ``step`` JSON line it prints also carries ``digest``, and a ``built`` line gives the
digest of the initial state: the sha256 of the model
parameters and optimizer state (``snapshotd_tools.demo.trainer.digest_state``) at that step.
Every line carries ``time`` (``time.time()`` when it was written). Two more kinds of line:

- ``restoring`` (rank, time): the rank is about to ask its daemon for its state (the
  harness injects an overlapping fault "during a restore" on it);
- ``commit_seen`` (rank, version, time): a hand-off (AdoptShard) was answered, and the
  answer said ``version`` was the newest committed one. This is the trainers' own record
  of what committed, taken when it happened: the harness judges "the version committed
  when the fault hit" and "a new version committed after it" from these lines, not from
  what the daemons under test say afterwards. ``time`` is ``time.time()``.

Why a wrapper and not a copy: the harness must compare the state a scenario restored at
step s with a failure-free reference at the same step s, bit for bit, and the stock
trainer only prints a digest at the end. Rather than fork its training loop, this wraps
two of its module functions: ``build`` (to keep hold of the model and optimizer it
makes) and ``_emit`` (to add the digest to the records it prints), and two public
methods of the client (``DaemonClient.adopt``, ``Snapshotter.restore``) to report what
they were told. The loop, the gradient all-reduce and the snapshot/restore calls are
the stock trainer's own. Lines are written whole under one lock: the hand-off runs on
the Snapshotter's worker thread.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from snapshotd_tools.demo import dp_trainer
from snapshotd_tools.demo.trainer import digest_state

_LOCK = threading.Lock()


def _write(rec: dict) -> None:
    rec.setdefault("time", time.time())  # every line: when it happened, for the post-mortem
    line = json.dumps(rec) + "\n"
    with _LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def _record_commits(rank_of) -> tuple:
    """Wrap DaemonClient.adopt and Snapshotter.restore; return the originals."""
    from snapshotd_client import Snapshotter
    from snapshotd_client.transport import DaemonClient

    adopt, restore = DaemonClient.adopt, Snapshotter.restore

    def adopt_and_record(self, segment_name, manifest, *args, **kw):  # the client's own arguments
        resp = adopt(self, segment_name, manifest, *args, **kw)
        if isinstance(manifest, bytes):  # the Snapshotter's: the manifest serialized
            from snapshotd.wire._proto import snapshotd_pb2 as pb
            manifest = pb.ShardManifest.FromString(manifest)
        _write({"event": "commit_seen", "rank": manifest.rank, "version": int(resp.latest_committed_version),
                "delivered": int(manifest.version), "time": time.time()})
        return resp

    def restore_and_say(self, *a, **kw):
        _write({"event": "restoring", "rank": rank_of(), "time": time.time()})
        return restore(self, *a, **kw)

    DaemonClient.adopt, Snapshotter.restore = adopt_and_record, restore_and_say
    return adopt, restore


def main(argv=None) -> int:
    held: dict = {}
    build, emit = dp_trainer.build, dp_trainer._emit

    def build_and_keep(seed: int, rank: int):
        out = build(seed, rank)
        held["model"], held["opt"], held["rank"] = out[0], out[1], rank
        _write({"event": "built", "rank": rank, "digest": digest_state(out[0], out[1])})
        return out

    def emit_with_digest(rec: dict) -> None:
        if rec.get("event") in ("restored", "step") and "model" in held:
            rec["digest"] = digest_state(held["model"], held["opt"])
        _write(rec)

    from snapshotd_client import Snapshotter
    from snapshotd_client.transport import DaemonClient

    dp_trainer.build, dp_trainer._emit = build_and_keep, emit_with_digest
    adopt, restore = _record_commits(lambda: held.get("rank", -1))
    try:
        return dp_trainer.main(argv)
    finally:
        dp_trainer.build, dp_trainer._emit = build, emit
        DaemonClient.adopt, Snapshotter.restore = adopt, restore


if __name__ == "__main__":
    sys.exit(main())
