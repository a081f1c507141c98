"""The resharding rung of ``Snapshotter.restore()``: a version saved at one world size,
mesh or placement, loaded at another (and DTensor / FSDP2 state at any size).

Call order (training thread only): ``Reshard.open(version)`` opens every stored shard
this rank needs -- before any rank loads anything, so a failure is every rank's verdict
(:mod:`snapshotd_client.verdict`) -- then ``Reshard.load(...)`` builds the state and
loads it into the live objects.

What each new rank ``r`` of ``W`` ranks gets, from a version saved by ``W_old`` ranks:

* **DTensor state** (FSDP2 parameters and their optimizer state, any placement, any
  mesh): each stored item holds its chunk's global shape and offset. The new rank's
  chunk is computed from the live object's mesh and placements (a parameter's for its
  optimizer state, also when the optimizer has no state yet) and assembled from the
  covering byte ranges of the stored chunks (this node's segments are mapped, only the
  covering elements are copied). A DTensor with no live counterpart comes back as the
  whole (consolidated) tensor. Same mesh and placements: the rank's own chunk, as is.
* **Replicated state** (DDP-style model and optimizer): old rank ``r mod W_old``'s copy;
  stored sharded (``shard_replicated=True``), the slices of every rank in its
  ``dp_ranks`` are gathered first.
* **Per-rank state** (RNG states, step, LR scheduler, extra state and providers): that
  of old rank ``r mod W_old`` -- ranks added take the state of the rank they wrap onto
  (so new ranks ``r`` and ``r + W_old`` start with the same RNG streams), ranks removed
  lose theirs.

Everything handed to user code owns its memory: no view into a mapping survives
``load`` (the caller closes the SegmentCache afterwards).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from snapshotd.wire.errors import SnapshotdError
from snapshotd_client import layout as lo
from snapshotd_client.loader import load_the_rest, open_no_copy
from snapshotd_client import state as st
from snapshotd_client import tensors as tz

log = logging.getLogger("snapshotd_client")


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def stored_world_size(m, fallback: int) -> int:
    """The world size version ``m.version`` was saved at (its meta's ``world_size``;
    snapshots from before it was recorded: ``fallback``)."""
    try:
        w = st.loads_meta(m.meta_json).get("world_size")
    except ValueError:
        w = None
    return int(w) if type(w) is int and w >= 1 else fallback


def _spec(t):
    """(mesh, placements, global shape) of a DTensor, else None."""
    cls = _dtensor_cls()
    if cls is None or not isinstance(t, cls):
        return None
    return t.device_mesh, tuple(t.placements), tuple(int(s) for s in t.shape)


def live_specs(model, optimizer) -> dict[str, tuple]:
    """Stored name -> (mesh, placements, global shape) of the live DTensors a restore
    loads into: the model's (``model/<key>``) and the optimizer's state of each DTensor
    parameter (``optimizer/state/<i>/`` + anything of the parameter's global shape)."""
    out = {}
    for k, v in model.state_dict().items():
        s = _spec(v)
        if s is not None:
            out[f"model/{k}"] = s
    if optimizer is not None:
        i = 0
        for g in optimizer.param_groups:
            for p in g["params"]:
                s = _spec(p)
                if s is not None:
                    out[f"optimizer/state/{i}/"] = s
                i += 1
    return out


def _target_spec(name: str, gshape: tuple, specs: dict):
    s = specs.get(name)
    if s is None and name.startswith("optimizer/state/"):
        parts = name.split("/")
        s = specs.get("/".join(parts[:3]) + "/")
    return s if s is not None and s[2] == gshape else None


def _local_box(spec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements, gshape = spec
    shape, off = compute_local_shape_and_global_offset(gshape, mesh, placements)
    return tuple(int(s) for s in shape), tuple(int(o) for o in off)


def _contiguous_stride(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(out))


class _Mapped:
    """A payload mapped here (this node's segment, or memory of our own): read in place."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def numel(self) -> int:
        return self.t.numel()

    def need(self, offset: int, nbytes: int) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def slice(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.t[offset:offset + nbytes]


class _Fetched:
    """A payload held on another node: read by ranged fetches (``fetch(offset, length)
    -> (bytes, bytes moved)``, the daemon's FetchShard: the covering checksum blocks
    from the holder, or decoded from its group when the holder is lost; verified by the
    daemon and again by the client). Byte ranges are noted first (:meth:`need`) and
    fetched together (:meth:`prefetch`): the covering blocks, merged into runs, each
    block once."""

    def __init__(self, m, fetch):
        self.m, self.fetch = m, fetch
        self.bs = m.block_size_bytes or (1 << 22)
        self.wanted: set[int] = set()  # blocks noted, not yet fetched
        self.blocks: dict[int, memoryview] = {}  # block -> its bytes
        self.moved = 0  # bytes the fetches moved

    def numel(self) -> int:
        return self.m.payload_bytes

    def _covering(self, offset: int, nbytes: int) -> range:
        return range(offset // self.bs, -(-(offset + nbytes) // self.bs)) if nbytes else range(0)

    def need(self, offset: int, nbytes: int) -> None:
        self.wanted.update(b for b in self._covering(offset, nbytes) if b not in self.blocks)

    def prefetch(self) -> None:
        todo = sorted(self.wanted - set(self.blocks))
        self.wanted.clear()
        i = 0
        while i < len(todo):
            j = i
            while j + 1 < len(todo) and todo[j + 1] == todo[j] + 1:
                j += 1
            lo = todo[i] * self.bs
            hi = min((todo[j] + 1) * self.bs, self.m.payload_bytes)
            data, moved = self.fetch(lo, hi - lo)
            self.moved += moved
            mv = memoryview(data)
            for b in range(todo[i], todo[j] + 1):
                self.blocks[b] = mv[(b - todo[i]) * self.bs:min((b - todo[i] + 1) * self.bs, hi - lo)]
            i = j + 1

    def slice(self, offset: int, nbytes: int) -> torch.Tensor:
        self.need(offset, nbytes)
        self.prefetch()  # nothing when open() noted everything load() reads
        out = torch.empty(nbytes, dtype=torch.uint8)
        dst = out.numpy()
        for b in self._covering(offset, nbytes):
            a, z = max(offset, b * self.bs), min(offset + nbytes, (b + 1) * self.bs)
            dst[a - offset:z - offset] = np.frombuffer(self.blocks[b], np.uint8)[a - b * self.bs:z - b * self.bs]
        return out


class _Source:
    """One stored shard: its manifest, its payload (mapped here, or :class:`_Fetched` from
    another node) and its replicated payload (its own bytes, or gathered from its DP
    peers' slices)."""

    def __init__(self, rank: int, buf, m, fetch=None):
        self.rank, self.m = rank, m
        if fetch is not None:
            self.base = _Fetched(m, fetch)
        else:
            with warnings.catch_warnings():  # a read-only mapping: only read, then copied
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self.base = _Mapped(torch.from_numpy(np.frombuffer(buf, np.uint8)) if buf is not None and
                                    len(memoryview(buf)) else torch.empty(0, dtype=torch.uint8))
        self.rep_base = self.base if self.whole() else None
        self.chunks = {e.name: e for e in m.replicated_tensors}

    @property
    def fetched(self) -> bool:
        return isinstance(self.base, _Fetched)

    def whole(self) -> bool:
        m = self.m
        return not m.replicated_bytes or (m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes)

    def _slot(self, base, e):
        slot = lo.slot_of(e)
        if slot.offset + slot.nbytes > base.numel():
            raise SnapshotdError(f"rank {self.rank}: tensor {slot.name!r} ends at byte "
                                 f"{slot.offset + slot.nbytes}, past its {base.numel()}-byte payload")
        return slot

    def view(self, base, e) -> torch.Tensor:
        """Entry ``e``'s whole tensor (a view of a mapped payload)."""
        slot = lo.slot_of(e)
        dtype = tz.torch_dtype(slot.dtype)
        if slot.nbytes == 0:
            return torch.empty(slot.shape, dtype=dtype)
        self._slot(base, e)
        return base.slice(slot.offset, slot.nbytes).view(dtype).view(slot.shape)

    def need(self, base, e) -> None:
        slot = self._slot(base, e)
        base.need(slot.offset, slot.nbytes)

    def _box_bytes(self, e, a, b) -> tuple[int, int, tuple[int, ...]]:
        """(first byte, byte count, element strides) of the part [a, b) (chunk-relative
        corners) of entry ``e``'s row-major chunk: from its first element to its last."""
        stride = _contiguous_stride(tuple(e.shape))
        es = tz.torch_dtype(e.dtype).itemsize
        first = sum(x * s for x, s in zip(a, stride))
        last = sum((y - 1) * s for y, s in zip(b, stride))
        return lo.slot_of(e).offset + first * es, (last - first + 1) * es, stride

    def need_piece(self, base, e, a, b) -> None:
        self._slot(base, e)
        off, n, _ = self._box_bytes(e, a, b)
        base.need(off, n)

    def piece(self, base, e, a, b) -> torch.Tensor:
        """The part [a, b) of entry ``e``'s chunk, reading only the bytes from its first
        element to its last."""
        self._slot(base, e)
        off, n, stride = self._box_bytes(e, a, b)
        flat = base.slice(off, n).view(tz.torch_dtype(e.dtype))
        return flat.as_strided([y - x for x, y in zip(a, b)], stride)


class Reshard:
    """Opens and loads one version for rank ``rank`` of ``world_size`` (module docstring)."""

    def __init__(self, client, segments, job_id: str, rank: int, world_size: int):
        self.client, self.segments = client, segments
        self.job_id, self.rank, self.world_size = job_id, rank, world_size
        self.sources: dict[int, _Source] = {}
        self.old_world = 0
        self.bytes_copied = 0  # stored bytes copied into this rank's state (last load)
        self.bytes_fetched = 0  # bytes ranged fetches moved from other nodes (last open)
        self.fetched_ranks: list[int] = []  # old ranks read by ranged fetches (last open)

    def _open_rank(self, rank: int, version: int) -> _Source:
        """An old rank's shard: mapped when it is on this node, else its manifest only
        (its bytes come by ranged fetches of what this rank reads)."""
        src = self.sources.get(rank)
        if src is None:
            resp, buf = open_no_copy(self.client, self.segments, self.job_id, rank, version)
            if buf is not None or not resp.manifest.payload_bytes:
                src = _Source(rank, buf, resp.manifest)
            else:
                v = resp.manifest.version

                def fetch(offset, length, rank=rank, v=v):
                    _, data, moved = self.client.fetch_range(self.job_id, rank, v, offset, length)
                    return data, moved

                src = _Source(rank, None, resp.manifest, fetch)
                self.fetched_ranks.append(rank)
            self.sources[rank] = src
        return src

    @property
    def home(self) -> int:
        """The old rank whose per-rank (and replicated) state this rank takes."""
        return self.rank % self.old_world

    def open(self, version: int, own=None, model=None, optimizer=None) -> None:
        """Open what this rank needs of ``version``: the home rank's shard, its DP peers'
        slices, and, when a DTensor's new chunk is not the home rank's stored chunk,
        every old rank's shard; then fetch, from the shards on other nodes, the covering
        blocks of exactly the bytes :meth:`load` reads (so a failure shows here, before
        any rank loads anything). ``own``: this rank's OpenShardResponse when it was
        opened already (same rank in the old layout)."""
        self.sources.clear()
        self.fetched_ranks, self.bytes_fetched = [], 0
        if own is not None:
            seg = self.segments.get(own.segment_name, writable=False)
            self.sources[self.rank] = _Source(self.rank, seg.buf, own.manifest)
            first = self.sources[self.rank]
        else:
            first = self._open_rank(0, version)
        self.old_world = stored_world_size(first.m, self.world_size)
        home = self._open_rank(self.home, version)
        self._gather(home, version)
        specs = live_specs(model, optimizer) if model is not None else {}
        if self._needs_all(home, specs):
            for r in range(self.old_world):
                self._gather(self._open_rank(r, version), version)
        self._prefetch(specs)

    def _prefetch(self, specs: dict) -> None:
        """Note every byte range :meth:`load` reads and fetch them (remote shards only)."""
        home = self.sources[self.home]
        for e in home.m.replicated_tensors:
            if e.global_shape:
                for src, c, _, a, b in self._cover(e.name, e, _target_spec(
                        e.name, tuple(e.global_shape), specs))[2]:
                    src.need_piece(src.rep_base, c, a, b)
            else:
                home.need(home.rep_base, e)
        for e in home.m.tensors:
            home.need(home.base, e)
        for src in self.sources.values():
            src.base.prefetch()
            if src.fetched:
                self.bytes_fetched += src.base.moved
                src.base.moved = 0

    def _gather(self, src: _Source, version: int) -> None:
        """Rebuild ``src``'s replicated payload from its DP peers' slices (sharded)."""
        if src.rep_base is not None:
            return
        m = src.m
        out = torch.empty(m.replicated_bytes, dtype=torch.uint8)
        for r in m.dp_ranks:
            om = self._open_rank(r, version) if r != src.rank else src
            if om.m.replicated_bytes != m.replicated_bytes:
                raise SnapshotdError(f"rank {r}'s slice belongs to another layout than rank {src.rank}'s")
            n = om.m.slice_bytes
            if n:
                if n > om.base.numel():
                    raise SnapshotdError(f"rank {r}'s slice is larger than its segment")
                out[om.m.slice_offset:om.m.slice_offset + n].copy_(om.base.slice(0, n))
        src.rep_base = _Mapped(out)

    def _needs_all(self, home: _Source, specs: dict) -> bool:
        """Some DTensor's new chunk is not exactly the home rank's stored chunk."""
        for e in home.m.replicated_tensors:
            if not e.global_shape:
                continue
            spec = _target_spec(e.name, tuple(e.global_shape), specs)
            if spec is None:  # no live DTensor: the whole tensor, unless it is whole already
                if tuple(e.shape) != tuple(e.global_shape):
                    return True
                continue
            shape, off = _local_box(spec)
            if (shape, off) != (tuple(e.shape), tuple(e.global_offset)):
                return True
        return False

    def _cover(self, name: str, e, spec):
        """(shape, offset, pieces, complete) of the new chunk of DTensor item ``name``
        (``spec`` None: the whole tensor): pieces [(source, its chunk entry, destination
        index, a, b)] copy the part [a, b) (chunk-relative corners) of a stored chunk;
        the home rank's first, then each old rank's, skipping parts already covered."""
        gshape = tuple(e.global_shape)
        shape, off = _local_box(spec) if spec is not None else (gshape, (0,) * len(gshape))
        covered = torch.zeros(shape, dtype=torch.bool)
        home = self.sources[self.home]
        order = [home] + [s for r, s in sorted(self.sources.items()) if r != self.home]
        pieces = []
        for src in order:
            c = src.chunks.get(name)
            if c is None or tuple(c.global_shape) != gshape or not (
                    len(c.global_offset) == len(c.shape) == len(gshape)):
                continue  # not a chunk of this tensor (or one stored without its offset)
            lo_, hi_ = [], []
            for d in range(len(gshape)):
                a = max(off[d], c.global_offset[d])
                b = min(off[d] + shape[d], c.global_offset[d] + c.shape[d])
                if a >= b:
                    break
                lo_.append(a)
                hi_.append(b)
            else:
                dst_idx = tuple(slice(a - off[d], b - off[d]) for d, (a, b) in enumerate(zip(lo_, hi_)))
                if bool(covered[dst_idx].all()):
                    continue
                covered[dst_idx] = True
                pieces.append((src, c, dst_idx, tuple(a - c.global_offset[d] for d, a in enumerate(lo_)),
                               tuple(b - c.global_offset[d] for d, b in enumerate(hi_))))
        return shape, off, pieces, bool(covered.all())

    def _assemble(self, name: str, e, spec) -> torch.Tensor:
        """The new chunk of DTensor item ``name`` (``spec`` None: the whole tensor),
        copied from the covering parts of every stored chunk."""
        gshape = tuple(e.global_shape)
        shape, off, pieces, complete = self._cover(name, e, spec)
        home = self.sources[self.home]
        if not complete:
            raise SnapshotdError(
                f"{name}: the stored chunks of version {home.m.version} (saved by {self.old_world} "
                f"ranks) do not cover the part {list(off)}+{list(shape)} of {list(gshape)} this rank needs")
        out = torch.empty(shape, dtype=tz.torch_dtype(e.dtype))
        for src, c, dst_idx, a, b in pieces:
            piece = src.piece(src.rep_base, c, a, b)
            out[dst_idx].copy_(piece)
            self.bytes_copied += piece.numel() * piece.element_size()
        if spec is None:
            return out
        mesh, placements, _ = spec
        return _dtensor_cls().from_local(out, mesh, placements, run_check=False,
                                         shape=torch.Size(gshape), stride=_contiguous_stride(gshape))

    def load(self, model, optimizer, lr_scheduler, extra_state: dict) -> tuple[int, dict | None]:
        """Build this rank's state from the opened shards and load it (see the module
        docstring). Returns (the step, the snapshot's "pipeline" entry or None)."""
        home = self.sources[self.home]
        m = home.m
        meta = st.loads_meta(m.meta_json)
        specs = live_specs(model, optimizer)
        self.bytes_copied = 0
        rep_tensors = []
        try:
            for e in m.replicated_tensors:
                if e.global_shape:
                    rep_tensors.append(self._assemble(e.name, e, _target_spec(
                        e.name, tuple(e.global_shape), specs)))
                else:
                    rep_tensors.append(home.view(home.rep_base, e).clone())
                    self.bytes_copied += e.nbytes
            rep = st.unflatten_state(meta["replicated"], rep_tensors)
            local = st.unflatten_state(meta["local"], [home.view(home.base, e).clone() for e in m.tensors])
        finally:
            self.sources.clear()  # nothing below points into a mapping
            del home
        model.load_state_dict(rep.get("model", {}))
        load_the_rest(rep, local, optimizer, lr_scheduler, extra_state)
        if self.old_world != self.world_size:
            log.info("snapshotd: rank %d of %d restored version %d saved by %d ranks (per-rank state "
                     "of rank %d; %.1f MiB copied)", self.rank, self.world_size, m.version,
                     self.old_world, self.home, self.bytes_copied / 2**20)
        return int(m.version), local.get("pipeline")
