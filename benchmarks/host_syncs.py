"""Counting the host synchronisations inside training steps, on any device.

- `HostReads` records every operation that makes the host wait for an accelerator: reading a
  value (`item`, `tolist`, `cpu`, `numpy`, `bool`/`float`/`int` of a tensor: aten's
  `_local_scalar_dense`), an op whose output size depends on the data (`nonzero`), and a tensor
  made from host data (`torch.tensor`: aten's `lift_fresh`, then a pageable copy and a stream
  sync on CUDA, pytorch/pytorch#120996; `AclrtSynchronizeStreamWithTimeout` on the NPU). It sees
  them on the CPU too, where nothing actually waits, so a test proves a step sync-free without
  an accelerator.
- `CudaSyncs` counts what torch.cuda's sync debug mode reports, on a GPU.
- `watching_steps` turns a watch on for some training steps of a real `Trainer`, leaving out
  its print points (`_log_progress`, whose one read every print_freq steps is by design).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Reads of a device value on the host that the dispatcher does not show on the CPU.
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
          torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__index__}
_SYNCING_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.lift_fresh",
                "aten.masked_select", "aten.unique", "aten._unique2", "aten.repeat_interleave"}


class _Reads(TorchFunctionMode):
    def __init__(self, owner: "HostReads") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        if func in _READS and self.owner.active:
            self.owner.record(getattr(func, "__name__", str(func)))
            with self.owner.quiet():  # the aten op underneath is the same read: count it once
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, owner: "HostReads") -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if self.owner.active and not self.owner.muted:
            name = str(func.overloadpacket)
            if name in _SYNCING_OPS or _blocking_copy(name, args, kwargs):
                self.owner.record(name)
        return func(*args, **kwargs)


def _blocking_copy(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy between the host and a device that the host waits for: to the host, or from
    pageable host memory or without non_blocking to the device."""
    if name not in ("aten._to_copy", "aten.copy_") or not args or not torch.is_tensor(args[0]):
        return False
    if name == "aten.copy_":
        dst, src, non_blocking = args[0], args[1], (args[2] if len(args) > 2 else False)
        dst_type = dst.device.type
    else:
        src, non_blocking = args[0], kwargs.get("non_blocking", False)
        dst_type = torch.device(kwargs.get("device") or src.device).type
    if src.device.type == dst_type:
        return False
    if dst_type == "cpu":
        return True
    return src.device.type == "cpu" and not (non_blocking and src.is_pinned())


class HostReads:
    """Record host-syncing operations while `active`; use as a context manager around the work."""

    def __init__(self) -> None:
        self.active, self.muted = False, False
        self.events: list[str] = []
        self._stack = contextlib.ExitStack()

    def record(self, name: str) -> None:
        self.events.append(name)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        self.muted = True
        try:
            yield
        finally:
            self.muted = False

    def __enter__(self) -> "HostReads":
        self._stack.enter_context(_Reads(self))
        self._stack.enter_context(_Ops(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


class CudaSyncs:
    """torch.cuda.set_sync_debug_mode('warn') while `active`: counts the syncs it reports."""

    def __init__(self) -> None:
        self._active = False
        self.events: list[str] = []
        self._catch = warnings.catch_warnings(record=True)

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        torch.cuda.set_sync_debug_mode("warn" if value else "default")

    def __enter__(self) -> "CudaSyncs":
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = False
        self._catch.__exit__(*exc)
        self.events = [str(w.message).splitlines()[0] for w in self._records
                       if "synchroniz" in str(w.message).lower()]


class _WatchedBatches:
    """The training loader, with the watch on while the trainer works on steps first..last."""

    def __init__(self, loader: Any, watch: Any, first: int, last: int) -> None:
        self.loader, self.watch, self.first, self.last = loader, watch, first, last

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        index = 0
        while True:
            self.watch.active = False  # making the batch is the loader's business, not the step's
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.watch.active = self.first <= index <= self.last
            yield batch
            index += 1


@contextlib.contextmanager
def watching_steps(trainer: Any, watch: Any, first: int, last: int) -> Iterator[None]:
    """Watch the trainer's training steps first..last (0-based), print points left out."""
    loaders, log_progress = trainer.loaders, trainer._log_progress

    def unwatched_log_progress(*args: Any, **kwargs: Any) -> None:
        was = watch.active
        watch.active = False
        try:
            log_progress(*args, **kwargs)
        finally:
            watch.active = was

    trainer.loaders = dataclasses.replace(loaders, train=_WatchedBatches(loaders.train, watch,
                                                                         first, last))
    trainer._log_progress = unwatched_log_progress
    try:
        yield
    finally:
        watch.active = False
        trainer.loaders = loaders
        del trainer._log_progress  # the class's method again
