"""The exact rung of ``Snapshotter.restore()``: load a committed shard back into the live objects.

``ShardLoader.load`` reads the shard the daemon opened (manifest + shared-memory segment),
gathers the replicated payload from every data-parallel rank's slice when it was stored
sharded (``shard_replicated=True``), and loads model, optimizer, LR scheduler, extra
state and RNG states. Model tensors are copied straight into the parameters; everything
else is cloned out of the segment, so no view outlives the mapping (the caller closes
the SegmentCache afterwards). Training thread only.
"""

from __future__ import annotations

import torch

from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import SnapshotdError
from snapshotd_client import layout as lo
from snapshotd_client import state as st
from snapshotd_client import tensors as tz


class ShardLoader:
    """Loads ``rank``'s committed shards of ``job_id`` through ``client`` and ``segments``."""

    def __init__(self, client, segments, job_id: str, rank: int):
        self.client, self.segments = client, segments
        self.job_id, self.rank = job_id, rank

    def replicated_payload(self, seg, m: pb.ShardManifest, version: int):
        """The whole replicated payload: our own bytes, or every DP rank's slice gathered."""
        if m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes:
            return seg.buf
        out = torch.empty(m.replicated_bytes, dtype=torch.uint8)
        for r in m.dp_ranks:
            if r == self.rank:
                other, om = seg, m
            else:
                resp = self.client.open_shard(self.job_id, r, version)
                other, om = self.segments.get(resp.segment_name, writable=False), resp.manifest
            if om.replicated_bytes != m.replicated_bytes:
                raise SnapshotdError(f"rank {r}'s slice belongs to another layout")
            if om.slice_bytes:
                src = tz.view_from(other.buf, tz.TensorSlot("slice", "uint8", (om.slice_bytes,),
                                                            0, om.slice_bytes, (), ()))
                out[om.slice_offset:om.slice_offset + om.slice_bytes].copy_(src)
        return out.numpy()

    def load(self, name: str, m: pb.ShardManifest, version: int, model, optimizer, lr_scheduler,
             extra_state: dict) -> tuple[int, dict | None]:
        """Load segment ``name`` (manifest ``m``) into the given objects; ``extra_state``
        is updated in place. Returns (the step, the snapshot's "pipeline" entry or None)."""
        seg = self.segments.get(name, writable=False)
        buf = seg.buf if seg.buf is not None else bytearray(0)
        meta = st.loads_meta(m.meta_json)
        rep_buf = self.replicated_payload(seg, m, version) if m.replicated_bytes else bytearray(0)
        rep_views = [tz.view_from(rep_buf, lo.slot_of(t)) for t in m.replicated_tensors]
        # Model tensors are copied straight into the parameters; everything else is
        # cloned out of the segment (the optimizer would otherwise alias it).
        rep_tensors = [v if t.name.startswith("model/") else v.clone()
                       for v, t in zip(rep_views, m.replicated_tensors)]
        loc_tensors = [tz.view_from(buf, lo.slot_of(t)).clone() for t in m.tensors]
        rep = st.unflatten_state(meta["replicated"], rep_tensors)
        local = st.unflatten_state(meta["local"], loc_tensors)
        model.load_state_dict(rep["model"])
        if optimizer is not None and "optimizer" in rep:
            optimizer.load_state_dict(rep["optimizer"])
        if lr_scheduler is not None and "lr_scheduler" in local:
            lr_scheduler.load_state_dict(local["lr_scheduler"])
        for k, v in local.get("extra", {}).items():
            tgt = extra_state.get(k)
            if hasattr(tgt, "load_state_dict"):
                tgt.load_state_dict(v)
            else:
                extra_state[k] = v
        st.restore_rng_state(local["rng"])
        pipeline_meta = local.get("pipeline")
        del rep_views, rep_tensors, rep, local
        return int(m.version), pipeline_meta
