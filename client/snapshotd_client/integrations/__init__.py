"""Framework integrations of the Snapshotter, one module per framework.

- ``snapshotd_client.integrations.huggingface``: ``SnapshotdCallback`` for
  ``transformers.Trainer`` (needs ``transformers``);
- ``snapshotd_client.integrations.lightning``: ``SnapshotdCheckpointIO`` and
  ``SnapshotdCallback`` for PyTorch Lightning (needs ``pytorch_lightning``).

Importing this package imports no framework: each module imports its own, when it is
imported, and says what to install when that framework is missing. For torchrun (plain
DDP loops) no integration is needed; see docs/INTEGRATIONS.md for its restart settings.
"""
