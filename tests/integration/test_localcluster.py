"""The local cluster's port allocation (snapshotd_tools.localcluster)."""

import yaml

from snapshotd_tools import localcluster as lc


def test_free_ports_are_distinct():
    for _ in range(20):
        ports = lc.free_ports(16)
        assert len(set(ports)) == 16 and all(1024 <= p < 65536 for p in ports)


def test_a_spec_never_gives_two_nodes_one_port(tmp_path):
    path = tmp_path / "spec.yaml"
    for _ in range(10):
        lc.write_spec(str(path), 8, 2, "64KiB", "k" * 32)
        doc = yaml.safe_load(path.read_text())
        ports = [nd[key] for nd in doc["nodes"] for key in ("port", "peer_port")]
        assert len(set(ports)) == 16
