"""JSON codec (no pickle) for the DCP ``Metadata`` that ``SnapshotdWriter`` stores with a version.

DCP's own ``FileSystemWriter`` pickles its ``Metadata``; snapshotd keeps it in a shard
manifest's ``meta_json`` instead, so what a daemon holds never runs code when it is read.
Covered: ``Metadata`` (state_dict_metadata, planner_data, storage_data, storage_meta,
version), ``TensorStorageMetadata``, ``ChunkStorageMetadata``, ``BytesStorageMetadata``,
``TensorProperties``, ``MetadataIndex``, ``StorageMeta`` and our :class:`SnapshotdStorageInfo`
(where an item's bytes lie). ``planner_data`` (DefaultSavePlanner's key paths) may hold
None, bools, numbers, strings, lists, tuples and dicts; anything else is refused with a
clear error. Pure functions, thread-safe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from snapshotd.wire import tagged
from snapshotd.wire.errors import InvalidRequestError

__all__ = ["FORMAT", "SnapshotdStorageInfo", "decode_metadata", "encode_metadata"]

FORMAT = "snapshotd-dcp/1"  # meta_json["format"] of every shard a SnapshotdWriter stores


@dataclass(frozen=True)
class SnapshotdStorageInfo:
    """Where one DCP item's bytes lie: ``length`` bytes at ``offset`` of ``rank``'s shard.
    Tensors are stored raw (``dtype``, ``shape``: the chunk as written); BytesIO items as
    their bytes (``dtype`` None)."""

    rank: int
    offset: int
    length: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` ("float32", "bfloat16", ...)."""
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise InvalidRequestError(f"DCP metadata names an unknown dtype {name!r}")
    return dt


def _torch_attr(name: str, kind: type, what: str):
    v = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(v, kind):
        raise InvalidRequestError(f"DCP metadata names an unknown {what} {name!r}")
    return v


# -- generic values (planner_data): tagged so tuples, int keys and dicts survive -----------
_enc_value, _dec_value = tagged.encode, tagged.decode


# -- the metadata classes ----------------------------------------------------------------------
def _enc_props(p: TensorProperties) -> dict:
    return {"dtype": _dtype_name(p.dtype), "layout": str(p.layout).removeprefix("torch."),
            "requires_grad": bool(p.requires_grad),
            "memory_format": str(p.memory_format).removeprefix("torch."),
            "pin_memory": bool(p.pin_memory)}


def _dec_props(d: dict) -> TensorProperties:
    return TensorProperties(dtype=torch_dtype(d["dtype"]),
                            layout=_torch_attr(d["layout"], torch.layout, "layout"),
                            requires_grad=bool(d["requires_grad"]),
                            memory_format=_torch_attr(d["memory_format"], torch.memory_format,
                                                      "memory format"),
                            pin_memory=bool(d["pin_memory"]))


def _enc_storage(md) -> dict:
    if isinstance(md, BytesStorageMetadata):
        return {"kind": "bytes"}
    if isinstance(md, TensorStorageMetadata):
        return {"kind": "tensor", "properties": _enc_props(md.properties), "size": list(md.size),
                "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks]}
    raise InvalidRequestError(f"unsupported DCP storage metadata {type(md).__name__}")


def _dec_storage(d: dict):
    if d["kind"] == "bytes":
        return BytesStorageMetadata()
    if d["kind"] != "tensor":
        raise InvalidRequestError(f"unknown DCP storage metadata kind {d['kind']!r}")
    return TensorStorageMetadata(
        properties=_dec_props(d["properties"]), size=torch.Size(d["size"]),
        chunks=[ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                for c in d["chunks"]])


def _enc_index(i: MetadataIndex) -> dict:
    return {"fqn": i.fqn, "offset": None if i.offset is None else list(i.offset), "index": i.index}


def _dec_index(d: dict) -> MetadataIndex:
    return MetadataIndex(fqn=d["fqn"], offset=d["offset"], index=d["index"])


def _enc_info(s) -> dict:
    if not isinstance(s, SnapshotdStorageInfo):
        raise InvalidRequestError(f"storage_data holds a {type(s).__name__}, not a "
                                  "SnapshotdStorageInfo: was it written by SnapshotdWriter?")
    return {"rank": s.rank, "offset": s.offset, "length": s.length, "dtype": s.dtype,
            "shape": None if s.shape is None else list(s.shape)}


def _dec_info(d: dict) -> SnapshotdStorageInfo:
    return SnapshotdStorageInfo(rank=int(d["rank"]), offset=int(d["offset"]), length=int(d["length"]),
                                dtype=d["dtype"], shape=None if d["shape"] is None else tuple(d["shape"]))


def _enc_storage_meta(s: StorageMeta | None):
    if s is None:
        return None
    return {"checkpoint_id": None if s.checkpoint_id is None else str(s.checkpoint_id),
            "save_id": s.save_id, "load_id": s.load_id, "modules": list(s.modules)}


def _dec_storage_meta(d) -> StorageMeta | None:
    if d is None:
        return None
    return StorageMeta(checkpoint_id=d["checkpoint_id"], save_id=d["save_id"], load_id=d["load_id"],
                       modules=list(d["modules"]))


def encode_metadata(md: Metadata) -> str:
    """``md`` as a JSON string (see the module docstring for what it may hold)."""
    doc = {
        "version": md.version,
        "state_dict_metadata": {k: _enc_storage(v) for k, v in md.state_dict_metadata.items()},
        "planner_data": _enc_value(md.planner_data, "DCP planner_data"),
        "storage_data": [[_enc_index(k), _enc_info(v)] for k, v in (md.storage_data or {}).items()],
        "storage_meta": _enc_storage_meta(md.storage_meta),
    }
    return json.dumps(doc, separators=(",", ":"))


def decode_metadata(text: str) -> Metadata:
    """The ``Metadata`` that :func:`encode_metadata` gave ``text`` for; InvalidRequestError
    when ``text`` is not such a document."""
    try:
        doc = json.loads(text)
        return Metadata(
            state_dict_metadata={k: _dec_storage(v) for k, v in doc["state_dict_metadata"].items()},
            planner_data=_dec_value(doc["planner_data"]),
            storage_data={_dec_index(k): _dec_info(v) for k, v in doc["storage_data"]},
            storage_meta=_dec_storage_meta(doc["storage_meta"]),
            version=doc["version"])
    except InvalidRequestError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequestError(f"DCP metadata stored with the version is malformed: "
                                  f"{type(exc).__name__}: {exc}") from None
