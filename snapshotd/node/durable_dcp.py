"""How a Snapshotter version maps onto the standard DCP layout (the durable tier's format).

One rank's shard (manifest + payload) becomes DCP items, written into that rank's
``__{rank}_0.distcp`` file exactly as torch's ``FileSystemWriter`` writes them: each tensor
``torch.save``d at its offset (what ``FileSystemReader`` ``torch.load``s from the byte range),
each bytes item as its bytes. Item names (fqns), with ``/`` in our tensor names read as
DCP's ``.`` (``model/fc.weight`` -> ``model.fc.weight``, what ``dcp.load({"model": sd})``
asks for):

- replicated state (model, optimizer) of rank 0: its own names, top level;
- replicated state of rank r > 0: ``rank{r}.<name>`` (``replicated="all"``, the default:
  correct for any job, e.g. pipeline stages), or not written (``replicated="rank0"``:
  data-parallel jobs whose replicas are identical write it once; every rank restores
  rank 0's copy);
- a sharded tensor (DTensor, FSDP2; the manifest gives global shape and offset): one
  chunk of the global fqn per rank, at its offset (duplicate chunks listed once);
- replicated state stored sharded (``shard_replicated=True``): each rank's slice as one
  uint8 tensor ``rank{r}.__replicated_slice__`` (snapshotd's restore reassembles it; stock
  tools see the bytes, not the model's tensors);
- each rank's own state (step, RNG, LR scheduler, extra): ``rank{r}.<name>``, and the
  non-tensor structure (JSON) as ``rank{r}.__meta_json__`` (a torch.save'd str).

The part record (JSON) of a node names, per rank, where each manifest entry's bytes are
(file, offset, length), so snapshotd's restore rebuilds the payload without DCP.

A version written by ``SnapshotdWriter`` (``dcp.save`` into snapshotd; its manifests say
``snapshotd-dcp/1``) already has DCP items: each rank's items keep their fqns and chunks,
tensors are ``torch.save``d, bytes items copied as they are. Their boundaries are in the
DCP ``Metadata`` (JSON, dcp_codec's format) that only the metadata rank's manifest holds:
that rank's node writes it into the version's folder first (``parts/dcp_metadata.json``)
and the other nodes read it from there (:func:`dcp_items`). The ``.metadata`` keeps the
saved state_dict_metadata and planner_data, with each item's storage info pointing into
the rank files. Thread: the flusher's writer thread only.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import torch
from google.protobuf import json_format

from snapshotd.wire import durable_store as ds
from snapshotd.wire import tagged

DCP_VERSION = "1.0.0"  # torch's CURRENT_DCP_VERSION at 2.13
DCP_FORMAT = "snapshotd-dcp/1"  # meta_json["format"] of SnapshotdWriter's shards (dcp_codec.FORMAT)
DCP_METADATA_PART = "dcp_metadata.json"
SLICE_NAME = "__replicated_slice__"
META_NAME = "__meta_json__"


class _Sink:
    """What torch.save writes into: hands each piece (<= 8 MiB, no copy) to ``emit`` at
    once, then calls ``pace(nbytes)`` (the rate limit, the stall hook); counts."""

    PIECE = 8 << 20

    def __init__(self, emit, pace):
        self.emit, self.pace, self.n = emit, pace, 0

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        for off in range(0, len(mv), self.PIECE):
            piece = mv[off:off + self.PIECE]
            self.emit(piece)
            self.n += len(piece)
            self.pace(len(piece))
        return len(mv)

    def flush(self) -> None:
        pass


def warm_up() -> None:
    """Import what building ``.metadata`` needs (seconds the first time, on a busy host)."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401
    import torch.distributed.checkpoint.metadata  # noqa: F401


def _tensor_at(payload: np.ndarray, off: int, nbytes: int, dtype: str, shape) -> torch.Tensor:
    """A tensor over exactly ``payload[off:off+nbytes]`` (torch.save stores its whole storage)."""
    dt = getattr(torch, dtype)
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dt)
    t = torch.frombuffer(memoryview(payload), dtype=torch.uint8, count=nbytes, offset=off)
    return t.view(dt).reshape(tuple(shape))


def _path(prefix: tuple, name: str) -> list:
    return list(prefix) + name.split("/")


def plan_rank(m, replicated: str) -> list[dict]:
    """The DCP items of one rank's shard ``m`` (see the module docstring), in file order.
    Each: fqn, path, kind ("tensor" | "bytes"), dtype, size (global), chunk_offsets,
    chunk_sizes, src (payload offset), nbytes, entry (["r"|"t"|"slice"|"meta", i])."""
    r = m.rank
    own = (f"rank{r}",)
    items: list[dict] = []
    whole = m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes
    if m.replicated_bytes and not whole:
        items.append(dict(fqn=f"rank{r}.{SLICE_NAME}", path=[own[0], SLICE_NAME], kind="tensor",
                          dtype="uint8", size=[m.slice_bytes], chunk_offsets=[0],
                          chunk_sizes=[m.slice_bytes], src=0, nbytes=m.slice_bytes,
                          entry=["slice", 0]))
    for kind, entries in (("r", m.replicated_tensors), ("t", m.tensors)):
        if kind == "r" and not whole:
            continue  # in the slice above
        for i, e in enumerate(entries):
            if e.global_shape:  # a shard of a sharded tensor: a chunk of the global fqn
                path, size, offs = _path((), e.name), list(e.global_shape), list(e.global_offset)
            else:
                if kind == "r" and r != 0 and replicated == "rank0":
                    continue  # rank 0's copy stands for it
                path = _path(() if (kind == "r" and r == 0) else own, e.name)
                size, offs = list(e.shape), [0] * len(e.shape)
            items.append(dict(fqn=".".join(path), path=path, kind="tensor", dtype=e.dtype, size=size,
                              chunk_offsets=offs, chunk_sizes=list(e.shape), src=int(e.offset),
                              nbytes=int(e.nbytes), entry=[kind, i]))
    items.append(dict(fqn=f"rank{r}.{META_NAME}", path=[own[0], META_NAME], kind="bytes",
                      entry=["meta", 0]))
    return items


def dcp_head(m) -> dict | None:
    """The snapshotd-dcp head of a SnapshotdWriter shard's meta_json; None for other shards."""
    import json

    try:
        head = json.loads(m.meta_json) if m.meta_json.startswith("{") else None
    except ValueError:
        return None
    return head if isinstance(head, dict) and head.get("format") == DCP_FORMAT else None


def dcp_items(rank: int, doc: dict) -> list[dict]:
    """The DCP items of ``rank`` in a SnapshotdWriter version's metadata ``doc`` (dcp_codec's
    JSON): each with its MetadataIndex (as JSON), and where its bytes lie in the shard."""
    items = []
    for index, info in doc["storage_data"]:
        if int(info["rank"]) != rank:
            continue
        kind = "bytes" if info.get("dtype") is None else "tensor"
        items.append(dict(fqn=index["fqn"], index=index, kind=kind, dtype=info.get("dtype"),
                          chunk_sizes=list(info.get("shape") or []), src=int(info["offset"]),
                          nbytes=int(info["length"]), entry=["dcp", len(items)]))
    return sorted(items, key=lambda it: it["src"])


def write_rank(m, payload: np.ndarray, items: list[dict], emit, pace) -> None:
    """Write one rank's file through ``emit`` (each piece is written before it returns);
    fills each item's ``offset`` and ``length``.

    ``torch.save`` here skips the CRC32 of its zip records (``compute_crc32=False``): the
    CRC was nearly all of torch.save's CPU (about 0.9 ms per MiB, as much as the write
    itself), and no reader checks it: ``torch.load`` ignores it, and a ``.distcp`` file is
    many zip records back to back, not one zip archive a zip tool could test. The files'
    integrity is the xxh3 of each file in the index. (The setting is process-wide while a
    rank file is written; the daemon's writer thread is its only torch.save.)"""
    sink = _Sink(emit, pace)
    with _no_crc32():
        for it in items:
            start = sink.n
            if it["kind"] == "bytes" and it["entry"][0] == "dcp":  # DCP's own bytes, as it wrote them
                sink.write(memoryview(payload)[it["src"]:it["src"] + it["nbytes"]])
            elif it["kind"] == "bytes":
                torch.save(m.meta_json, sink)
            else:
                torch.save(_tensor_at(payload, it["src"], it["nbytes"], it["dtype"], it["chunk_sizes"]), sink)
            it["offset"], it["length"] = start, sink.n - start


def _no_crc32():
    from torch.utils.serialization import config

    return config.patch({"save.compute_crc32": False})


def manifest_json(m) -> dict:
    """The manifest as JSON, without the block checksums (the files carry their own)."""
    d = json_format.MessageToDict(m, preserving_proto_field_name=True)
    d.pop("block_checksums", None)
    return d


def manifest_from_json(d: dict):
    from snapshotd.wire._proto import snapshotd_pb2 as pb

    return json_format.ParseDict(d, pb.ShardManifest())


_dec_value = tagged.decode  # planner_data as the client's dcp_codec tagged it


def _torch(name: str, kind: type):
    v = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(v, kind):
        raise ValueError(f"DCP metadata names an unknown {kind.__name__} {name!r}")
    return v


def _dec_storage(d: dict):
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                       TensorProperties, TensorStorageMetadata)

    if d["kind"] == "bytes":
        return BytesStorageMetadata()
    p = d["properties"]
    props = TensorProperties(dtype=_torch(p["dtype"], torch.dtype),
                             layout=_torch(p["layout"], torch.layout),
                             requires_grad=bool(p["requires_grad"]),
                             memory_format=_torch(p["memory_format"], torch.memory_format),
                             pin_memory=bool(p["pin_memory"]))
    return TensorStorageMetadata(properties=props, size=torch.Size(d["size"]), chunks=[
        ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
        for c in d["chunks"]])


def build_dcp_metadata(doc: dict, parts: list[dict]) -> bytes:
    """``.metadata`` of a SnapshotdWriter version: its saved state_dict_metadata and
    planner_data (``doc``), each item's storage info pointing into the rank files."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

    storage = {}
    for part in parts:
        for rank, items in part["items"].items():
            for it in items:
                i = it["index"]
                key = MetadataIndex(i["fqn"], None if i["offset"] is None else torch.Size(i["offset"]),
                                    i["index"])
                storage[key] = _StorageInfo(ds.rank_file(int(rank)), it["offset"], it["length"])
    md = Metadata(state_dict_metadata={k: _dec_storage(v) for k, v in doc["state_dict_metadata"].items()},
                  planner_data=_dec_value(doc["planner_data"]), storage_data=storage,
                  storage_meta=StorageMeta(), version=doc.get("version") or DCP_VERSION)
    buf = io.BytesIO()
    pickle.dump(md, buf)  # DCP's own file format, for stock readers only
    return buf.getvalue()


def build_metadata(parts: list[dict]) -> bytes:
    """DCP's ``.metadata`` (a pickled ``Metadata``, what FileSystemReader reads) from the
    nodes' part records: every item, duplicate chunks (the same fqn and offsets) once."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                       Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    sd_md: dict = {}
    storage: dict = {}
    planner: dict = {}
    for part in sorted(parts, key=lambda p: min(p["ranks"]) if p["ranks"] else 0):
        for rank in sorted(part["items"], key=int):
            file = ds.rank_file(int(rank))
            for it in part["items"][rank]:
                fqn = it["fqn"]
                planner[fqn] = tuple(it["path"])
                info = _StorageInfo(file, it["offset"], it["length"])
                if it["kind"] == "bytes":
                    sd_md[fqn] = BytesStorageMetadata()
                    storage[MetadataIndex(fqn)] = info
                    continue
                offs = torch.Size(it["chunk_offsets"])
                md = sd_md.get(fqn)
                if md is None:
                    md = sd_md[fqn] = TensorStorageMetadata(
                        properties=TensorProperties(dtype=getattr(torch, it["dtype"])),
                        size=torch.Size(it["size"]), chunks=[])
                if any(ch.offsets == offs for ch in md.chunks):
                    continue  # a replicated chunk another rank wrote too
                storage[MetadataIndex(fqn, offs, len(md.chunks))] = info
                md.chunks.append(ChunkStorageMetadata(offsets=offs, sizes=torch.Size(it["chunk_sizes"])))
    md = Metadata(state_dict_metadata=sd_md, planner_data=planner, storage_data=storage,
                  storage_meta=StorageMeta(), version=DCP_VERSION)
    buf = io.BytesIO()
    pickle.dump(md, buf)  # DCP's own file format (FileSystemReader unpickles it); never sent anywhere
    return buf.getvalue()
