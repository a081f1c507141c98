"""Training-side client of snapshotd (the README's "Using it in a training loop").

    from snapshotd_client import Snapshotter

    snap = Snapshotter(model, optimizer, lr_scheduler=sched,
                       state={"sampler": sampler, "best": lambda: best})  # read at each save
    start = snap.restore()          # 0 when there is nothing to restore
    best = snap.restored.get("best", best)
    for step in range(start, steps):
        ...train one step...
        snap.save(step + 1)         # asynchronous; only the host copy blocks

The job id comes from the launcher (torchrun, Slurm, a Kubernetes Job) or ``job_id=``;
with neither, ``Snapshotter`` raises ``JobIdentityError``.
"""

from snapshotd_client.config import JobIdentityError  # noqa: F401
from snapshotd_client.snapshotter import Snapshotter, SnapshotterConfig  # noqa: F401

__all__ = ["JobIdentityError", "Snapshotter", "SnapshotterConfig"]
