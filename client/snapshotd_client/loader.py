"""The exact rung of ``Snapshotter.restore()``: load a committed shard back into the live objects.

``ShardLoader.load`` reads the shard the daemon opened (manifest + shared-memory segment),
gathers the replicated payload from every data-parallel rank's slice when it was stored
sharded (``shard_replicated=True``), and loads model, optimizer, LR scheduler, extra
state and RNG states. Training thread only.

Memory: the segment is unmapped when the restore ends (the caller closes the
SegmentCache), so nothing handed to user code may point into it. Only the model's
parameters and buffers that torch's own loading code copies into the existing tensors
(:func:`copied_in_place`) are handed over as views of the segment -- no extra copy of
the biggest part of the state; everything else (optimizer state, a module's extra
state, anything a module's own loading code or a load_state_dict hook could keep, the
LR scheduler's and the extra state) is copied out first and owns its memory. The views
also hold a buffer export of the mapping, so even a view that escaped by some other
path keeps the mapping alive instead of reading freed memory.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import SnapshotdError
from snapshotd_client import layout as lo
from snapshotd_client import state as st
from snapshotd_client import tensors as tz

_MODULE_LOAD = torch.nn.Module._load_from_state_dict
_MODULE_LOAD_SD = torch.nn.Module.load_state_dict


def _torch_own(fn) -> bool:
    """``fn`` is torch's default loader or a torch.nn module's override of it (BatchNorm's,
    say): code that copies what it is given into the module's tensors and keeps nothing."""
    return fn is _MODULE_LOAD or getattr(fn, "__module__", "").startswith("torch.nn.modules.")


def copied_in_place(model: torch.nn.Module) -> frozenset[str]:
    """The state-dict keys that ``model.load_state_dict`` certainly copies into an existing
    parameter or persistent buffer and then forgets. Empty when anything in the model could
    keep a tensor it is handed: a ``load_state_dict`` override, a module's own
    ``_load_from_state_dict`` (outside torch.nn), a load_state_dict pre-hook (it sees the
    whole state dict), or ``torch.__future__`` swapping parameters instead of copying.
    ``_extra_state`` keys are never in it (``set_extra_state`` receives them as they are)."""
    if type(model).load_state_dict is not _MODULE_LOAD_SD:
        return frozenset()
    swap = getattr(torch.__future__, "get_swap_module_params_on_conversion", None)
    if swap is not None and swap():
        return frozenset()
    keys: set[str] = set()
    for prefix, mod in model.named_modules(remove_duplicate=False):
        if getattr(mod, "_load_state_dict_pre_hooks", None) or not _torch_own(
                type(mod)._load_from_state_dict):
            return frozenset()
        p = prefix + "." if prefix else ""
        keys.update(p + n for n, t in mod._parameters.items() if t is not None)
        keys.update(p + n for n, t in mod._buffers.items()
                    if t is not None and n not in mod._non_persistent_buffers_set)
    return frozenset(keys)


def _anchored(buf) -> torch.Tensor:
    """A 1-D uint8 tensor over the whole of ``buf`` that holds a buffer export of it (through
    numpy; ``torch.frombuffer`` holds none), so an mmap cannot be unmapped under it:
    ``mmap.close()`` raises BufferError and the mapping goes with the last view."""
    with warnings.catch_warnings():  # a read-only mapping: these views are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.frombuffer(buf, np.uint8))


def _owned(x):
    """``x`` with every tensor and numpy array in it copied into memory of its own (dicts
    are updated in place, keeping their type and attributes)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    if type(x) is list:
        return [_owned(v) for v in x]
    if type(x) is tuple:
        return tuple(_owned(v) for v in x)
    if isinstance(x, dict):
        for k in x:
            x[k] = _owned(x[k])
    return x



def open_no_copy(client, segments, job_id: str, rank: int, version: int):
    """OpenShard with ``no_copy``: (response, the mapped bytes when the shard is held by this
    host's daemon, else None: its bytes come by ranged fetches)."""
    resp = client.open_shard(job_id, rank, version, no_copy=True)
    if resp.segment_name:
        try:
            return resp, segments.get(resp.segment_name, writable=False).buf
        except (OSError, ValueError):  # a daemon on another host: its shm is not ours
            pass
    return resp, None

def load_the_rest(rep: dict, local: dict, optimizer, lr_scheduler, extra_state: dict) -> None:
    """Everything of a restored state but the model, into the user's objects: the
    optimizer, the scheduler, extra state (loaded in place when it has
    ``load_state_dict``), and the RNG states. ``rep`` and ``local`` own their memory."""
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


def _view(base: torch.Tensor, slot: tz.TensorSlot) -> torch.Tensor:
    """``slot``'s tensor as a view of ``base`` (see :func:`_anchored`)."""
    dtype = tz.torch_dtype(slot.dtype)
    if slot.nbytes == 0:
        return torch.empty(slot.shape, dtype=dtype)
    if slot.offset + slot.nbytes > base.numel():
        raise SnapshotdError(f"tensor {slot.name!r} ends at byte {slot.offset + slot.nbytes}, "
                             f"past the {base.numel()} bytes of its payload")
    return base[slot.offset:slot.offset + slot.nbytes].view(dtype).view(slot.shape)


class ShardLoader:
    """Loads ``rank``'s committed shards of ``job_id`` through ``client`` and ``segments``."""

    def __init__(self, client, segments, job_id: str, rank: int):
        self.client, self.segments = client, segments
        self.job_id, self.rank = job_id, rank
        self._fetched: dict = {}  # (rank, version) -> (bytes, manifest): slices fetched from other nodes
        self.bytes_fetched = 0  # bytes those ranged fetches moved (covering blocks)

    def open_slices(self, m: pb.ShardManifest, version: int) -> list:
        """[(buffer, manifest)] of every DP rank's slice of the replicated payload other than
        ours (empty when it was not stored sharded). A slice on this node is its mapped
        segment; one held on another node comes by a ranged fetch of its covering blocks
        (from that node, or decoded from its group when it is lost), never the rank's whole
        shard, and is kept for this restore. Opening is what can fail (a peer's slice lost
        for good: ConflictError); ``Snapshotter.restore`` opens them before any rank loads
        anything, so every rank learns of a failure first."""
        if not m.replicated_bytes or (m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes):
            return []
        out = []
        for r in m.dp_ranks:
            if r == self.rank:
                continue
            got = self._fetched.get((r, version))
            if got is None:
                resp, buf = open_no_copy(self.client, self.segments, self.job_id, r, version)
                if buf is None and resp.manifest.slice_bytes:
                    _, buf, moved = self.client.fetch_range(self.job_id, r, resp.manifest.version, 0,
                                                            resp.manifest.slice_bytes)
                    self.bytes_fetched += moved
                    self._fetched[(r, version)] = got = (buf, resp.manifest)
                else:
                    got = (buf if buf is not None else b"", resp.manifest)
            out.append(got)
        return out

    def replicated_payload(self, seg, m: pb.ShardManifest, version: int):
        """The whole replicated payload: our own bytes, or every DP rank's slice gathered
        (into memory of our own)."""
        if m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes:
            return seg.buf
        out = torch.empty(m.replicated_bytes, dtype=torch.uint8)
        try:
            for buf, om in [(seg.buf, m)] + self.open_slices(m, version):
                if om.replicated_bytes != m.replicated_bytes:
                    raise SnapshotdError(f"rank {om.rank}'s slice belongs to another layout")
                if om.slice_bytes:
                    if om.slice_bytes > len(memoryview(buf)):
                        raise SnapshotdError(f"rank {om.rank}'s slice is larger than its segment")
                    src = _view(_anchored(buf), tz.TensorSlot("slice", "uint8", (om.slice_bytes,),
                                                              0, om.slice_bytes, (), ()))
                    out[om.slice_offset:om.slice_offset + om.slice_bytes].copy_(src)
                    del src
        finally:
            self._fetched.clear()  # fetched for this restore only
        return out.numpy()

    def load(self, name: str, m: pb.ShardManifest, version: int, model, optimizer, lr_scheduler,
             extra_state: dict) -> tuple[int, dict | None]:
        """Load segment ``name`` (manifest ``m``) into the given objects; ``extra_state``
        is updated in place. Returns (the step, the snapshot's "pipeline" entry or None)."""
        seg = self.segments.get(name, writable=False)
        meta = st.loads_meta(m.meta_json)
        base = _anchored(seg.buf) if seg.buf is not None else torch.empty(0, dtype=torch.uint8)
        rep_base = base
        if m.replicated_bytes and not (m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes):
            rep_base = torch.from_numpy(self.replicated_payload(seg, m, version))
        rep = st.unflatten_state(meta["replicated"], [_view(rep_base, lo.slot_of(t))
                                                      for t in m.replicated_tensors])
        local = st.unflatten_state(meta["local"], [_view(base, lo.slot_of(t)).clone()
                                                   for t in m.tensors])
        del base, rep_base
        # Views only where torch's loader copies them into the model's own tensors;
        # everything else is copied out of the segment and owns its memory.
        in_place = copied_in_place(model)
        model_sd = rep.get("model", {})
        for k in list(model_sd):
            if k not in in_place:
                model_sd[k] = _owned(model_sd[k])
        for k in rep:
            if k != "model":
                rep[k] = _owned(rep[k])
        try:
            model.load_state_dict(model_sd)
        finally:
            rep["model"] = model_sd = None
        load_the_rest(rep, local, optimizer, lr_scheduler, extra_state)
        pipeline_meta = local.get("pipeline")
        del rep, local
        return int(m.version), pipeline_meta
