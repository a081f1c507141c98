"""snapshotd: in-memory, erasure-coded snapshots of training state."""

__version__ = "0.1.0"
