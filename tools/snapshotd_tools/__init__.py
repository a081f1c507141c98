"""snapshotd_tools: the ``snapshotd`` command, the local cluster, the demo, the chaos
harness and the example trainers. Outside the daemon: it may import every package of
snapshotd, and none of them imports it. See docs/ARCHITECTURE.md.
"""
