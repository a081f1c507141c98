"""The round record's file (issue 16): the message's bytes, not a JSON document with every
manifest in base64, and a state directory of an earlier version still restarts.

- A commit writes ``cluster/<job>.rec`` (a JSON head line and the RoundRecord's bytes);
  a restart reads it back (the cluster's committed round, its layout and manifests).
- A restart over a state directory of the earlier version (``cluster/<job>.json``)
  re-adopts that round; the first commit after it replaces the old file.
- Of two files (an old one left by a downgrade and upgrade), the newer version is read.
- A file this version cannot read is refused at load, naming the file, nothing installed.
- A node without peers (one node, m = 0) keeps no file: its round (what the cluster
  layer knows of the committed version: layout, redundancy) comes back after a kill
  derived from the store, as the commit made it; a file an earlier daemon left goes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import clusterkit as tc
from clusterkit import make_cluster  # noqa: F401 (fixture)
from snapshotd.node.cluster import records as rc
from snapshotd.node.docfile import DocFile
from snapshotd.node.peer import peer_pb2 as ppb

from tests.node.test_save_path_cost import _write


def _files(c, node="n0") -> list[str]:
    return sorted(os.listdir(os.path.join(c.d, node, "cluster")))


def _cluster_committed(c, node="n0") -> int:
    """The job's committed version as the cluster layer (its round record) knows it."""
    return int(c.cluster_status(node)["jobs"].get(tc.JOB, {}).get("committed", 0))


def _as_earlier_version(c, node="n0") -> dict:
    """Rewrite the node's record as the earlier version's JSON file (the daemon stopped)."""
    doc = rc.read_record(os.path.join(c.d, node), tc.JOB)
    base = os.path.join(c.d, node, "cluster", tc.JOB)
    DocFile(base + rc.RECORD_SUFFIX).delete()
    DocFile(base + rc.LEGACY_SUFFIX).save(doc)
    return doc


def _commit(c, v: int) -> None:
    c.push(v)
    c.wait_committed(v)


def test_the_record_is_written_as_bytes_and_read_back_after_a_kill(make_cluster):
    c = make_cluster(2, 1)
    for v in (1, 2, 3):
        _commit(c, v)
    assert _files(c) == [f"{tc.JOB}.rec.a", f"{tc.JOB}.rec.b"]
    doc = rc.read_record(os.path.join(c.d, "n0"), tc.JOB)
    assert doc["v"] == 3 and sorted(doc["announces"]) == ["n0", "n1"] and doc["parity"]["name"]
    before = c.cluster_status("n0")["redundancy"][tc.JOB]
    c.crash_restart("n0")
    assert _cluster_committed(c) == 3 and c.cluster_status("n0")["redundancy"][tc.JOB] == before
    c.check_restorable(3)
    _commit(c, 4)


def test_a_state_directory_of_the_earlier_version_restarts_and_is_converted(make_cluster):
    c = make_cluster(2, 1)
    for v in (1, 2):
        _commit(c, v)
    c.kill("n0", wipe=False)
    old = _as_earlier_version(c)
    assert _files(c) == [f"{tc.JOB}.json.b"]  # (the first document goes to slot b)
    c.start("n0")
    # The round and parity came back from the old file.
    assert _cluster_committed(c) == 2 and "n0" not in c.cluster_status("n0").get("degraded", {})
    assert rc.read_record(os.path.join(c.d, "n0"), tc.JOB) == old
    c.check_restorable(2)
    _commit(c, 3)
    assert _files(c) == [f"{tc.JOB}.rec.b"]  # the old file is gone once v3 is in the new one
    c.crash_restart("n0")
    assert _cluster_committed(c) == 3


def test_of_two_files_the_newer_version_is_read(make_cluster):
    c = make_cluster(2, 1)
    for v in (1, 2, 3):
        _commit(c, v)
    c.kill("n0", wipe=False)
    base = os.path.join(c.d, "n0", "cluster", tc.JOB)
    head, raw = rc.decode_record_file(DocFile(base + rc.RECORD_SUFFIX).load_body())
    DocFile(base + rc.LEGACY_SUFFIX).save(rc.read_record(os.path.join(c.d, "n0"), tc.JOB))  # v3, as a
    old = ppb.RoundRecord.FromString(raw)  # downgraded daemon would write it, and ours one version behind
    old.version = 2
    DocFile(base + rc.RECORD_SUFFIX).save_bytes(rc.encode_record_file(old, head["parity"]))
    c.start("n0")
    assert _cluster_committed(c) == 3


def test_a_node_without_peers_keeps_no_file_and_derives_its_round_after_a_kill(make_cluster):
    c = make_cluster(1, 0)
    os.makedirs(os.path.join(c.d, "n0", "cluster"), exist_ok=True)
    DocFile(os.path.join(c.d, "n0", "cluster", tc.JOB + rc.LEGACY_SUFFIX)).save({"v": 0})  # an earlier daemon's
    for v in (1, 2, 3):
        assert _write(c, v, os.urandom(3 * c.bs + v)).latest_committed_version == v
    assert _files(c) == []
    before = c.cluster_status("n0")["redundancy"][tc.JOB]
    assert before["version"] == 3 and before["stripes"] == 4
    c.crash_restart("n0")
    assert c.committed("n0") == 3 and _cluster_committed(c) == 3
    assert c.cluster_status("n0")["redundancy"][tc.JOB] == before
    assert _write(c, 4, os.urandom(100)).latest_committed_version == 4


def test_a_record_file_this_version_cannot_read_is_refused_naming_it(tmp_path):
    rec = ppb.RoundRecord(job="j", version=3, block_counts=[1], world_size=1, rank_nodes={0: "n0"})
    rec.announces["n0"].CopyFrom(ppb.RoundAnnounce(block_count=1, ranks=[0], manifests=[b"m"]))
    body = rc.encode_record_file(rec, {"name": "x", "blocks": [], "checksums": []})
    head, raw = rc.decode_record_file(body)
    assert head == {"format": 2, "v": 3, "parity": {"name": "x", "blocks": [], "checksums": []}}
    assert rc.parse_stored("j", 3, raw) == rec
    for bad, why in ((b"no head", "not a round record file"),
                     (b'{"format": 3, "v": 3}\n', "format 3"),
                     (b'{"format": 2}\n', "not a round record file")):
        with pytest.raises(ValueError, match=why):
            rc.decode_record_file(bad)
    for job, v in (("k", 3), ("j", 4)):
        with pytest.raises(ValueError, match="not job"):
            rc.parse_stored(job, v, raw)
    with pytest.raises(ValueError, match="not a round record"):
        rc.parse_stored("j", 3, b"\xff\xff")
    # The operators' view: the document earlier versions wrote, from the command line.
    os.makedirs(tmp_path / "cluster")
    DocFile(str(tmp_path / "cluster" / "j.rec")).save_bytes(body)
    out = subprocess.run([sys.executable, "-m", "snapshotd.node.cluster.records", str(tmp_path), "j"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {**rc.record_to_json(rec), "parity": head["parity"]}
