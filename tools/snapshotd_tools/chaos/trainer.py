"""The chaos harness's trainer: ``snapshotd_tools.demo.dp_trainer`` plus a state digest per event.

Run exactly like ``python -m snapshotd_tools.demo.dp_trainer`` (same flags). Every ``restored``
and ``step`` JSON line it prints also carries ``digest``, and a ``built`` line gives the
digest of the initial state: the sha256 of the model
parameters and optimizer state (``snapshotd_tools.demo.trainer.digest_state``) at that step.

Why a wrapper and not a copy: the harness must compare the state a scenario restored at
step s with a failure-free reference at the same step s, bit for bit, and the stock
trainer only prints a digest at the end. Rather than fork its training loop, this wraps
two of its module functions: ``build`` (to keep hold of the model and optimizer it
makes) and ``_emit`` (to add the digest to the records it prints). The loop, the
gradient all-reduce and the snapshot/restore calls are the stock trainer's own.
"""

from __future__ import annotations

import sys

from snapshotd_tools.demo import dp_trainer
from snapshotd_tools.demo.trainer import digest_state


def main(argv=None) -> int:
    held: dict = {}
    build, emit = dp_trainer.build, dp_trainer._emit

    def build_and_keep(seed: int, rank: int):
        out = build(seed, rank)
        held["model"], held["opt"] = out[0], out[1]
        emit({"event": "built", "rank": rank, "digest": digest_state(out[0], out[1])})
        return out

    def emit_with_digest(rec: dict) -> None:
        if rec.get("event") in ("restored", "step") and held:
            rec["digest"] = digest_state(held["model"], held["opt"])
        emit(rec)

    dp_trainer.build, dp_trainer._emit = build_and_keep, emit_with_digest
    try:
        return dp_trainer.main(argv)
    finally:
        dp_trainer.build, dp_trainer._emit = build, emit


if __name__ == "__main__":
    sys.exit(main())
