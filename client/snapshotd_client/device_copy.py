"""The blocking part of a save: copy one rank's tensors into its staging segment.

``StagingCopier.copy`` writes host tensors straight into the segment. With CUDA tensors
it issues the copies on a side stream into page-locked (cudaHostRegister) shared memory
and returns the CUDA event that marks their end; training waits for it (``wait``, the
optimizer's step pre-hook) only before parameters change again. The model's buffers,
which a forward pass may change in place (BatchNorm's running statistics), are copied
from clones taken on the compute stream at the save.

Call order: ``copy`` (training thread) -> ``wait`` (training thread, before the next
optimizer step) ; ``unpin`` is SegmentCache's on_close, called before a mapping is
unmapped (it waits for the last copy first). Not thread-safe beyond that: one copier
per Snapshotter, driven from the training thread.
"""

from __future__ import annotations

import ctypes
import logging
import operator
import os
import warnings

import torch

from snapshotd_client import layout as lo
from snapshotd_client.tensors import PLAIN_TYPES

log = logging.getLogger("snapshotd_client")

_PLAIN_TENSOR = frozenset(PLAIN_TYPES)
_IS_CUDA = operator.attrgetter("is_cuda")
# dtypes whose same-dtype copy_ moves the bits as they are (no value conversion: NaN
# payloads and -0.0 kept); the host fast path copies them without a bits view
_BIT_EXACT_COPY = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16,
                             torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                             torch.bool})


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's per-thread last error after a failed call whose error
    was handled here: PyTorch reads it (cudaGetLastError) after its next kernel launch
    and would report a stale, unrelated error there. torch.cuda.cudart() does not bind
    cudaGetLastError, so find the runtime torch already loaded, by its soname."""
    major = (torch.version.cuda or "").split(".")[0]
    if not major:
        return
    try:
        lib = ctypes.CDLL(f"libcudart.so.{major}", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:  # linked statically or under another name: nothing to reset
        return
    lib.cudaGetLastError()


def cuda_call(fn: str, *args) -> str | None:
    """Call a torch.cuda.cudart() function; None on success, else the error text (and
    the runtime's last error cleared)."""
    cudart = torch.cuda.cudart()
    err = getattr(cudart, fn)(*args)
    if int(err) == 0:
        return None
    _clear_cuda_error()
    return f"{cudart.cudaGetErrorString(err)} (cudaError {int(err)})"


class StagingCopier:
    """Copies a save's tensors into a staging segment; owns the side stream, the pinned
    (driver-registered) mappings and the event of the copy still in flight."""

    def __init__(self) -> None:
        self._copy_done = None  # CUDA event the next optimizer step waits for
        self._side_stream = None
        # segment name -> (the mapping, its address): mappings registered with the CUDA
        # driver. Keyed to the mapping object, not just the name: a name re-mapped after
        # a restore or a daemon restart is a new mapping and is registered again.
        self._pinned: dict[str, tuple[object, int]] = {}
        self.pin_failed = False  # cudaHostRegister refused once: copy unpinned from then on
        # segment name -> (mapping, layout, [(index, bits dtype, view of the slot)]): the
        # host fast path's destinations. They point into the mapping: dropped by unpin(),
        # which SegmentCache calls before unmapping it; never handed out.
        self._views: dict[str, tuple] = {}
        self.last_skipped: frozenset = frozenset()  # replicated tensors the last copy skipped
        self.last_bytes_copied = 0  # bytes the last copy wrote
        self.model = None  # set by the Snapshotter: whose buffers a forward may change

    def forward_mutable(self, rep_tensors) -> list[int]:
        """Indices of the CUDA tensors among ``rep_tensors`` that are the model's buffers
        (a forward pass may change them in place while the side stream copies)."""
        model = self.model
        if model is None:
            return []
        try:
            ptrs = {b.data_ptr() for b in model.buffers() if b.is_cuda and b.numel()}
        except (AttributeError, RuntimeError):  # a module without plain buffers
            return []
        if not ptrs:
            return []
        out = []
        for i, t in enumerate(rep_tensors):
            try:
                if t.is_cuda and t.data_ptr() in ptrs:
                    out.append(i)
            except (AttributeError, RuntimeError):  # a DTensor or other subclass
                continue
        return out

    def copy(self, seg, lay, rep_tensors, loc_tensors, skip: frozenset = frozenset()):
        """Copy this rank's bytes into the staging segment; the CUDA event that marks the
        end of the copies (None: they are done, all tensors were on the host).

        ``lay`` must be the layout planned for exactly these tensors (names, dtypes,
        shapes): the Snapshotter re-plans whenever one of them changes. ``skip``: indices
        of replicated tensors the segment already holds (incremental snapshots); honoured
        on the host fast path only. ``last_skipped`` / ``last_bytes_copied`` say what
        this call skipped and copied."""
        buf = seg.buf if seg.buf is not None else bytearray(0)
        tensors = rep_tensors + loc_tensors
        self.last_skipped = frozenset()
        self.last_bytes_copied = lay.slice_hi - lay.slice_lo + sum(s.nbytes for s in lay.local)
        cuda = any(map(_IS_CUDA, tensors))
        if not cuda and seg.buf is not None and self._copy_views(seg, lay, tensors, skip):
            self._copy_done = None
            return None
        if not cuda:
            lo.copy_slice(buf, lay.replicated, rep_tensors, lay.slice_lo, lay.slice_hi,
                          lay.replicated_bytes)
            lo.copy_local(buf, lay.local, loc_tensors)
            self._copy_done = None
            return None
        self._pin(seg)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        side = self._side_stream
        # The copy overlaps the next forward, which updates buffers in place (BatchNorm's
        # running statistics): those are read from clones taken now, on the compute
        # stream, so the snapshot holds this step's values (parameters and optimizer
        # state change only in optimizer.step, whose pre-hook waits for the copy).
        mutable = self.forward_mutable(rep_tensors)
        if mutable:
            rep_tensors = list(rep_tensors)  # the caller's list stays as it was
            for i in mutable:
                rep_tensors[i] = rep_tensors[i].clone()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            lo.copy_slice(buf, lay.replicated, rep_tensors, lay.slice_lo, lay.slice_hi,
                          lay.replicated_bytes, non_blocking=True)
            lo.copy_local(buf, lay.local, loc_tensors, non_blocking=True)
            for t in rep_tensors + loc_tensors:
                if t.device.type == "cuda":
                    t.record_stream(side)
            ev = torch.cuda.Event()
            ev.record(side)
        self._copy_done = ev
        return ev

    def _copy_views(self, seg, lay, tensors, skip: frozenset = frozenset()) -> bool:
        """The host fast path: one ``torch._foreach_copy_`` of the sources into views of
        the segment made once per (mapping, layout), instead of a view made per tensor
        per save. Views of the dtypes whose same-dtype copy is a plain bit copy are typed
        (the sources go in as they are); others (complex, float8, ...) are same-size
        integer views of the bits, and so are their sources. False (nothing copied): not
        applicable here (a slice of the replicated part, a DTensor or other subclass,
        conjugate/negative bits on a bits-view source, odd sizes)."""
        if lay.slice_lo != 0 or lay.slice_hi != lay.replicated_bytes:
            return False
        held = self._views.get(seg.name)
        if held is not None and held[0] is seg and held[1] is lay:
            plan = held[2]
        else:
            plan = self._plan_views(seg, lay, tensors)
            if plan is None:
                return False
            self._views[seg.name] = (seg, lay, plan)  # unpin() drops it before unmapping
        views, dst_all, idx_all, nbytes_all, bits_at = plan
        if len(tensors) != len(views) or not _PLAIN_TENSOR.issuperset(map(type, tensors)):
            return False
        if not skip:
            dst = dst_all
            src = list(tensors) if idx_all is None else [tensors[i] for i in idx_all]
            for j, bits in bits_at:  # the few sources copied as bits
                t = src[j]
                if t.is_conj() or t.is_neg():
                    return False
                src[j] = t.view(bits)
            nbytes = nbytes_all
        else:
            dst, src = [], []
            nbytes = 0
            for (i, bits, d), t in zip(views, tensors):
                if bits is not None and (t.is_conj() or t.is_neg()):
                    return False
                if d is not None and i not in skip:
                    dst.append(d)
                    src.append(t if bits is None else t.view(bits))
                    nbytes += d.nbytes
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
        self.last_skipped = frozenset(i for i in skip if i < len(lay.replicated))
        self.last_bytes_copied = nbytes
        return True

    @staticmethod
    def _plan_views(seg, lay, tensors):
        """(per tensor (index, bits dtype or None when typed, view or None when empty),
        the non-empty views, their tensor indices (None: all), their bytes, [(position
        among the non-empty views, bits dtype)] of those copied as bits)."""
        from snapshotd_client import tensors as tz

        slots = lay.replicated + lay.local
        if len(slots) != len(tensors):
            return None
        views = []
        for i, (slot, t) in enumerate(zip(slots, tensors)):
            bits = tz._BITS.get(t.element_size())
            if bits is None or tz.dtype_name(t.dtype) != slot.dtype or tuple(t.shape) != slot.shape:
                return None
            if t.dtype in _BIT_EXACT_COPY:
                bits = None
            if slot.nbytes == 0:
                views.append((i, bits, None))
                continue
            raw = torch.frombuffer(seg.buf, dtype=torch.uint8, count=slot.nbytes, offset=slot.offset)
            views.append((i, bits, raw.view(t.dtype if bits is None else bits).view(slot.shape)))
        live = [(i, b, d) for i, b, d in views if d is not None]
        idx = None if len(live) == len(views) else [i for i, _, _ in live]
        bits_at = [(j, b) for j, (_, b, _) in enumerate(live) if b is not None]
        return views, [d for _, _, d in live], idx, sum(d.nbytes for _, _, d in live), bits_at

    def wait(self) -> None:
        """Block until the last copy is done (the optimizer's step pre-hook)."""
        ev = self._copy_done
        if ev is not None:
            ev.synchronize()  # parameters may change after this: the copy must be done
            self._copy_done = None

    @property
    def pinned_segments(self) -> tuple[str, ...]:
        """Names of the staging segments currently registered with the CUDA driver."""
        return tuple(self._pinned)

    def pinned(self) -> dict[str, tuple[object, int]]:
        """A copy of segment name -> (mapping, address) of the registered mappings."""
        return dict(self._pinned)

    def _pin(self, seg) -> None:
        """Page-lock a staging mapping for the CUDA driver (cudaHostRegister), once per
        mapping. A device-to-host copy into pageable memory goes through a driver bounce
        buffer and holds the calling thread until it is done; into registered memory it is
        DMA that runs on the side stream while training goes on. If the driver refuses
        (a locked-memory limit, say), warn once and copy unpinned: slower, still correct."""
        if seg.buf is None or self.pin_failed:
            return
        held = self._pinned.get(seg.name)
        if held is not None and held[0] is seg:
            return
        if held is not None:  # a mapping SegmentCache never closed through unpin
            self.unpin(held[0])
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(seg.buf))
        err = cuda_call("cudaHostRegister", ptr, seg.size, 0)
        if err is not None:
            self.pin_failed = True
            warnings.warn(f"snapshotd: cudaHostRegister of staging segment {seg.name} "
                          f"({seg.size} bytes) failed: {err}; device-to-host copies go "
                          f"unpinned (synchronous, slower)", RuntimeWarning, stacklevel=4)
            return
        self._pinned[seg.name] = (seg, ptr)

    def unpin(self, seg) -> None:
        """SegmentCache's on_close: unregister a mapping before it is unmapped (copies
        into it must be finished first: the driver would DMA into unmapped pages), and
        drop the views of it that the host fast path keeps."""
        held = self._views.get(seg.name)
        if held is not None and held[0] is seg:
            del self._views[seg.name]
        held = self._pinned.get(seg.name)
        if held is None or held[0] is not seg:
            return
        ev = self._copy_done
        if ev is not None:
            ev.synchronize()
        del self._pinned[seg.name]
        err = cuda_call("cudaHostUnregister", held[1])
        if err is not None:
            log.warning("snapshotd: cudaHostUnregister of %s failed: %s", seg.name, err)
