"""The daemon's per-save shortcuts (issue 16) keep every guarantee they shortcut.

- An adopted manifest's tensor entries are walked only when its layout differs from the
  last one of its (job, rank) that passed (wire.manifest.LayoutCache): a changed, invalid
  layout after a cached valid one is refused, changing nothing.
- The index and the round records are written in place into two slot files
  (node.docfile.DocFile): a write torn by a kill leaves the previous document, a restart
  reads the newest whole one, and a state directory of an earlier version is still read.
- A daemon with no peers (one node, m = 0) commits on the adopting thread, not through
  the commit worker's queue: the adoption's reply already names the version committed,
  and the commit (index, round record) outlives a SIGKILL and restart.
- Manifests are written over a segment's earlier file in place.
"""

from __future__ import annotations

import json
import os

import pytest

import clusterkit as tc
from clusterkit import make_cluster  # noqa: F401 (fixture)
from snapshotd.node import docfile
from snapshotd.node.cluster.records import read_record
from snapshotd.node.docfile import DocFile, read_doc
from snapshotd.wire import manifest as mf
from snapshotd.wire.manifest import block_checksums
from snapshotd.wire import shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import InvalidRequestError

from tests.node.test_store import BS, make_store  # noqa: F401 (fixture)


def _manifest(job: str, rank: int, version: int, payload: bytes, nbytes: int = 64) -> pb.ShardManifest:
    m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=len(payload),
                         block_size_bytes=BS, checksum_algo="xxh3_64", meta_json=f'{{"v": {version}}}')
    m.tensors.add(name="w", dtype="float32", shape=[16], offset=0, nbytes=nbytes)
    return m


def _adopt(store, m: pb.ShardManifest, payload: bytes):
    name, _ = store.acquire_staging(m.job_id, m.rank, m.version, len(payload))
    seg = shm.open_segment(name, writable=True)
    seg.buf[:len(payload)] = payload
    seg.close()
    return store.adopt(name, m)


def test_layout_cache_skips_the_walk_only_for_the_layout_that_passed(monkeypatch):
    walks = []
    real = mf._validate_entries
    monkeypatch.setattr(mf, "_validate_entries", lambda m: (walks.append(m.version), real(m)))
    cache = mf.LayoutCache()
    payload = bytes(100)
    for v in (1, 2, 3):  # the same layout: walked once
        cache.validate(("j", 0), _manifest("j", 0, v, payload))
    assert walks == [1]
    cache.validate(("j", 1), _manifest("j", 1, 4, payload))  # another rank: its own walk
    assert walks == [1, 4]
    with pytest.raises(InvalidRequestError, match="nbytes 60 != 64"):  # a changed, invalid layout
        cache.validate(("j", 0), _manifest("j", 0, 5, payload, nbytes=60))
    with pytest.raises(InvalidRequestError, match="overflow"):  # same entries, smaller payload
        cache.validate(("j", 0), _manifest("j", 0, 6, bytes(10)))
    cache.validate(("j", 0), _manifest("j", 0, 7, payload))  # the valid one is still known
    assert walks == [1, 4, 5, 6]
    with pytest.raises(InvalidRequestError, match="version must be >= 1"):  # per-save fields: always
        cache.validate(("j", 0), _manifest("j", 0, 0, payload))


def test_layout_cache_walks_again_when_anything_the_walk_reads_changes(monkeypatch):
    """A change to any field the walk reads (entries, payload and replicated sizes) walks
    again; the cache keeps its own copy of the layout, so a caller's later change to the
    manifest it passed does not count as validated."""
    walks = []
    real = mf._validate_entries
    monkeypatch.setattr(mf, "_validate_entries", lambda m: (walks.append(m.version), real(m)))

    def base(v):
        m = _manifest("j", 0, v, bytes(100))
        m.replicated_bytes, m.slice_bytes, m.dp_ranks[:] = 32, 0, [0]
        m.replicated_tensors.add(name="r", dtype="uint8", shape=[32], offset=0, nbytes=32)
        return m

    changes = {
        "name": lambda m: setattr(m.tensors[0], "name", "w2"),
        "dtype": lambda m: (setattr(m.tensors[0], "dtype", "int32"), m.tensors[0].shape.__setitem__(0, 16)),
        "shape": lambda m: (m.tensors[0].shape.__setitem__(0, 8), setattr(m.tensors[0], "nbytes", 32)),
        "offset": lambda m: setattr(m.tensors[0], "offset", 4),
        "global_shape": lambda m: m.tensors[0].global_shape.append(32),
        "a tensor more": lambda m: m.tensors.add(name="b", dtype="uint8", shape=[4], offset=64, nbytes=4),
        "payload_bytes": lambda m: setattr(m, "payload_bytes", 99),
        "replicated_bytes": lambda m: setattr(m, "replicated_bytes", 40),
        "replicated entry": lambda m: setattr(m.replicated_tensors[0], "offset", 1),
    }
    v = 1
    for what, change in changes.items():
        cache = mf.LayoutCache()
        cache.validate(("j", 0), base(v))
        m = base(v + 1)
        change(m)
        walks.clear()
        try:
            cache.validate(("j", 0), m)
        except InvalidRequestError:
            pass
        assert walks == [v + 1], what
        v += 2
    cache, walks[:] = mf.LayoutCache(), []
    m = base(1)
    cache.validate(("j", 0), m)
    m.meta_json, m.version = '{"other": 1}', 2  # per-save fields: no walk
    cache.validate(("j", 0), m)
    assert walks == [1]
    m.tensors[0].nbytes = 60  # the caller changes the manifest it passed: not validated by that
    with pytest.raises(InvalidRequestError, match="nbytes 60 != 64"):
        cache.validate(("j", 0), m)


def test_adopt_refuses_a_changed_invalid_layout_after_a_valid_one(make_store):
    s = make_store()
    s.register_job("j", 1)
    payload = os.urandom(100)
    assert _adopt(s, _manifest("j", 0, 1, payload), payload) == (True, 1)
    assert _adopt(s, _manifest("j", 0, 2, payload), payload) == (True, 2)
    before = s.list_versions("j"), s.bytes_committed()
    with pytest.raises(InvalidRequestError, match="nbytes 60 != 64"):
        _adopt(s, _manifest("j", 0, 3, payload, nbytes=60), payload)
    assert (s.list_versions("j")[0], s.bytes_committed()) == (before[0][0], before[1])
    _, m, _ = s.committed_shard("j", 0)
    assert m.version == 2 and m.tensors[0].nbytes == 64


def test_docfile_keeps_the_previous_document_when_a_write_is_torn(tmp_path):
    path = str(tmp_path / "index.json")
    f = DocFile(path)
    assert f.load() is None
    for v in range(1, 5):
        f.save({"v": v, "pad": "x" * (50 - 10 * v)})  # shorter each time: left-overs cut
    assert read_doc(path)["v"] == 4
    # The next save goes to the slot holding v3; tear it there (a kill mid-write).
    newer = docfile.encode(5, json.dumps({"v": 5}).encode())
    older_slot = f.slots[5 & 1]
    with open(older_slot, "r+b") as fh:
        fh.write(newer[:len(newer) // 2])
    assert read_doc(path)["v"] == 4
    with open(f.slots[4 & 1], "r+b") as fh:  # the newest slot damaged too: nothing whole
        fh.write(b"snapshotd-doc 1 4 999 00000000\n")
    assert read_doc(path) is None
    g = DocFile(path)
    assert g.load() is None
    g.save({"v": 6})  # and a save after that is read back
    assert read_doc(path) == {"v": 6}


def test_docfile_reads_and_replaces_the_file_of_an_earlier_version(tmp_path):
    path = str(tmp_path / "index.json")
    with open(path, "w") as fh:
        json.dump({"v": 1}, fh)
    f = DocFile(path)
    assert f.load() == {"v": 1}
    f.save({"v": 2})
    assert not os.path.exists(path) and read_doc(path) == {"v": 2}


def test_a_restarted_store_reads_the_newest_index_after_a_torn_one(make_store):
    s = make_store()
    s.register_job("j", 1)
    payload = os.urandom(100)
    for v in (1, 2, 3):
        assert _adopt(s, _manifest("j", 0, v, payload), payload) == (True, v)
    idx = s.state._index
    # A kill while the next index was being written: the slot it went to is torn.
    with open(idx.slots[(idx._seq + 1) & 1], "r+b") as fh:
        fh.write(b"snapshotd-doc 1 99 5 0")
    s.close()
    again = make_store()
    assert again.register_job("j", 1) == 3
    _, m, seg = again.committed_shard("j", 0)
    assert m.version == 3 and bytes(seg.buf[:100]) == payload


def test_manifests_are_written_in_place_and_read_back_after_a_restart(make_store):
    s = make_store()
    s.register_job("j", 1)
    big, small = os.urandom(3 * BS), os.urandom(100)
    assert _adopt(s, _manifest("j", 0, 1, big), big)[0]
    name = s.state.name_at("j", 0, s.state.jobs["j"].committed_slot(0).index)
    m1 = s.state.held(name).manifest
    longer = pb.ShardManifest()
    longer.CopyFrom(m1)
    longer.meta_json = "x" * 1000
    s.state.write_manifest(name, longer)
    s.state.write_manifest(name, m1)  # over the longer one: nothing of it left behind
    with open(s.state.manifest_path(name), "rb") as f:
        assert pb.ShardManifest.FromString(f.read()) == m1
    for v in (2, 3, 4):  # the ring of 3 slots: v4 reuses v1's segment, a shorter manifest
        assert _adopt(s, _manifest("j", 0, v, small), small)[0]
    s.close()
    again = make_store()
    assert again.register_job("j", 1) == 4
    _, m, seg = again.committed_shard("j", 0)
    assert m.version == 4 and bytes(seg.buf[:100]) == small


def _write(c, v: int, data: bytes):
    cl = c.client("n0")
    cl.register_job(tc.JOB, 1, 1)
    st = cl.acquire_staging(tc.JOB, 0, v, len(data))
    seg = shm.open_segment(st.segment_name, writable=True)
    seg.buf[:len(data)] = data
    seg.close()
    m = pb.ShardManifest(job_id=tc.JOB, rank=0, version=v, payload_bytes=len(data), block_size_bytes=c.bs,
                         checksum_algo="xxh3_64", meta_json=json.dumps({"step": v}),
                         tensors=[pb.TensorEntry(name="w", dtype="uint8", shape=[len(data)], offset=0,
                                                 nbytes=len(data))])
    m.block_checksums.extend(block_checksums(data, len(data), c.bs))
    return cl.adopt(st.segment_name, m)


def test_a_node_without_peers_commits_at_adoption_and_keeps_it_across_a_kill(make_cluster):
    c = make_cluster(1, 0)
    datas = {}
    for v in range(1, 6):
        datas[v] = os.urandom(150_000 + v)
        resp = _write(c, v, datas[v])
        # Committed before the reply (through the worker's queue it would come later).
        assert resp.latest_committed_version == v and c.committed("n0") == v
    assert read_record(os.path.join(c.d, "n0"), tc.JOB) is None  # none kept: derived at load
    c.crash_restart("n0")  # SIGKILL, shared memory kept
    assert c.committed("n0") == 5
    r = c.client("n0").open_shard(tc.JOB, 0)
    seg = shm.open_segment(r.segment_name)
    try:
        assert bytes(seg.buf[:r.manifest.payload_bytes]) == datas[5]
    finally:
        seg.close()
    assert _write(c, 6, os.urandom(1000)).latest_committed_version == 6  # and it goes on
    assert c.cluster_status("n0") is not None


def test_the_announce_reuses_the_manifest_bytes_written_at_delivery_only_while_they_are_its(make_store):
    """The cluster's announce takes each local manifest's bytes from its delivery's
    manifest-file write (no second serialisation per save), only while the held manifest
    is the object those bytes were made from; otherwise it serialises the one held."""
    s = make_store()
    s.register_job("j", 1)
    payload = os.urandom(100)
    _adopt(s, _manifest("j", 0, 1, payload), payload)
    ranks, mans, raws = s.local_manifests("j", 1)
    name = s.state.name_at("j", 0, s.state.jobs["j"].committed_slot(0).index)
    with open(s.state.manifest_path(name), "rb") as f:
        assert ranks == [0] and raws == [f.read()] == [mans[0].SerializeToString()]
    assert s.state.held(name).written[1] is raws[0]  # the very bytes written, not made again
    other = pb.ShardManifest()
    other.CopyFrom(mans[0])
    other.meta_json = '{"replaced": 1}'
    s.state.held(name).manifest = other  # e.g. a rebuild installs another object
    assert s.local_manifests("j", 1)[2] == [other.SerializeToString()]


def _split(m: pb.ShardManifest) -> tuple[bytes, bytes]:
    """(layout bytes, per-save bytes): how the client writes a save's manifest."""
    per = pb.ShardManifest(version=m.version, meta_json=m.meta_json, block_checksums=m.block_checksums)
    lay = pb.ShardManifest()
    lay.CopyFrom(m)
    for f in ("version", "meta_json", "block_checksums"):
        lay.ClearField(f)
    return lay.SerializeToString(), per.SerializeToString()


def test_layout_cache_takes_a_known_layout_prefix_only_with_nothing_but_per_save_fields_after_it(monkeypatch):
    """The wire form (layout bytes + per-save fields) skips the walk and the comparison's
    re-serialisation once that prefix passed; anything after it that could change the
    layout (a field of the layout, a default value written out, an unknown field, a
    duplicate) takes the full path: refused when invalid."""
    from google.protobuf.internal.encoder import _VarintBytes

    walks, layouts = [], []
    real, real_layout = mf._validate_entries, mf.LayoutCache.layout_of
    monkeypatch.setattr(mf, "_validate_entries", lambda m: (walks.append(m.version), real(m)))
    monkeypatch.setattr(mf.LayoutCache, "layout_of", staticmethod(lambda m: (layouts.append(1), real_layout(m))[1]))
    cache, payload = mf.LayoutCache(), bytes(100)

    def check(m, raw):
        assert pb.ShardManifest.FromString(raw) == m  # raw is what m parses from
        cache.validate(("j", 0), m, raw=raw)

    m1 = _manifest("j", 0, 1, payload)
    check(m1, b"".join(_split(m1)))
    assert walks == [1] and len(layouts) == 1
    for v in (2, 3):  # the prefix again: no walk, no re-serialisation
        m = _manifest("j", 0, v, payload)
        check(m, b"".join(_split(m)))
    assert walks == [1] and len(layouts) == 1
    lay, per = _split(_manifest("j", 0, 4, payload))
    bad_entry = pb.ShardManifest(tensors=[pb.TensorEntry(name="x", dtype="uint8", shape=[8], offset=0, nbytes=9)])
    cases = {
        "a layout field after it": (lay + per + bad_entry.SerializeToString(), "nbytes 9 != 8"),
        "a layout field among them, canonical": (lay + pb.ShardManifest(
            version=4, meta_json="{}", tensors=bad_entry.tensors).SerializeToString(), "nbytes 9 != 8"),
        "payload_bytes 0 written out": (lay + per + _VarintBytes(4 << 3) + b"\x00", "overflow"),
        "an unknown field": (lay + per + _VarintBytes(999 << 3) + b"\x01", None),
        "version twice": (lay + per + _VarintBytes(3 << 3) + b"\x04", None),
    }
    for what, (raw, refused) in cases.items():
        m = pb.ShardManifest.FromString(raw)
        n = len(layouts)
        if refused:
            with pytest.raises(InvalidRequestError, match=refused):
                check(m, raw)
        else:
            check(m, raw)
        assert len(layouts) == n + 1, what  # the full comparison ran
    check(_manifest("j", 0, 4, payload), lay + per)  # and the known prefix still serves
    assert len(layouts) == n + 1
    cache.forget(lambda key: key == ("j", 0))  # a dropped job: its prefix goes with its layout
    check(_manifest("j", 0, 5, payload), b"".join(_split(_manifest("j", 0, 5, payload))))
    assert len(layouts) == n + 2 and walks[-1] == 5  # compared and walked in full again


def test_the_hand_off_server_finds_the_manifest_bytes_of_a_request():
    from snapshotd.wire.handoff import manifest_bytes

    m = _manifest("j", 0, 1, bytes(100))
    raw = b"".join(_split(m))
    req = pb.AdoptShardRequest(segment_name="seg", next_version=2, writer_id="w").SerializeToString()
    body = req + b"\x12" + bytes([len(raw)]) if len(raw) < 128 else None
    assert body is not None
    body += raw
    assert pb.AdoptShardRequest.FromString(body).manifest == m and manifest_bytes(body) == raw
    assert manifest_bytes(req) is None  # no manifest
    assert manifest_bytes(body + b"\x12\x00") is None  # two: the parsed one is their merge
    assert manifest_bytes(body[:-1]) is None and manifest_bytes(b"\x0f") is None


def test_the_store_keeps_a_copy_of_a_manifest_it_does_not_own(make_store):
    """adopt works on a copy of the caller's manifest (it fills in the checksums), unless
    the caller gives it away (the service: a request parsed for the call)."""
    s = make_store()
    s.register_job("j", 1)
    payload = os.urandom(100)
    for v, owned in ((1, False), (2, True)):
        m = _manifest("j", 0, v, payload)
        name, _ = s.acquire_staging("j", 0, v, len(payload))
        seg = shm.open_segment(name, writable=True)
        seg.buf[:len(payload)] = payload
        seg.close()
        assert s.adopt_hinted(name, m, owned=owned)[:2] == (True, v)
        kept = s.committed_shard("j", 0)[1]
        assert (kept is m) == owned and list(kept.block_checksums) == block_checksums(payload, 100, BS)
        assert len(m.block_checksums) == (1 if owned else 0)


def test_versions_with_the_same_block_counts_share_a_layout_but_not_their_expected_contributions():
    """JobProtocol computes a layout and its expected contributions once per block counts
    (issue 16); each round still gets its own set of what it awaits: a contribution
    received for one version is still awaited for the next, and other counts get theirs."""
    from snapshotd.core.placement import place_group
    from snapshotd.core.protocol import JobProtocol

    group = ("n0", "n1", "n2")
    jp = JobProtocol("j", "n0", group, group, 1)
    counts = (3, 2, 4)
    l5, l6 = jp.layout_from_contribution(5, counts), jp.layout_from_contribution(6, counts)
    assert l5 is l6 and l5 == place_group(3, 1, counts)
    want = {(s, t, p) for s, t, p, _, _ in place_group(3, 1, counts).expected_contributions(0)}
    assert jp.rounds[5].expected == want == jp.rounds[6].expected and want
    key = sorted(want)[0]
    jp.contribution_received(5, *key)
    assert key not in jp.rounds[5].expected and key in jp.rounds[6].expected
    assert jp.layout_from_contribution(7, counts).expected_contributions(0) == \
        place_group(3, 1, counts).expected_contributions(0) and jp.rounds[7].expected == want
    other = (1, 1, 1)
    assert jp.layout_from_contribution(8, other) == place_group(3, 1, other)
    assert jp.rounds[8].expected == {(s, t, p) for s, t, p, _, _ in place_group(3, 1, other).expected_contributions(0)}
