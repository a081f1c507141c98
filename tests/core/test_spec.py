"""Tests for snapshotd.core.spec: parsing, validation messages, grouping by failure domain,
domain warnings and the YAML round trip."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import yaml

from snapshotd.wire.errors import InvalidRequestError
from snapshotd.core.spec import ClusterSpec, NodeSpec, dump_spec, form_groups, parse_spec
from snapshotd.node.spec_file import load_spec

EXAMPLE = """
group_size: 4      # n
parity: 2          # m; k = n - m
block_size_bytes: 4MiB
peer_key: "s3cret"
heartbeat_interval_ms: 500
heartbeat_timeout_ms: 3000
nodes:
  - {id: n0, host: 127.0.0.1, port: 7000, peer_port: 7100, failure_domain: rack-a}
  - {id: n1, host: 127.0.0.1, port: 7001, peer_port: 7101, failure_domain: rack-a}
  - {id: n2, host: 127.0.0.1, port: 7002, peer_port: 7102, failure_domain: rack-b}
  - {id: n3, host: 127.0.0.1, port: 7003, peer_port: 7103, failure_domain: rack-b}
  - {id: n4, host: 127.0.0.1, port: 7004, peer_port: 7104, failure_domain: rack-c}
  - {id: n5, host: 127.0.0.1, port: 7005, peer_port: 7105, failure_domain: rack-c}
  - {id: n6, host: 127.0.0.1, port: 7006, peer_port: 7106, failure_domain: rack-d}
  - {id: n7, host: 127.0.0.1, port: 7007, peer_port: 7107, failure_domain: rack-d}
"""


def base() -> dict:
    return yaml.safe_load(EXAMPLE)


def test_parse_example():
    spec = parse_spec(EXAMPLE)
    assert (spec.n, spec.m, spec.k) == (4, 2, 2)
    assert spec.block_size_bytes == 4 << 20 and spec.peer_key == "s3cret"
    assert spec.node("n3") == NodeSpec("n3", "127.0.0.1", 7003, 7103, "rack-b")
    # every group gets one node of each rack
    assert spec.groups == (("n0", "n2", "n4", "n6"), ("n1", "n3", "n5", "n7"))
    assert spec.group_of("n5") == (1, 2)
    assert spec.domain_warnings() == []


def test_defaults_and_failure_domain_default():
    d = base()
    for key in ("peer_key", "heartbeat_interval_ms", "heartbeat_timeout_ms"):
        del d[key]
    del d["nodes"][0]["failure_domain"]
    d["block_size_bytes"] = 65536
    spec = parse_spec(d)
    assert spec.peer_key is None and spec.heartbeat_interval_ms == 500 and spec.heartbeat_timeout_ms == 3000
    assert spec.node("n0").failure_domain == "n0" and spec.block_size_bytes == 65536


@pytest.mark.parametrize("spec_text", [EXAMPLE, EXAMPLE.replace('peer_key: "s3cret"\n', "")])
def test_round_trip(spec_text):
    spec = parse_spec(spec_text)
    text = dump_spec(spec)
    again = parse_spec(text)
    assert again == spec and again.groups == spec.groups
    assert parse_spec(spec.to_dict()) == spec
    assert "block_size_bytes: 4MiB" in text


def test_load_spec(tmp_path):
    p = tmp_path / "cluster.yaml"
    p.write_text(EXAMPLE)
    assert load_spec(str(p)) == parse_spec(EXAMPLE)
    p.write_text(EXAMPLE.replace("parity: 2", "parity: 4"))
    with pytest.raises(InvalidRequestError, match=r"cluster\.yaml.*m must be < group_size"):
        load_spec(str(p))
    with pytest.raises(InvalidRequestError, match="cannot read cluster spec"):
        load_spec(str(tmp_path / "missing.yaml"))


def mutate(fn):
    d = base()
    fn(d)
    return d


def set_node(i, key, value):
    def fn(d):
        d["nodes"][i][key] = value
    return fn


@pytest.mark.parametrize("fn,match", [
    (lambda d: d.pop("parity"), "top level: missing key 'parity'"),
    (lambda d: d.update(partiy=1), r"unknown key 'partiy' \(did you mean 'parity'\?\)"),
    (lambda d: d["nodes"][2].pop("peer_port"), r"nodes\[2\] \(id 'n2'\): missing key 'peer_port'"),
    (set_node(3, "prot", 1), r"nodes\[3\] \(id 'n3'\): unknown key 'prot'"),
    (set_node(5, "id", "n1"), r"nodes\[5\]: duplicate node id 'n1' \(also nodes\[1\]\)"),
    (set_node(4, "port", 7001), r"nodes\[4\] \(id 'n4'\) port: 127.0.0.1:7001 is already used by nodes\[1\]"),
    (set_node(4, "peer_port", 7002), r"127.0.0.1:7002 is already used by nodes\[2\] \(id 'n2'\) port"),
    (set_node(6, "peer_port", 7006), "port and peer_port are both 7006"),
    (set_node(1, "id", "bad id!"), r"nodes\[1\].*'bad id!' is invalid"),
    (set_node(1, "id", "x" * 64), "is invalid"),
    (set_node(2, "port", 0), r"nodes\[2\].*port must be in 1..65535, got 0"),
    (set_node(2, "peer_port", 70000), "peer_port must be in 1..65535, got 70000"),
    (set_node(2, "port", "7000"), "port must be an integer"),
    (set_node(2, "host", ""), "host '' must be"),
    (lambda d: d.update(group_size=0), r"group_size \(n\) must be >= 1"),
    (lambda d: d.update(parity=-1), r"parity \(m\) must be >= 0"),
    (lambda d: d.update(parity=4), "m must be < group_size"),
    (lambda d: d["nodes"].pop() and d["nodes"].pop(), "unreachable layout: 6 nodes cannot form groups of 4"),
    (lambda d: d.update(nodes=[]), "no nodes"),
    (lambda d: d.update(block_size_bytes="4MB"), "power of two.*use KiB/MiB/GiB"),
    (lambda d: d.update(block_size_bytes=2048), "power of two in"),
    (lambda d: d.update(block_size_bytes="2GiB"), "power of two in"),
    (lambda d: d.update(block_size_bytes=12288), "power of two in"),
    (lambda d: d.update(block_size_bytes="lots"), "not a size"),
    (lambda d: d.update(peer_key=""), "peer_key must be a non-empty string"),
    (lambda d: d.update(heartbeat_timeout_ms=400), "must exceed heartbeat_interval_ms"),
    (lambda d: d.update(nodes={"a": 1}), "nodes must be a list"),
])
def test_validation_errors(fn, match):
    with pytest.raises(InvalidRequestError, match=match):
        parse_spec(mutate(fn))


def test_bad_yaml_and_shape():
    with pytest.raises(InvalidRequestError, match="not valid YAML"):
        parse_spec("nodes: [unclosed")
    with pytest.raises(InvalidRequestError, match="top level must be a mapping"):
        parse_spec("- 1\n- 2\n")


def test_block_sizes_accepted():
    for v, want in (("4KiB", 4096), (4096, 4096), ("1GiB", 1 << 30), ("64 KiB", 65536)):
        assert parse_spec(mutate(lambda d: d.update(block_size_bytes=v))).block_size_bytes == want


def test_unknown_node():
    with pytest.raises(InvalidRequestError, match="unknown node id 'zz'"):
        parse_spec(EXAMPLE).group_of("zz")


def nodes_in(domains):
    return [NodeSpec(f"x{i}", "h", 1000 + i, 2000 + i, d) for i, d in enumerate(domains)]


def test_form_groups_spreads_domains():
    # 12 nodes, 3 groups of 4; domain a has 5 nodes, b 4, c 2, d 1 (spec order mixed)
    domains = list("abacbadbacab")
    nodes = nodes_in(domains)
    groups = form_groups(nodes, 4)
    assert len(groups) == 3 and sorted(x for g in groups for x in g) == sorted(x.id for x in nodes)
    dom = {x.id: x.failure_domain for x in nodes}
    for g in groups:
        c = Counter(dom[i] for i in g)
        assert c["a"] <= 2 and c["b"] <= 2 and c["c"] <= 1 and c["d"] <= 1
    assert form_groups(list(nodes), 4) == groups  # deterministic


def test_form_groups_distinct_domains_is_round_robin():
    nodes = nodes_in([None] * 6)
    assert form_groups(nodes, 3) == (("x0", "x2", "x4"), ("x1", "x3", "x5"))
    assert form_groups(nodes, 6) == (tuple(f"x{i}" for i in range(6)),)


def test_domain_warnings():
    d = base()
    for i, e in enumerate(d["nodes"]):
        e["failure_domain"] = "rack-a" if i < 6 else "rack-b"
    spec = parse_spec(d)
    warnings = spec.domain_warnings()
    assert len(warnings) == 2
    assert "group 0 has 3 nodes in failure domain 'rack-a'" in warnings[0]
    assert "m=2" in warnings[0] and "more than m nodes" in warnings[0]
    d["parity"] = 3
    assert parse_spec(d).domain_warnings() == []


def test_spec_objects_are_frozen_and_validated_directly():
    spec = parse_spec(EXAMPLE)
    with pytest.raises(AttributeError):
        spec.parity = 1
    with pytest.raises(InvalidRequestError, match="m must be < group_size"):
        ClusterSpec(spec.nodes, 2, 2, 4096)
    assert ClusterSpec(spec.nodes, 4, 2, "4MiB", "s3cret") == spec
    d = copy.deepcopy(spec.to_dict())
    assert d["nodes"][0] == {"id": "n0", "host": "127.0.0.1", "port": 7000, "peer_port": 7100,
                             "failure_domain": "rack-a"}
