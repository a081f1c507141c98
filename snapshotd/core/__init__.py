"""core: the pure logic of snapshotd. No sockets, threads, clocks, logging,
subprocesses or files; it imports only :mod:`snapshotd.wire`.

erasure (GF(2^8) Reed-Solomon), placement (stripes and holders), protocol (the commit
state machine), ledger (slot states), recovery (what to fetch to rebuild), integrity
(scrub and re-plan around corrupt blocks), spec (cluster spec parsing), checkfree
(rebuilding a lost pipeline stage). See docs/ARCHITECTURE.md.
"""
