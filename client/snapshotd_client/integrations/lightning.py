"""PyTorch Lightning integration: ``SnapshotdCheckpointIO`` (where checkpoints go) and
``SnapshotdCallback`` (when to take them, and what Lightning's own checkpoint lacks).

    from snapshotd_client.integrations.lightning import SnapshotdCallback, SnapshotdCheckpointIO

    io = SnapshotdCheckpointIO(job_id="my-run")
    trainer = pl.Trainer(..., plugins=[io],
                         callbacks=[SnapshotdCallback(io, every_n_train_steps=10)])
    trainer.fit(model, train_loader, ckpt_path=io.resume_path())   # None: a fresh start

The checkpoint is Lightning's own checkpoint dict (model, optimizers, LR schedulers, loops'
progress, callbacks' and datamodule state, stateful dataloaders), kept in the node's
snapshotd daemon instead of a file: ``Trainer.save_checkpoint`` hands it to
``save_checkpoint`` (on global rank 0, as for files), ``fit(ckpt_path=io.resume_path())``
reads it back through ``load_checkpoint``. The Snapshotter under it adds the RNG states of
python/numpy/torch (which Lightning does not checkpoint).

``SnapshotdCallback`` saves every ``every_n_train_steps`` optimizer steps (in
``on_train_batch_end``, where Lightning's ModelCheckpoint saves) and, after a restore in
the middle of an epoch, puts the data stream where the snapshot left it: a dataloader with
``state_dict``/``load_state_dict`` is restored by Lightning; any other has its sampler skip
the batches already trained on (the sampler must give the epoch's order from the epoch,
e.g. ``DistributedSampler``, which Lightning installs itself in distributed runs; a
``RandomSampler`` without a generator draws a new order). The RNG states go back once the
first batch after the restore has been fetched (creating the epoch's iterator draws from
the torch RNG, and in an uninterrupted run that draw came before the snapshot).

Rank 0 alone stores the checkpoint (Lightning's contract), so the Snapshotter runs as a
job of world size 1 on that rank. Importing this module needs ``pytorch_lightning``.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    import pytorch_lightning as pl
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning_fabric.utilities.types import _Stateful
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("snapshotd_client.integrations.lightning needs pytorch_lightning "
                      "(pip install pytorch-lightning)") from exc

import torch

from snapshotd_client import state as st
from snapshotd_client.snapshotter import Snapshotter

__all__ = ["SnapshotdCallback", "SnapshotdCheckpointIO"]

log = logging.getLogger("snapshotd_client")
_SCHEME = "snapshotd:"


class _CheckpointDict:
    """Lightning's checkpoint dict as a state provider: the dict being saved, or loaded."""

    def __init__(self) -> None:
        self.current: dict | None = None

    def state_dict(self) -> dict:
        return self.current

    def load_state_dict(self, d: dict) -> None:
        self.current = d


class SnapshotdCheckpointIO(CheckpointIO):
    """Lightning checkpoints kept in snapshotd. ``snapshotter_options`` go to the
    Snapshotter (``job_id``, ``socket_path``, ``on_daemon_unavailable``, ...). Not
    thread-safe: Lightning calls it from the training loop."""

    def __init__(self, **snapshotter_options) -> None:
        self.options = dict(snapshotter_options, rank=0, world_size=1)
        self._ckpt = _CheckpointDict()
        self._snap: Snapshotter | None = None
        self.restored_step = 0
        self.restored_rng: dict | None = None  # the RNG states as restored, for the callback

    @property
    def snapshotter(self) -> Snapshotter:
        if self._snap is None:  # an empty module: the checkpoint dict carries the model
            self._snap = Snapshotter(torch.nn.Module(), state={"lightning": self._ckpt},
                                     **self.options)
        return self._snap

    def latest_step(self) -> int:
        """The global step of the job's last committed checkpoint (0: none)."""
        from snapshotd.wire.errors import UnknownJobError

        try:
            return int(self.snapshotter.client.list_versions(self.snapshotter.cfg.job_id)
                       .latest_committed_version)
        except UnknownJobError:
            return 0

    def resume_path(self) -> str | None:
        """What to pass as ``fit(ckpt_path=...)``: the job's last committed checkpoint, or
        None when it has none (a fresh start)."""
        return f"{_SCHEME}{self.snapshotter.cfg.job_id}" if self.latest_step() else None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        step = int(checkpoint.get("global_step", 0))
        if step < 1:
            log.info("snapshotd: checkpoint at global step 0 not stored (nothing trained yet)")
            return
        self._ckpt.current = checkpoint
        try:
            self.snapshotter.save(step)
        finally:
            self._ckpt.current = None  # the snapshot holds copies now; drop the references

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if not str(path).startswith(_SCHEME):
            raise ValueError(f"SnapshotdCheckpointIO loads {_SCHEME}<job> paths (from "
                             f"resume_path()), not {str(path)!r}")
        job = str(path)[len(_SCHEME):]
        if job != self.snapshotter.cfg.job_id:
            raise ValueError(f"checkpoint path {str(path)!r} names job {job!r}, but this "
                             f"CheckpointIO stores job {self.snapshotter.cfg.job_id!r}")
        step = self.snapshotter.restore()
        if step == 0 or self._ckpt.current is None:
            raise FileNotFoundError(f"snapshotd: job {job!r} has no committed checkpoint")
        self.restored_step = step
        self.restored_rng = st.capture_rng_state()
        ckpt, self._ckpt.current = self._ckpt.current, None
        return ckpt

    def remove_checkpoint(self, path) -> None:
        pass  # the daemon keeps the last committed versions and drops older ones itself

    def teardown(self) -> None:
        if self._snap is not None:
            self._snap.close()
            self._snap = None


class _SkipFirst:
    """A sampler whose next iteration skips its first ``n`` indices, then is the sampler again."""

    def __init__(self, holder, n: int) -> None:
        self.holder, self.inner, self.n = holder, holder.sampler, n

    def __iter__(self):
        self.holder.sampler = self.inner  # one iteration only
        it = iter(self.inner)
        for _ in range(self.n):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class SnapshotdCallback(pl.Callback):
    """Checkpoint into ``io`` every ``every_n_train_steps`` optimizer steps; after a
    mid-epoch restore, put the data position and the RNG states back (see the module)."""

    def __init__(self, io: SnapshotdCheckpointIO, every_n_train_steps: int = 1) -> None:
        if int(every_n_train_steps) < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps!r}")
        self.io, self.every = io, int(every_n_train_steps)
        self._last_saved = -1
        self._rng_after_fetch: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.io.restored_step:
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if done <= 0:
            return  # restored at an epoch boundary: nothing of this epoch was trained yet
        self._rng_after_fetch = self.io.restored_rng
        dl = trainer.train_dataloader
        if isinstance(dl, _Stateful):
            return  # Lightning restored the loader's own position
        bs = getattr(dl, "batch_sampler", None)
        if getattr(bs, "sampler", None) is None or not getattr(bs, "batch_size", None):
            log.warning("snapshotd: cannot skip the %d batches already trained in this epoch "
                        "(%s has no batch sampler with a batch size); the epoch restarts", done,
                        type(dl).__name__)
            return
        bs.sampler = _SkipFirst(bs, done * bs.batch_size)
        log.info("snapshotd: resumed at global step %d, %d batches into epoch %d",
                 trainer.global_step, done, trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng_after_fetch is not None:
            st.restore_rng_state(self._rng_after_fetch)
            self._rng_after_fetch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_saved and step % self.every == 0 and step > 0:
            self._last_saved = step
            trainer.save_checkpoint(f"{_SCHEME}{self.io.snapshotter.cfg.job_id}")
