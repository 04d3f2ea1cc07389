"""An epoch's bookkeeping: loss, accuracy and images summed on the device, the window between
print points, the wait for data, throughput and the epoch's time.

The sums stay on the device: a step adds to them without a host sync. The host reads them once
per print point (`read_window`) and once at the epoch's end (`totals`, after the all-reduce).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from imgtrain.device import DeviceInfo
from imgtrain.distributed import World
from imgtrain.throughput import Throughput

if TYPE_CHECKING:
    from imgtrain.config import TrainConfig
    from imgtrain.plan import Batches


def val_sums(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(loss sum, top-1 hits, top-5 hits) of one validation batch's fp32 logits, on the device."""
    k = min(5, output.shape[1])
    hits = output.topk(k, dim=1).indices == target[:, None]
    return torch.stack([torch.nn.functional.cross_entropy(output, target, reduction="sum"),
                        hits[:, 0].sum().float(), hits.any(dim=1).sum().float()])


class EpochMeter:
    """One epoch's numbers, from the step it starts at (a resume's) to its last."""

    def __init__(self, device: DeviceInfo, batches: Batches, train: TrainConfig) -> None:
        self.per_rank, self.global_batch = batches.per_rank, batches.global_batch
        self.print_freq = train.print_freq
        # Loss sum over the steps applied with a finite loss, correct, samples behind that loss
        # sum: a step skipped for an fp16 overflow is left out of the epoch's loss.
        self.sums = torch.zeros(3, device=device.torch_device)
        self.window = torch.zeros(3, device=device.torch_device)
        self.throughput = Throughput(device, train.fps_warmup_steps, batches.global_batch)
        self.steps = self.window_steps = 0
        self.data_time, self.epoch_start = 0.0, time.perf_counter()
        self.window_start = self.step_end = self.epoch_start
        self.timed_images = self.timed_seconds = 0.0

    @property
    def data_time_per_step(self) -> float:
        """Mean seconds a step waited for its batches, over the epoch's steps so far."""
        return self.data_time / max(1, self.steps)

    def batch_arrived(self) -> None:
        """A step's batches are here: the time since the last step ended was the loader's."""
        self.data_time += time.perf_counter() - self.step_end

    def add_step(self, loss: torch.Tensor, correct: torch.Tensor,
                 overflowed: torch.Tensor | None, samples: int) -> None:
        """A step's mean loss, correct count and overflow verdict (on the device), over `samples`
        images (a host number: multiplying by it needs no device copy)."""
        counted = loss.isfinite() if overflowed is None else loss.isfinite() & (overflowed == 0)
        step = torch.stack([torch.where(counted, loss, 0.0) * samples, correct.float(),
                            counted.float() * samples])
        self.sums += step
        self.window += step
        self.steps += 1
        self.window_steps += 1
        self.throughput.step()

    def print_point(self, step: int) -> bool:
        """Whether the epoch's `step` (counted from 1) ends a print window."""
        return step % self.print_freq == 0

    def read_window(self) -> tuple[dict[str, float], float]:
        """The print window's loss, accuracy and images/sec (its TensorBoard tags), and its
        seconds. The one host sync per print point."""
        seconds = time.perf_counter() - self.window_start
        loss_sum, correct, finite_samples = self.window.tolist()
        samples = self.window_steps * self.per_rank
        return {"train/loss": loss_sum / finite_samples if finite_samples else float("nan"),
                "train/acc1": 100.0 * correct / max(samples, 1),
                "throughput/images_per_sec":
                    self.window_steps * self.global_batch / max(seconds, 1e-9)}, seconds

    def next_window(self) -> None:
        """Start the next print window (after the print point's logging, which it leaves out)."""
        self.window.zero_()
        self.window_start, self.window_steps = time.perf_counter(), 0

    def end_step(self, excluded_seconds: float) -> None:
        """The step is done; `excluded_seconds` of it (a checkpoint's) were not training."""
        self.throughput.exclude(excluded_seconds)
        self.step_end = time.perf_counter()

    def stop(self) -> tuple[float, float, float]:
        """Stop the clocks (a device sync): the images timed for throughput, their seconds, and
        the epoch's seconds."""
        self.timed_images, self.timed_seconds = self.throughput.finish(self.epoch_start)
        return self.timed_images, self.timed_seconds, time.perf_counter() - self.epoch_start

    def totals(self, world: World) -> dict[str, float]:
        """The epoch's metrics over every rank (one all-reduce, one host read), after `stop`."""
        loss_sum, correct, finite_samples = world.sum(self.sums).tolist()
        steps = max(1, self.steps)
        return {"loss": loss_sum / finite_samples if finite_samples else float("nan"),
                "acc1": 100.0 * correct / (steps * self.global_batch),
                "images_per_sec": self.timed_images / max(self.timed_seconds, 1e-9),
                "data_time": self.data_time / steps}
