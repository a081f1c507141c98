"""Hugging Face ``transformers.Trainer`` with ``SnapshotdCallback``, killed and resumed for real.

A tiny GPT-2 built from ``GPT2Config`` (dropout on) trains on a synthetic dataset over three
epochs with a snapshot every step into a real daemon. The first process is SIGKILLed
mid-run (in its second epoch); a second process resumes it through the callback alone and
then, in the same process, trains a failure-free reference from nothing. Model, optimizer,
scheduler and TrainerState progress of the resumed run must equal the reference bit for bit.
Relaunched once more after it finished, the job restores its last step and trains nothing.

This file is also that training process (``python test_hf_trainer.py --job J --out F``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STEPS, KILL_AFTER, HOLD_AT = 25, 12, 17  # 10 steps an epoch; the kill lands in epoch 2


def train(job: str, out_dir: str, hold_at: int) -> dict:
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)

    from snapshotd_client.integrations.huggingface import SnapshotdCallback
    from snapshotd_tools.demo.trainer import digest_state

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n=40, seq=16, vocab=64):
            g = torch.Generator().manual_seed(5)
            start = torch.randint(0, vocab, (n, 1), generator=g)
            self.x = (start + torch.arange(seq)) % vocab

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    class Hold(TrainerCallback):  # the first process stops here until the test kills it
        def on_step_end(self, args, state, control, **kw):
            time.sleep(0.03)
            while hold_at and state.global_step >= hold_at:
                time.sleep(0.05)

    set_seed(7)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                       n_head=2))
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=4, max_steps=STEPS,
                             learning_rate=3e-3, warmup_steps=3, lr_scheduler_type="linear",
                             logging_steps=1000, save_strategy="no", report_to=[], seed=7,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    cb = SnapshotdCallback(every_n_steps=1, job_id=job, on_daemon_unavailable="raise")
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      callbacks=[cb] + ([Hold()] if hold_at else []))
    trainer.train()
    return {"start": cb.restored_step, "digest": digest_state(model, trainer.optimizer),
            "global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
            "lr": trainer.lr_scheduler.get_last_lr()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--hold-at", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rec = {"run": train(a.job, os.path.dirname(a.out), a.hold_at)}
    rec["reference"] = train(a.job + "-ref", os.path.dirname(a.out), 0)
    rec["again"] = train(a.job, os.path.dirname(a.out), 0)  # the finished job relaunched
    with open(a.out, "w") as f:
        json.dump(rec, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------

from resumekit import (  # noqa: E402
    check_imports_without, check_resumed_bit_exact, crash_and_resume, require)

require("transformers")


def test_hf_trainer_sigkilled_mid_epoch_resumes_bit_exact(daemon, tmp_path):
    killed_at, rec = crash_and_resume(daemon, os.path.abspath(__file__), tmp_path, "hf-run",
                                      KILL_AFTER, HOLD_AT)
    check_resumed_bit_exact(rec, killed_at, HOLD_AT, STEPS)


def test_without_transformers_the_package_imports_and_the_module_says_what_to_install():
    check_imports_without("transformers", "snapshotd_client.integrations.huggingface",
                          "snapshotd_client.integrations.huggingface needs transformers "
                          "(pip install transformers)")
