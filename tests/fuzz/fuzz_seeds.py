"""The seed corpus of each fuzz target, built from real messages and real state.

``python tests/fuzz/fuzz_seeds.py`` (re)writes ``tests/fuzz/corpus/<target>/`` (small
files, named by content hash, committed). Seeds are valid inputs (what the daemon, the
peer plane and the client really exchange) plus a few near misses, so the fuzzer starts
deep in each parser instead of at its first byte check.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
sys.path.insert(0, HERE)

from fuzz_targets import PEER_KEY, SENDER, SERVER_ID, join_parts  # noqa: E402


def _peer_requests():
    from snapshotd.wire._proto import peer_pb2 as ppb

    D, P = ppb.BLOCK_KIND_DATA, ppb.BLOCK_KIND_PARITY
    return [
        ppb.PeerRequest(announce=ppb.AnnounceRequest(job="j", version=3, node="n1", block_count=4,
                                                     ranks=[0, 1], manifest_sizes_bytes=[120, 130])),
        ppb.PeerRequest(contrib=ppb.ContribRequest(job="j", version=3, stripe=0, row=1, position=2,
                                                   block_counts=[4, 4, 3])),
        ppb.PeerRequest(vote=ppb.VoteRequest(job="j", version=3, ranks=[0, 1])),
        ppb.PeerRequest(ping=ppb.PingRequest(committed_versions={"j": 2})),
        ppb.PeerRequest(round=ppb.RoundRequest(job="j", version=3)),
        ppb.PeerRequest(fetch=ppb.FetchRequest(job="j", version=3, kind=D, block_index=2)),
        ppb.PeerRequest(fetch=ppb.FetchRequest(job="j", version=3, kind=P, stripe=1, row=0)),
        ppb.PeerRequest(jobs=ppb.JobsRequest()),
        ppb.PeerRequest(suspect=ppb.SuspectRequest(job="j", version=3, kind=D, block_index=0)),
        ppb.PeerRequest(fence=ppb.FenceRequest(job="j")),
        ppb.PeerRequest(rank_manifest=ppb.RankManifestRequest(job="j", version=3, rank=1)),
        ppb.PeerRequest(rank_block=ppb.RankBlockRequest(job="j", version=3, rank=1, block_index=0)),
    ]


def peer_server_seeds() -> list[bytes]:
    from snapshotd.node.peer.framing import MAGIC, encode_body, frame_mac, payload_fields

    out = []
    rid = (7).to_bytes(8, "big")
    for req in _peer_requests():
        for payload in (None, b"block bytes " * 5):
            header = encode_body("request", req, payload is not None)
            if payload is not None:
                header += payload_fields(memoryview(payload))
            for signed in (0, 1):
                mac = frame_mac(PEER_KEY, SENDER.encode(), rid, header) if signed else b""
                parts = [MAGIC, SENDER.encode(), rid, header, mac] + ([payload] if payload else [])
                out.append(join_parts(signed, parts))
    return out


def peer_client_seeds() -> list[bytes]:
    from snapshotd.node.peer.checks import REPLY_OF
    from snapshotd.node.peer.framing import MAGIC, encode_body, frame_mac, payload_fields
    from snapshotd.wire._proto import peer_pb2 as ppb

    ops = sorted(REPLY_OF)
    replies = {
        "ack": ppb.PeerReply(ack=ppb.Ack()),
        "ping": ppb.PeerReply(ping=ppb.PingReply()),
        "jobs": ppb.PeerReply(jobs=ppb.JobsReply()),
        "round": ppb.PeerReply(round=ppb.RoundReply()),
    }
    rid = (9).to_bytes(8, "big")
    out = []
    for i, op in enumerate(ops):
        for payload in (None, b"reply payload"):
            header = encode_body("reply", replies[REPLY_OF[op]], payload is not None)
            if payload is not None:
                header += payload_fields(memoryview(payload))
            for signed in (0, 1):
                mac = frame_mac(PEER_KEY, SERVER_ID.encode(), rid, header) if signed else b""
                parts = [MAGIC, SERVER_ID.encode(), rid, header, mac] + ([payload] if payload else [])
                out.append(join_parts(0x80 | signed | (i << 1), parts))
    err = encode_body("error", ppb.PeerError(code="NOT_HELD", message="no such block"), False)
    out.append(join_parts(0x80, [MAGIC, SERVER_ID.encode(), rid, err, b""]))
    return out


def _real_manifest():
    """The manifest a real Snapshotter-style save writes: model/optimizer replicated,
    RNG and extras local."""
    import torch

    from snapshotd.wire import manifest as mf
    from snapshotd.wire._proto import snapshotd_pb2 as pb
    from snapshotd_client import layout as lo
    from snapshotd_client import state as st

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    rep_meta, rep = st.flatten_state({"model": model.state_dict(), "optimizer": opt.state_dict()})
    loc_meta, loc = st.flatten_state({"step": 3, "extra": {"ids": (1, 2), "b": b"\x00\x01"},
                                      "rng": {"torch": torch.get_rng_state()[:32]}})
    layout = lo.plan_shard(rep, loc)
    buf = bytearray(layout.payload_bytes)
    lo.copy_slice(buf, layout.replicated, [t for _, t in rep], layout.slice_lo, layout.slice_hi,
                  layout.replicated_bytes)
    lo.copy_local(buf, layout.local, [t for _, t in loc])

    def entry(s):
        return pb.TensorEntry(name=s.name, dtype=s.dtype, shape=list(s.shape), offset=s.offset,
                              nbytes=s.nbytes, global_shape=list(s.global_shape),
                              global_offset=list(s.global_offset))

    m = pb.ShardManifest(job_id="job-1", rank=0, version=3, payload_bytes=layout.payload_bytes,
                         block_size_bytes=mf.MIN_BLOCK_SIZE_BYTES, checksum_algo=mf.CHECKSUM_ALGO,
                         tensors=[entry(s) for s in layout.local],
                         replicated_tensors=[entry(s) for s in layout.replicated],
                         replicated_bytes=layout.replicated_bytes, slice_offset=0,
                         slice_bytes=layout.replicated_bytes, dp_ranks=[0],
                         meta_json=st.dumps_meta({"replicated": rep_meta, "local": loc_meta}))
    m.block_checksums.extend(mf.block_checksums(buf, m.payload_bytes, m.block_size_bytes))
    return m, rep_meta, loc_meta


def manifest_seeds() -> list[bytes]:
    from snapshotd.wire._proto import snapshotd_pb2 as pb

    m, _, _ = _real_manifest()
    plain = pb.ShardManifest(job_id="j", rank=1, version=2, payload_bytes=3 * 4096 + 5,
                             block_size_bytes=4096, checksum_algo="xxh3_64")
    sharded = pb.ShardManifest()
    sharded.CopyFrom(m)
    t = sharded.tensors.add(name="dt", dtype="bfloat16", shape=[2, 2], offset=0, nbytes=8,
                            global_shape=[4, 2], global_offset=[2, 0])
    sharded.ClearField("block_checksums")
    del t
    out = []
    for msg in (m, plain, sharded):
        raw = msg.SerializeToString()
        out += [join_parts(f, [raw]) for f in (0, 1, 2)]
    return out


def state_meta_seeds() -> list[bytes]:
    import numpy as np
    import torch

    from snapshotd_client import state as st

    m, rep_meta, loc_meta = _real_manifest()
    od = OrderedDict(a=torch.zeros(2))
    od._metadata = {"": {"version": 1}}
    objs = [
        {"t": torch.zeros(2), "tied": [1, 2]},
        {"nd": np.arange(3, dtype=np.int16), "sc": np.float32(1.5), "big": 1 << 80,
         "nan": float("nan"), "inf": float("-inf"), "k": {1: "a", "__tensor__": 2}},
        od,
        (None, True, "s", b"\xff", 3.0, [1, [2, [3]]]),
    ]
    out = [m.meta_json.encode(), st.dumps_meta(rep_meta).encode(), st.dumps_meta(loc_meta).encode()]
    from fuzz_targets import _state_tensors
    fixed = _state_tensors()  # the target decodes with these: reference them in order
    random.seed(1)
    rng = {"python": random.getstate(), "numpy": np.random.RandomState(1).get_state(),
           "torch": fixed[-1], "cuda": []}
    meta, named = st.flatten_state({"fixed": fixed[:-2], "step": 1, "rng": rng})
    assert len(named) == len(fixed) and all(torch.equal(a, b) for (_, a), b in zip(named, fixed))
    out.append(st.dumps_meta(meta).encode())
    for o in objs:
        meta, _ = st.flatten_state(o)
        out.append(st.dumps_meta(meta).encode())
    return out


def service_seeds() -> list[bytes]:
    from fuzz_service import BS, JOB_TOKEN, PREFIX_MARK, RPCS, payload_of
    from snapshotd.wire import manifest as mf
    from snapshotd.wire._proto import snapshotd_pb2 as pb

    R = {name: i for i, name in enumerate(RPCS)}
    tok = 16

    def man(job, rank, version, checks=False):
        data = payload_of(rank, version)
        m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=len(data),
                             block_size_bytes=BS, checksum_algo="xxh3_64")
        if checks:
            m.block_checksums.extend(mf.block_checksums(data, len(data), BS))
        return m, data

    out = [
        join_parts(R["RegisterJob"], [pb.RegisterJobRequest(job_id="new", world_size=2).SerializeToString()]),
        join_parts(R["RegisterJob"], [pb.RegisterJobRequest(job_id="fz", world_size=2, restarting=True)
                                      .SerializeToString()]),
        join_parts(R["RegisterJob"] | tok, [pb.RegisterJobRequest(job_id="sec", world_size=1).SerializeToString()]),
        join_parts(R["AcquireStaging"], [pb.AcquireStagingRequest(job_id="fz", rank=0, version=3,
                                                                  payload_bytes=5000).SerializeToString()]),
        join_parts(R["AcquireStaging"] | tok, [pb.AcquireStagingRequest(job_id="sec", rank=0, version=2,
                                                                        payload_bytes=10).SerializeToString()]),
        join_parts(R["Commit"], [pb.CommitRequest(job_id="fz", version=2).SerializeToString()]),
        join_parts(R["ListVersions"], [pb.ListVersionsRequest(job_id="fz").SerializeToString()]),
        join_parts(R["ListVersions"] | 32, [pb.ListVersionsRequest(job_id="sec").SerializeToString()]),
        join_parts(R["OpenShard"], [pb.FetchShardRequest(job_id="fz", rank=1, version=1).SerializeToString()]),
        join_parts(R["FetchShard"], [pb.FetchShardRequest(job_id="fz", rank=0, version=0).SerializeToString()]),
        join_parts(R["FetchShard"] | tok, [pb.FetchShardRequest(job_id="sec", rank=0).SerializeToString()]),
        join_parts(R["Stats"], [b""]),
        join_parts(R["DropJob"], [pb.DropJobRequest(job_id="fz").SerializeToString()]),
        join_parts(R["DropJob"] | tok, [pb.DropJobRequest(job_id="sec").SerializeToString()]),
    ]
    m, data = man("fz", 1, 2)
    name = PREFIX_MARK + "fz.r1.s1.g1"
    out.append(join_parts(R["AdoptShard"], [pb.AdoptShardRequest(segment_name=name, manifest=m)
                                            .SerializeToString()]))
    m, data = man("fz", 1, 2, checks=True)
    out.append(join_parts(R["AdoptShard"], [pb.AdoptShardRequest(segment_name=name, manifest=m)
                                            .SerializeToString()]))
    for job, rank, version, flags in (("fz", 1, 2, 0), ("fz", 0, 3, 0), ("sec", 0, 2, tok)):
        m, data = man(job, rank, version, checks=True)
        chunks = [pb.PushShardChunk(manifest=m, data=data[:100]).SerializeToString(),
                  pb.PushShardChunk(data=data[100:5000]).SerializeToString(),
                  pb.PushShardChunk(data=data[5000:]).SerializeToString()]
        out.append(join_parts(R["PushShard"] | flags, chunks))
    return out


def handoff_seeds() -> list[bytes]:
    """Real request and reply frames of the hand-off channel, and near misses."""
    from snapshotd.wire import handoff as hw
    from snapshotd.wire._proto import snapshotd_pb2 as pb

    req = pb.AdoptShardRequest(segment_name="snapshotd-j-0-1", manifest=_real_manifest()[0],
                               next_version=2, next_payload_bytes=4096).SerializeToString()
    ok = pb.AdoptShardResponse(version=1, committed=True, next_segment_name="s2").SerializeToString()
    frames = [(0, hw.encode_request(7, req, "dtok", "jtok")), (0, hw.encode_request(8, req, None, None)),
              (0, hw.encode_request(9, b"", "t\u00e9", None)),
              (0, [hw.header(hw.KIND_OK, 3), b"", b"", req]),  # a reply's kind in a request
              (0, hw.encode_request(1, req, None, None)[:3]),
              (1, hw.encode_ok(7, ok)), (1, hw.encode_error(7, "UNKNOWN_JOB", "job j: no such job")),
              (1, [hw.header(hw.KIND_ERROR, 7), b"UNKNOWN_JOB"]), (1, [])]
    return [join_parts(flags, parts) for flags, parts in frames]


SEEDS = {"peer": lambda: peer_server_seeds() + peer_client_seeds(),
         "manifest": manifest_seeds, "state_meta": state_meta_seeds, "service": service_seeds,
         "handoff": handoff_seeds}


def write(target: str, root: str = CORPUS) -> list[str]:
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    paths = []
    for seed in SEEDS[target]():
        p = os.path.join(d, hashlib.sha1(seed).hexdigest()[:16])
        with open(p, "wb") as f:
            f.write(seed)
        paths.append(p)
    return paths


if __name__ == "__main__":
    for name in sys.argv[1:] or SEEDS:
        print(name, len(write(name)), "seeds")
