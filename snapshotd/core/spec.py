"""Cluster spec: the nodes, their addresses and failure domains, and the code (n, m).

Parsed from YAML (``parse_spec(text or dict)``; a file: ``snapshotd.node.spec_file.load_spec``), validated with
errors that name the offending entry, and dumped back (``dump_spec``) in the same shape:

    group_size: 4      # n
    parity: 2          # m; k = n - m
    block_size_bytes: 4MiB
    peer_key: "..."    # optional shared secret for the peer plane (HMAC of every message)
    peer_encryption: curve   # optional: "none" (default) or "curve" (needs peer_key)
    heartbeat_interval_ms: 500
    heartbeat_timeout_ms: 3000
    nodes:
      - {id: n0, host: 127.0.0.1, port: 7000, peer_port: 7100, failure_domain: rack-a}

``port`` serves gRPC to clients and status tools, ``peer_port`` the peer plane; both must
be 1..65535 (0, "pick any", is not allowed in a spec). ``peer_encryption: curve`` runs
the peer plane over ZeroMQ CURVE with keypairs derived from ``peer_key`` and the node
ids (see ``snapshotd.node.peer.curve`` and docs/SECURITY.md). Groups are formed by
:func:`form_groups` (see there and ``snapshotd.core.placement``).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

import yaml

from snapshotd.wire.config import parse_size
from snapshotd.wire.errors import InvalidRequestError

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
MIN_BLOCK, MAX_BLOCK = 4 << 10, 1 << 30
_TOP_REQUIRED = ("group_size", "parity", "block_size_bytes", "nodes")
_TOP_OPTIONAL = ("peer_key", "peer_encryption", "heartbeat_interval_ms", "heartbeat_timeout_ms")
PEER_ENCRYPTIONS = ("none", "curve")
_NODE_REQUIRED = ("id", "host", "port", "peer_port")
_NODE_OPTIONAL = ("failure_domain",)


def _err(msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"cluster spec: {msg}")


def _int(v: Any, what: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(f"{what} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise _err(f"{what} must be {rng}, got {v}")
    return v


def _name(v: Any, what: str) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)  # YAML reads `id: 3` as an int
    if not isinstance(v, str) or not ID_RE.fullmatch(v):
        raise _err(f"{what} {v!r} is invalid: it must match [A-Za-z0-9_-]{{1,63}}")
    return v


def format_size(b: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << shift and b % (1 << shift) == 0:
            return f"{b >> shift}{unit}"
    return str(b)


def parse_block_size(v: Any) -> int:
    """An int or a size string ("4MiB"); must be a power of two in [4 KiB, 1 GiB]."""
    try:
        b = parse_size(v) if not isinstance(v, bool) and isinstance(v, (int, str)) else None
    except ValueError as e:
        raise _err(f"block_size_bytes: {e}") from None
    if b is None or not MIN_BLOCK <= b <= MAX_BLOCK or b & (b - 1):
        decimal = isinstance(v, str) and re.search(r"[kmgtKMGT](?![iI])", v)
        hint = " (KB/MB/GB are powers of ten: use KiB/MiB/GiB)" if decimal else ""
        raise _err(f"block_size_bytes {v!r} must be a power of two in [4KiB, 1GiB]{hint}")
    return b


@dataclass(frozen=True)
class NodeSpec:
    id: str
    host: str
    port: int  # gRPC (TCP) for clients and status
    peer_port: int  # peer plane
    failure_domain: str | None = None  # None: the node is its own domain (= id)

    def __post_init__(self) -> None:
        what = f"node {self.id!r}"
        _name(self.id, "node id")
        if not isinstance(self.host, str) or not self.host or any(c.isspace() for c in self.host):
            raise _err(f"{what}: host {self.host!r} must be a non-empty string without spaces")
        _int(self.port, f"{what}: port", 1, 65535)
        _int(self.peer_port, f"{what}: peer_port", 1, 65535)
        if self.port == self.peer_port:
            raise _err(f"{what}: port and peer_port are both {self.port}")
        dom = self.id if self.failure_domain is None else self.failure_domain
        if isinstance(dom, int) and not isinstance(dom, bool):
            dom = str(dom)
        if not isinstance(dom, str) or not dom.strip():
            raise _err(f"{what}: failure_domain {dom!r} must be a non-empty string")
        object.__setattr__(self, "failure_domain", dom)


def form_groups(nodes: Sequence[NodeSpec], n: int) -> tuple[tuple[str, ...], ...]:
    """Split nodes into len(nodes) // n groups of n, spreading failure domains.

    Nodes are ordered by failure domain (domains in order of first appearance in the
    spec, nodes in spec order within a domain) and dealt round-robin: the i-th node of
    that order goes to group i % G at local index i // G. A domain's nodes are consecutive
    in the order, so each group gets at most ceil(size / G) of them, the least possible.
    With one domain per node this is just spec order dealt round-robin.
    """
    if n < 1 or len(nodes) % n:
        raise _err(f"unreachable layout: {len(nodes)} nodes cannot form groups of {n}")
    first: dict[str, int] = {}
    for x in nodes:
        first.setdefault(x.failure_domain, len(first))
    order = sorted(nodes, key=lambda x: first[x.failure_domain])  # stable
    g = len(nodes) // n
    return tuple(tuple(x.id for x in order[i::g]) for i in range(g))


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    group_size: int  # n
    parity: int  # m
    block_size_bytes: int
    peer_key: str | None = None
    heartbeat_interval_ms: int = 500
    heartbeat_timeout_ms: int = 3000
    peer_encryption: str = "none"  # "curve": ZeroMQ CURVE, keys derived from peer_key

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        n = _int(self.group_size, "group_size (n)", 1)
        m = _int(self.parity, "parity (m)", 0)
        if m >= n:
            raise _err(f"parity {m}: m must be < group_size ({n}), so that k = n - m >= 1")
        if not self.nodes:
            raise _err("nodes: the spec has no nodes")
        if len(self.nodes) % n:
            raise _err(f"unreachable layout: {len(self.nodes)} nodes cannot form groups of {n}")
        object.__setattr__(self, "block_size_bytes", parse_block_size(self.block_size_bytes))
        if self.peer_key is not None and (not isinstance(self.peer_key, str) or not self.peer_key):
            raise _err("peer_key must be a non-empty string (omit it for none)")
        if self.peer_encryption not in PEER_ENCRYPTIONS:
            raise _err(f"peer_encryption {self.peer_encryption!r} must be one of "
                       f"{', '.join(PEER_ENCRYPTIONS)}")
        if self.peer_encryption == "curve" and self.peer_key is None:
            raise _err("peer_encryption: curve derives every node's keys from peer_key: set a peer_key")
        hi = _int(self.heartbeat_interval_ms, "heartbeat_interval_ms", 1)
        ht = _int(self.heartbeat_timeout_ms, "heartbeat_timeout_ms", 1)
        if ht <= hi:
            raise _err(f"heartbeat_timeout_ms ({ht}) must exceed heartbeat_interval_ms ({hi})")
        seen: dict[str, int] = {}
        endpoints: dict[tuple[str, int], str] = {}
        for i, x in enumerate(self.nodes):
            if not isinstance(x, NodeSpec):
                raise _err(f"nodes[{i}] must be a NodeSpec, got {x!r}")
            if x.id in seen:
                raise _err(f"nodes[{i}]: duplicate node id {x.id!r} (also nodes[{seen[x.id]}])")
            seen[x.id] = i
            for key, port in (("port", x.port), ("peer_port", x.peer_port)):
                me = f"nodes[{i}] (id {x.id!r}) {key}"
                other = endpoints.setdefault((x.host, port), me)
                if other != me:
                    raise _err(f"{me}: {x.host}:{port} is already used by {other}")

    @property
    def n(self) -> int:
        return self.group_size

    @property
    def m(self) -> int:
        return self.parity

    @property
    def k(self) -> int:
        return self.group_size - self.parity

    @cached_property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Node ids of each group, by group-local index (see :func:`form_groups`)."""
        return form_groups(self.nodes, self.group_size)

    @cached_property
    def _index(self) -> dict[str, NodeSpec]:
        return {x.id: x for x in self.nodes}

    @cached_property
    def _where(self) -> dict[str, tuple[int, int]]:
        return {nid: (g, i) for g, ids in enumerate(self.groups) for i, nid in enumerate(ids)}

    def node(self, node_id: str) -> NodeSpec:
        try:
            return self._index[node_id]
        except KeyError:
            known = ", ".join(sorted(self._index))
            raise InvalidRequestError(f"unknown node id {node_id!r} (spec has {known})") from None

    def group_of(self, node_id: str) -> tuple[int, int]:
        """(group index, group-local index) of a node."""
        self.node(node_id)
        return self._where[node_id]

    def domain_warnings(self) -> list[str]:
        """One line per group and failure domain holding more than m of the group."""
        out = []
        for g, ids in enumerate(self.groups):
            by_dom: dict[str, list[str]] = {}
            for nid in ids:
                by_dom.setdefault(self.node(nid).failure_domain, []).append(nid)
            for dom, members in by_dom.items():
                if len(members) > self.parity:
                    out.append(
                        f"group {g} has {len(members)} nodes in failure domain {dom!r} "
                        f"({', '.join(members)}) but parity m={self.parity}: losing {dom!r} "
                        f"would lose more than m nodes of the group")
        return out

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"group_size": self.group_size, "parity": self.parity,
                             "block_size_bytes": format_size(self.block_size_bytes)}
        if self.peer_key is not None:
            d["peer_key"] = self.peer_key
        if self.peer_encryption != "none":
            d["peer_encryption"] = self.peer_encryption
        d["heartbeat_interval_ms"] = self.heartbeat_interval_ms
        d["heartbeat_timeout_ms"] = self.heartbeat_timeout_ms
        d["nodes"] = [{"id": x.id, "host": x.host, "port": x.port, "peer_port": x.peer_port,
                       "failure_domain": x.failure_domain} for x in self.nodes]
        return d


def dump_spec(spec: ClusterSpec) -> str:
    """YAML text that :func:`parse_spec` reads back into an equal spec."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None)


def _check_keys(d: Any, what: str, required: Sequence[str], optional: Sequence[str]) -> None:
    if not isinstance(d, Mapping):
        raise _err(f"{what} must be a mapping, got {type(d).__name__}")
    allowed = (*required, *optional)
    for key in d:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _err(f"{what}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
    missing = [key for key in required if key not in d]
    if missing:
        raise _err(f"{what}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")


def parse_spec(source: Mapping | str) -> ClusterSpec:
    """A validated ClusterSpec from YAML text or an already-loaded mapping."""
    if isinstance(source, str):
        try:
            source = yaml.safe_load(source)
        except yaml.YAMLError as e:
            raise _err(f"not valid YAML: {e}") from None
    _check_keys(source, "top level", _TOP_REQUIRED, _TOP_OPTIONAL)
    raw_nodes = source["nodes"]
    if not isinstance(raw_nodes, list):
        raise _err(f"nodes must be a list of node entries, got {type(raw_nodes).__name__}")
    nodes = []
    for i, e in enumerate(raw_nodes):
        what = f"nodes[{i}]" + (f" (id {e.get('id')!r})" if isinstance(e, Mapping) and "id" in e else "")
        _check_keys(e, what, _NODE_REQUIRED, _NODE_OPTIONAL)
        try:
            nodes.append(NodeSpec(_name(e["id"], f"{what}: id"), e["host"], e["port"], e["peer_port"],
                                  e.get("failure_domain")))
        except InvalidRequestError as err:
            raise _err(f"{what}: {str(err).removeprefix('cluster spec: ')}") from None
    opt = {key: source[key] for key in _TOP_OPTIONAL if key in source and source[key] is not None}
    return ClusterSpec(tuple(nodes), source["group_size"], source["parity"],
                       parse_block_size(source["block_size_bytes"]), **opt)
