"""node: the daemon's I/O shell around :mod:`snapshotd.core`.

store (shared-memory segments and the ledger), service and server (gRPC), peer (the
ZeroMQ peer plane), cluster (commit driver, parity buffers, membership, rebuilder,
scrubber, round records), metrics, cli (``snapshotd serve``). See docs/ARCHITECTURE.md.
"""
