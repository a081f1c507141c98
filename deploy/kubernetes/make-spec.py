#!/usr/bin/env python3
"""Print the cluster spec for configmap.yaml from ``kubectl get nodes -o json`` on stdin.

    kubectl get nodes -l snapshotd.io/node=true -o json \\
      | python3 deploy/kubernetes/make-spec.py --group-size 4 --parity 1 [--domain-label L]

Each node becomes ``{id: <node name>, host: <InternalIP>, port: 7000, peer_port: 7100,
failure_domain: <label value>}``: the id is what the DaemonSet passes as --node-id
(spec.nodeName), the host is where the daemon binds its peer plane (hostNetwork), the
ports are the DaemonSet's. The failure domain is the node's ``--domain-label`` (default
topology.kubernetes.io/zone; a node without it is its own domain). The spec is checked
with snapshotd's own parser when snapshotd is importable, and a group that one domain
could take down beyond m is reported on stderr. No peer_key: the DaemonSet adds it from
the Secret. Only the standard library is needed otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys


def make_spec(nodes_json: dict, group_size: int, parity: int, block_size: str = "4MiB",
              domain_label: str = "topology.kubernetes.io/zone", port: int = 7000,
              peer_port: int = 7100, peer_encryption: str | None = "curve") -> str:
    items = nodes_json.get("items", [nodes_json] if nodes_json.get("kind") == "Node" else [])
    if not items:
        raise ValueError("no nodes in the input (is the label selector right?)")
    lines = [f"group_size: {group_size}", f"parity: {parity}", f"block_size_bytes: {block_size}"]
    if peer_encryption:
        lines.append(f"peer_encryption: {peer_encryption}")
    lines.append("nodes:")
    for node in sorted(items, key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        addrs = {a["type"]: a["address"] for a in node.get("status", {}).get("addresses", [])}
        host = addrs.get("InternalIP") or addrs.get("Hostname")
        if not host:
            raise ValueError(f"node {name} has no InternalIP or Hostname address")
        domain = node["metadata"].get("labels", {}).get(domain_label)
        entry = f"  - {{id: {name}, host: {host}, port: {port}, peer_port: {peer_port}"
        entry += f", failure_domain: {domain}}}" if domain else "}"
        lines.append(entry)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-size", type=int, required=True, help="n: nodes per erasure group")
    p.add_argument("--parity", type=int, required=True, help="m: nodes of a group that may be lost")
    p.add_argument("--block-size", default="4MiB")
    p.add_argument("--domain-label", default="topology.kubernetes.io/zone")
    p.add_argument("--no-encryption", action="store_true", help="leave out peer_encryption: curve")
    a = p.parse_args(argv)
    try:
        text = make_spec(json.load(sys.stdin), a.group_size, a.parity, a.block_size, a.domain_label,
                         peer_encryption=None if a.no_encryption else "curve")
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"make-spec: {e}", file=sys.stderr)
        return 2
    try:
        from snapshotd.core.spec import parse_spec
    except ImportError:
        parse_spec = None
    if parse_spec is not None:
        try:
            spec = parse_spec(text + 'peer_key: "check"\n')
        except Exception as e:  # the spec parser's message names the entry
            print(f"make-spec: {e}", file=sys.stderr)
            return 2
        for w in spec.domain_warnings():
            print(f"make-spec: warning: {w}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
