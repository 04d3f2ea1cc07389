"""Images per second over an epoch, timed on the device without a per-step host sync."""
from __future__ import annotations

import time

from imgtrain.device import DeviceInfo


class Throughput:
    """Global images/sec over an epoch's steps after the first `warmup` ones.

    The device is synchronised only at the two measurement points, so the timer measures the
    device's work, not the launch queue, without a per-step host sync. Time spent writing
    checkpoints is left out: it is not training speed.
    """

    def __init__(self, device: DeviceInfo, warmup: int, global_batch: int) -> None:
        self.device, self.warmup, self.global_batch = device, warmup, global_batch
        self.steps = 0
        self.start_time = self.start_step = None
        self.excluded_seconds = 0.0

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.warmup or (self.warmup <= 0 and self.steps == 1):
            self.device.synchronize()
            self.start_time, self.start_step = time.perf_counter(), self.steps
            self.excluded_seconds = 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded_seconds += seconds

    def finish(self, epoch_start: float) -> tuple[float, float]:
        """(images, seconds) of the timed window; the whole epoch when it is shorter than warm-up."""
        self.device.synchronize()
        now = time.perf_counter()
        if self.start_time is None or self.steps <= self.start_step:
            return self.steps * self.global_batch, now - epoch_start - self.excluded_seconds
        return ((self.steps - self.start_step) * self.global_batch,
                now - self.start_time - self.excluded_seconds)
