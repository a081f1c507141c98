"""What a snapshot holds besides model/optimizer/LR scheduler: named state providers.

``Snapshotter(..., state={name: provider})`` takes, per name, either

- an object with ``state_dict()`` / ``load_state_dict()`` (a sampler, a data iterator, a
  GradScaler, ...): read with ``state_dict()`` at every save, loaded in place by restore;
- a callable returning the current value (``lambda: best_val_loss``, ``lambda: (X, Y)``):
  called at every save, so a loop that rebinds its variables needs no bookkeeping. Restore
  cannot rebind the loop's variables, so it puts the values into ``snap.restored``
  (name -> value); the loop rebinds them from there. Tensors come back on the device
  they were on when saved (when all of one value's tensors were on one device).

Both are stored next to the legacy ``extra_state`` entries (one namespace, so a name may
be used only once). ``ProvidingLoader`` wraps the ShardLoader so restore hands them back.

Also here, because every Snapshotter needs them: ``unwrap_model`` (DDP / DataParallel /
torch.compile wrappers saved as their bare module) and ``ensure_visible_logging`` (the
client's INFO lines on stderr when the program configured no logging).
Training thread only, like the Snapshotter.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import torch

__all__ = ["ProvidingLoader", "StateProviders", "ensure_visible_logging", "unwrap_model"]

_VALUE, _DEVICE = "value", "device"


def _has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _devices(x: Any, out: set) -> set:
    if isinstance(x, torch.Tensor):
        out.add(str(x.device))
    elif isinstance(x, (list, tuple)):
        for v in x:
            _devices(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _devices(v, out)
    return out


def _to_device(x: Any, device: str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if type(x) is list:
        return [_to_device(v, device) for v in x]
    if type(x) is tuple:
        return tuple(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return type(x)((k, _to_device(v, device)) for k, v in x.items())
    return x


class StateProviders:
    """The named providers of one Snapshotter; ``restored`` holds the callables' values
    of the last restore (empty before, and when there was nothing to restore)."""

    def __init__(self, state: dict | None, extra_state: dict):
        self.objects: dict[str, Any] = {}
        self.getters: dict[str, Callable[[], Any]] = {}
        self.restored: dict[str, Any] = {}
        for name, p in (state or {}).items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"state names must be non-empty strings, got {name!r}")
            if name in extra_state:
                raise ValueError(f"state name {name!r} is also an extra_state key; use one of them")
            if _has_state(p):
                self.objects[name] = p
            elif callable(p):
                self.getters[name] = p
            else:
                raise TypeError(
                    f"state[{name!r}] is a {type(p).__name__}: pass an object with state_dict()/"
                    f"load_state_dict(), or a callable returning the current value (lambda: {name}); "
                    "a plain value would be saved as it is now, not as it is at each save")

    def collect(self) -> dict:
        """name -> what to store, read now (at save time)."""
        out: dict[str, Any] = {n: o.state_dict() for n, o in self.objects.items()}
        for n, get in self.getters.items():
            v = get()
            devs = _devices(v, set())
            dev = devs.pop() if len(devs) == 1 else None
            out[n] = {_VALUE: v, _DEVICE: None if dev in (None, "cpu") else dev}
        return out

    def load_target(self, extra_state: dict) -> dict:
        """The dict the ShardLoader loads "extra" into: extra_state's entries plus our objects
        (loaded in place); the callables' values land in it under their names."""
        target = dict(extra_state)
        target.update(self.objects)
        return target

    def take_restored(self, target: dict, extra_state: dict) -> None:
        """After a load into ``target``: extra_state's plain values back into it, the
        callables' values into ``restored``."""
        for k, v in target.items():  # as the loader does without providers
            if k not in self.objects and k not in self.getters:
                extra_state[k] = v
        self.restored = {}
        for n in self.getters:
            if n not in target:
                continue
            entry = target[n]
            if isinstance(entry, dict) and set(entry) == {_VALUE, _DEVICE}:
                v, dev = entry[_VALUE], entry[_DEVICE]
                self.restored[n] = v if dev is None else _to_device(v, dev)
            else:  # stored by an extra_state entry of that name (an older script)
                self.restored[n] = entry


class ProvidingLoader:
    """The ShardLoader, with the providers loaded and handed back on each ``load``."""

    def __init__(self, inner, providers: StateProviders):
        self._inner, self._providers = inner, providers

    def load(self, name, m, version, model, optimizer, lr_scheduler, extra_state: dict):
        target = self._providers.load_target(extra_state)
        out = self._inner.load(name, m, version, model, optimizer, lr_scheduler, target)
        self._providers.take_restored(target, extra_state)
        return out

    def __getattr__(self, attr):  # everything else is the ShardLoader's
        return getattr(self._inner, attr)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DistributedDataParallel / DataParallel / torch.compile
    wrappers, so the wrapper and the module save the same state (no "module." prefix).
    FSDP is kept: its own state_dict already gives the bare module's names."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


class _WhenUnconfigured(logging.StreamHandler):
    """Prints to stderr only while the root logger has no handlers, i.e. until the
    program configures logging itself (then its configuration decides)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            self.stream = sys.stderr  # as it is now (pytest and others swap it)
            super().emit(record)


def ensure_visible_logging() -> None:
    """Make the "snapshotd_client" logger's INFO lines (one or two per restore, none per
    save unless something goes wrong) visible when the program configured no logging.
    Does nothing when the logger already has a handler or a level of its own."""
    log = logging.getLogger("snapshotd_client")
    if log.handlers or log.level != logging.NOTSET:
        return
    h = _WhenUnconfigured(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)
