"""Moved to :mod:`snapshotd.node.peer.curve` (issue 13); this name stays until its last
importer (snapshotd/node/cluster/node.py) imports ``snapshotd.node.peer`` instead."""

from snapshotd.node.peer.curve import CurvePeers, available, derive_keypair  # noqa: F401
