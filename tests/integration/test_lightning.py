"""PyTorch Lightning with ``SnapshotdCheckpointIO`` + ``SnapshotdCallback``, killed and resumed.

A tiny LightningModule (dropout on, AdamW, a LambdaLR warm-up stepped every step) trains
three epochs on a synthetic dataset with a shuffling sampler, a snapshot every step into a
real daemon. The first process is SIGKILLed mid-run, in its second epoch; a second process
resumes it with ``fit(ckpt_path=io.resume_path())`` and then, in the same process, trains a
failure-free reference from nothing. Parameters, optimizer and scheduler state, global step
and epoch of the resumed run must equal the reference bit for bit. Relaunched once more
after it finished, the job restores its last step and trains nothing.

This file is also that training process (``python test_lightning.py --job J --out F``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STEPS, KILL_AFTER, HOLD_AT = 25, 12, 17  # 10 batches an epoch; the kill lands in epoch 2


def train(job: str, hold_at: int) -> dict:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from snapshotd_client.integrations.lightning import SnapshotdCallback, SnapshotdCheckpointIO
    from snapshotd_tools.demo.trainer import digest_state

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
            return [opt], [{"scheduler": sched, "interval": "step"}]

    class Hold(pl.Callback):  # the first process stops here until the test kills it
        def on_train_batch_end(self, trainer, *a):
            time.sleep(0.03)
            while hold_at and trainer.global_step >= hold_at:
                time.sleep(0.05)

    pl.seed_everything(11, verbose=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 8, generator=g)
    ds = TensorDataset(x, x.sum(1, keepdim=True).sin())
    loader = DataLoader(ds, batch_size=4,
                        sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True,
                                                   seed=3))
    model = Tiny()
    io = SnapshotdCheckpointIO(job_id=job, on_daemon_unavailable="raise")
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         plugins=[io],
                         callbacks=[SnapshotdCallback(io)] + ([Hold()] if hold_at else []))
    trainer.fit(model, loader, ckpt_path=io.resume_path())
    opt = trainer.optimizers[0]
    return {"start": io.restored_step, "digest": digest_state(model, opt),
            "global_step": trainer.global_step, "epoch": trainer.current_epoch,
            "lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--hold-at", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rec = {"run": train(a.job, a.hold_at)}
    rec["reference"] = train(a.job + "-ref", 0)
    rec["again"] = train(a.job, 0)  # the finished job relaunched
    with open(a.out, "w") as f:
        json.dump(rec, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------

from resumekit import (  # noqa: E402
    check_imports_without, check_resumed_bit_exact, crash_and_resume, require)

require("pytorch_lightning")


def test_lightning_sigkilled_mid_epoch_resumes_bit_exact(daemon, tmp_path):
    killed_at, rec = crash_and_resume(daemon, os.path.abspath(__file__), tmp_path, "pl-run",
                                      KILL_AFTER, HOLD_AT)
    check_resumed_bit_exact(rec, killed_at, HOLD_AT, STEPS)


def test_without_lightning_the_package_imports_and_the_module_says_what_to_install():
    check_imports_without("pytorch_lightning", "snapshotd_client.integrations.lightning",
                          "snapshotd_client.integrations.lightning needs pytorch_lightning "
                          "(pip install pytorch-lightning)")
