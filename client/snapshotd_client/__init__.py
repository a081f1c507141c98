"""Training-side client of snapshotd.

    from snapshotd_client import Snapshotter

    snap = Snapshotter(model, optimizer, lr_scheduler=sched)
    start = snap.restore()          # 0 when there is nothing to restore
    for step in range(start, steps):
        ...train one step...
        snap.save(step + 1)         # asynchronous; only the host copy blocks
"""

from snapshotd_client.snapshotter import Snapshotter, SnapshotterConfig  # noqa: F401

__all__ = ["Snapshotter", "SnapshotterConfig"]
