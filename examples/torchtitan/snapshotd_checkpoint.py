"""torchtitan's checkpoints in snapshotd: ``SnapshotdCheckpointManager``.

A subclass of torchtitan's ``CheckpointManager`` (torchtitan 0.3.0,
torchtitan/components/checkpointer/dcp.py) whose saves and loads go through
``SnapshotdWriter`` / ``SnapshotdReader`` instead of files: step N is version N + 1 of the
snapshotd job (versions start at 1; torchtitan may save step 0, the seed checkpoint), the
latest step is the job's latest committed version, and the daemon keeps only the latest,
so there is nothing to purge. Async modes: "async" is ``dcp.async_save`` (THREAD
executor), "async_with_pinned_mem" the PROCESS executor; in both the writer is its own
stager (the copy goes straight into the daemon's shared memory). Not supported: HF
safetensors export/import (``last_save_in_hf``, ``initial_load_in_hf``: those stay on
files) and loading a step other than the latest.

Use it where torchtitan builds its ``CheckpointManager`` (the Trainer's
``checkpointer``), with the same arguments plus ``job_id`` (default: from the launcher).
torchtitan is not a dependency of snapshotd: import this file from your own training
script. Called from the trainer's thread only, like torchtitan's own manager.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torchtitan.components.checkpointer.dcp import MODEL, AsyncMode, CheckpointManager

from snapshotd_client.config import resolve_job_id
from snapshotd_client.dcp import SnapshotdReader, SnapshotdWriter, parse_checkpoint_id


class SnapshotdCheckpointManager(CheckpointManager):
    """torchtitan's ``CheckpointManager`` with snapshotd as the storage (see the module
    docstring). ``job_id``, ``socket_path``: which job, which daemon (defaults as for
    ``SnapshotdWriter``)."""

    def __init__(self, *args, job_id: str | None = None, socket_path: str | None = None, **kwargs):
        self.job_id = job_id or resolve_job_id()[0]
        self.socket_path = socket_path
        super().__init__(*args, **kwargs)

    # -- where checkpoints are -------------------------------------------------------
    def _create_checkpoint_id(self, step: int, folder: str = "") -> str:
        return f"snapshotd:{self.job_id}/{step + 1}"

    def _find_load_step(self, folder: str = "") -> int:
        kw = {"socket_path": self.socket_path} if self.socket_path else {}
        reader = SnapshotdReader(job_id=self.job_id, **kw)
        try:
            latest = reader.client.list_versions(self.job_id).latest_committed_version
        except Exception:  # no such job on this daemon: nothing to resume from
            latest = 0
        finally:
            reader.close()
        return latest - 1 if latest else -1

    def _purge_stale_checkpoints(self) -> None:
        """The daemon keeps only the latest committed version: nothing to purge."""

    # -- save and load -----------------------------------------------------------------
    @torch.no_grad()
    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, async_mode: AsyncMode,
                 enable_garbage_collection: bool = False, to_hf: bool = False):
        if to_hf:
            raise NotImplementedError("SnapshotdCheckpointManager does not export HF safetensors; "
                                      "use torchtitan's CheckpointManager for the last save")
        _, version = parse_checkpoint_id(checkpoint_id)
        kw = {"socket_path": self.socket_path} if self.socket_path else {}
        writer = SnapshotdWriter(job_id=self.job_id, version=version, **kw)
        if async_mode == AsyncMode.DISABLED:
            dcp.save(state_dict, storage_writer=writer)
            writer.close()
            return None
        kind = (AsyncCheckpointerType.PROCESS if async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM
                else AsyncCheckpointerType.THREAD)
        fut = dcp.async_save(state_dict, storage_writer=writer, process_group=self.pg,
                             async_checkpointer_type=kind)
        if async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM:  # torchtitan expects a response here
            staged: Future = Future()
            staged.set_result(None)  # our staging is done when async_save returns
            return AsyncSaveResponse(staging_completion=staged, upload_completion=fut)
        return fut

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool,
                 from_quantized: bool) -> None:
        if from_hf:
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        _, version = parse_checkpoint_id(checkpoint_id)
        kw = {"socket_path": self.socket_path} if self.socket_path else {}
        reader = SnapshotdReader(job_id=self.job_id, version=version, **kw)
        try:
            dcp.load(state_dict, storage_reader=reader)
        finally:
            reader.close()
        if MODEL in self.states:  # as torchtitan's own dcp_load does
            self.states[MODEL].load_state_dict(state_dict)

    def _load(self, step: int = -1) -> bool:
        """Resume from the job's latest committed version; with none, torchtitan's own
        rules (initial_load_path on files, or a fresh start)."""
        latest = self._find_load_step()
        if latest == -1:
            return super()._load(step) if self.initial_load_path else False
        if step not in (-1, latest):
            raise ValueError(f"snapshotd holds step {latest} of job {self.job_id!r} only, "
                             f"not step {step}")
        states = self._states_to_load(model_only=latest == 0)
        self.dcp_load(states, checkpoint_id=self._create_checkpoint_id(latest), from_hf=False,
                      from_quantized=False)
        return True


__all__ = ["SnapshotdCheckpointManager"]
