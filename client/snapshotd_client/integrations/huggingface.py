"""Hugging Face ``transformers.Trainer`` integration: ``SnapshotdCallback``.

    from snapshotd_client.integrations.huggingface import SnapshotdCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SnapshotdCallback(every_n_steps=10, job_id="my-run")])
    trainer.train()   # resumes from the job's last committed snapshot, if it has one

What a snapshot holds: the model, the optimizer, the LR scheduler, the ``TrainerState``
(global step, epoch, flos, tokens seen, log history, best metric), the RNG states of
python/numpy/torch (and CUDA), and hence the data position: the Trainer's sampler is
seeded per epoch (accelerate's ``SeedableRandomSampler``), so (epoch, batches done in it)
follows from the global step as in the Trainer's own ``resume_from_checkpoint``.

Call order (one Trainer, training thread only): ``on_train_begin`` builds the Snapshotter
from the objects the Trainer hands its callbacks and restores the last committed snapshot;
a restore in the middle of an epoch makes the dataloader skip the batches already trained
on (accelerate's ``skip_batches``) and puts the RNG state back once the first batch has
been fetched (creating the epoch's iterator draws from the torch RNG, as the Trainer's own
resume accounts for); a restore in a later epoch shifts the sampler's epoch. ``on_step_end``
saves every ``every_n_steps`` optimizer steps (after the optimizer and scheduler stepped and
before the next batch is fetched); ``on_train_end`` waits for the last hand-off and closes.

Limits, as for the Trainer's own resume: exact when ``gradient_accumulation_steps`` divides
the batches of an epoch; the first loss logged after a resume averages only the steps since
the resume. Importing this module needs ``transformers``; the package does not.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("snapshotd_client.integrations.huggingface needs transformers "
                      "(pip install transformers)") from exc

from snapshotd_client import state as st
from snapshotd_client.snapshotter import Snapshotter

__all__ = ["SnapshotdCallback"]

log = logging.getLogger("snapshotd_client")

# TrainerState fields that describe the progress of the run (the others describe the
# configuration of this launch: max_steps, logging_steps, batch size, ... and stay as set).
_PROGRESS_FIELDS = ("global_step", "epoch", "total_flos", "num_input_tokens_seen", "log_history",
                    "best_metric", "best_global_step", "best_model_checkpoint")


class _TrainerStateProvider:
    """The progress fields of a TrainerState as a state provider (JSON-able values)."""

    def __init__(self, state) -> None:
        self.state = state
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return {k: getattr(self.state, k) for k in _PROGRESS_FIELDS if hasattr(self.state, k)}

    def load_state_dict(self, d: dict) -> None:
        self.loaded = dict(d)
        for k, v in d.items():
            if k in _PROGRESS_FIELDS:
                setattr(self.state, k, v)


class _EpochShift:
    """A sampler seen through an epoch offset: ``set_epoch(e)`` sets ``e + offset``."""

    def __init__(self, inner, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch + self.offset)

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _batch_sampler_holding_sampler(dl):
    """The batch sampler whose ``sampler`` the dataloader's ``set_epoch`` reaches, or None."""
    bs = getattr(dl, "batch_sampler", None)
    for cand in (bs, getattr(bs, "batch_sampler", None)):
        if cand is not None and hasattr(getattr(cand, "sampler", None), "set_epoch"):
            return cand
    return None


class SnapshotdCallback(TrainerCallback):
    """Snapshot a ``transformers.Trainer`` run into snapshotd every ``every_n_steps``
    optimizer steps and resume it, bit-exactly, at the start of ``train()``.

    ``snapshotter_options``: passed to ``Snapshotter`` (``job_id``, ``socket_path``,
    ``on_daemon_unavailable``, ``shard_replicated``, ...). After ``train()`` began,
    ``restored_step`` is the global step it resumed from (0: a fresh start) and
    ``snapshotter`` the Snapshotter in use."""

    def __init__(self, every_n_steps: int = 1, **snapshotter_options) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps!r}")
        self.every_n_steps = int(every_n_steps)
        self.options = snapshotter_options
        self.snapshotter: Snapshotter | None = None
        self.restored_step = 0
        self._rng_after_fetch: dict | None = None  # put back at the first step after a restore
        self._epoch_layout: tuple[int, int, int] | None = None  # (batches, updates/epoch, accum)
        self._resumed = False

    # -- train begin: build and restore ------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("SnapshotdCallback: the Trainer passed no model/optimizer to "
                               "on_train_begin; this transformers version is not supported")
        self._trainer_state = _TrainerStateProvider(state)
        # accelerate's AcceleratedOptimizer wraps the torch optimizer (and lacks its hooks);
        # it steps and loads through the inner one, so that is the one to snapshot.
        optimizer = getattr(optimizer, "optimizer", optimizer)
        self.snapshotter = Snapshotter(model, optimizer, lr_scheduler=lr_scheduler,
                                       state={"trainer_state": self._trainer_state},
                                       **self.options)
        self._epoch_layout = self._layout(args, train_dataloader)
        self.restored_step = self.snapshotter.restore()
        self._resumed = self.restored_step > 0
        if self._resumed and 0 < state.max_steps <= state.global_step:
            self._finished(state, control, train_dataloader)
        elif self._resumed:
            self._fast_forward(args, state, train_dataloader)
        return control

    def _finished(self, state, control, dl) -> None:
        """The job's snapshot is already at max_steps: train nothing (the Trainer would
        otherwise take one more step before it checks), and say so."""
        log.warning("snapshotd: job %s already reached global step %d (max_steps %d): "
                    "nothing left to train; a new run needs a new job id",
                    self.snapshotter.cfg.job_id, state.global_step, state.max_steps)
        control.should_training_stop = True
        if dl is not None and hasattr(dl, "skip_batches") and self._epoch_layout is not None:
            dl.skip_batches = self._epoch_layout[0]  # an empty epoch; the Trainer then stops

    @staticmethod
    def _layout(args, dl) -> tuple[int, int, int] | None:
        try:
            n = len(dl)
        except TypeError:  # an iterable dataset: no epochs to place the step in
            return None
        ga = max(int(args.gradient_accumulation_steps), 1)
        return n, max(n // ga + int(n % ga > 0), 1), ga

    def _fast_forward(self, args, state, dl) -> None:
        """Put the data stream where the snapshot left it, as the Trainer's own resume does."""
        if self._epoch_layout is None or dl is None:
            log.warning("snapshotd: the train dataloader has no length; the data stream "
                        "restarts from its beginning after the restore")
            return
        _, per_epoch, ga = self._epoch_layout
        epoch, skip = divmod(state.global_step, per_epoch)
        skip = 0 if args.ignore_data_skip else skip * ga
        if epoch:
            holder = _batch_sampler_holding_sampler(dl)
            if holder is None:
                log.warning("snapshotd: the train sampler has no set_epoch; epoch %d's data "
                            "order cannot be reproduced after the restore", epoch)
            else:
                holder.sampler = _EpochShift(holder.sampler, epoch)
        if skip:
            if not hasattr(dl, "skip_batches"):
                raise RuntimeError("SnapshotdCallback: the train dataloader cannot skip batches "
                                   f"({type(dl).__name__} has no skip_batches)")
            dl.skip_batches = skip
            # Creating the epoch's iterator draws from the torch RNG: the snapshot's state
            # goes back once the first batch has been fetched (on_step_begin).
            self._rng_after_fetch = st.capture_rng_state()
        log.info("snapshotd: resumed at global step %d (epoch %d, %d batches into it)",
                 state.global_step, epoch, skip)

    # -- during training --------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self._rng_after_fetch is not None:
            st.restore_rng_state(self._rng_after_fetch)
            self._rng_after_fetch = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._resumed and self._epoch_layout is not None:
            # The Trainer counts the epoch of this train() call from 0: state.epoch as an
            # uninterrupted run has it (epoch + batches done in it / batches per epoch).
            n, per_epoch, ga = self._epoch_layout
            e = (state.global_step - 1) // per_epoch
            state.epoch = e + min((state.global_step - e * per_epoch) * ga, n) / n
        if state.global_step % self.every_n_steps == 0:
            self.snapshotter.save(state.global_step)
        return control

    def on_epoch_end(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None and getattr(train_dataloader, "skip_batches", 0):
            train_dataloader.skip_batches = 0  # only the resumed epoch starts part-way
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.snapshotter is not None:
            self.snapshotter.close()  # a later train() builds a new one
        return control
