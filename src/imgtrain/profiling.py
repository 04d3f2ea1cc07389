"""train.profile=true: torch.profiler over a few training steps, then training goes on.

One rank (train.profile_rank, 0 by default) records CPU and device activity, shapes and memory
for `profile_wait` skipped, `profile_warmup` warm-up and `profile_active` recorded steps. It writes
a chrome trace (Perfetto, chrome://tracing) to profile/ in the run directory and prints the top
operators by self device time (self CPU time on the CPU).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.profiler import ProfilerActivity, profile, schedule

from imgtrain.device import DeviceInfo
from imgtrain.distributed import World
from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.config import TrainConfig

log = logging.getLogger("imgtrain")
TOP_OPERATORS = 15


def profiled_activities(device: DeviceInfo) -> list[ProfilerActivity]:
    """The CPU, and the device's own activity where it has one: never CUDA's off a GPU."""
    if device.name == "gpu":
        return [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    if device.name == "npu":  # torch_npu registers the NPU as the PrivateUse1 backend
        return [ProfilerActivity.CPU, ProfilerActivity.PrivateUse1]
    return [ProfilerActivity.CPU]


def _quiet_kineto() -> None:
    """Off a GPU, silence kineto (torch.profiler's tracer) unless the user set its level.

    A CUDA build of torch asks for the GPUs' properties when it writes a trace, whatever the
    activities, and logs `ERROR: ... gpuGetDeviceCount failed` where there is none, besides its
    `USDT: profiler_start`/`profiler_stop` lines: noise under a run that went well. Kineto reads
    the level when the process's first profiler starts (6: above its highest, USDT)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


class NoProfiler:
    """What every run without train.profile (and every other rank) gets: nothing happens."""

    def __enter__(self) -> "NoProfiler":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def step(self) -> None:
        pass


class StepProfiler(NoProfiler):
    """torch.profiler stepped once per training step; stops itself once the trace is written."""

    def __init__(self, folder: Path, device: DeviceInfo, rank: int, wait: int, warmup: int,
                 active: int) -> None:
        self.folder, self.rank, self.device = folder, rank, device
        self.steps_left = wait + warmup + active
        activities = profiled_activities(device)
        if ProfilerActivity.CUDA not in activities:
            _quiet_kineto()
        self.sort_by = "self_cpu_time_total" if device.name == "cpu" else "self_device_time_total"
        self.profiler: profile | None = profile(
            activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active,
                                                     repeat=1),
            on_trace_ready=self._write, record_shapes=True, profile_memory=True)

    def __enter__(self) -> "StepProfiler":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.profiler.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop()  # a run shorter than the schedule still writes what it recorded

    def step(self) -> None:
        if self.profiler is None:
            return
        self.profiler.step()
        self.steps_left -= 1
        if self.steps_left <= 0:
            self._stop()

    def _stop(self) -> None:
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.stop()

    def _write(self, prof: profile) -> None:
        path = self.folder / f"rank{self.rank}.step{prof.step_num}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        table = prof.key_averages().table(sort_by=self.sort_by, row_limit=TOP_OPERATORS)
        (self.folder / f"rank{self.rank}.operators.txt").write_text(table + "\n")
        # Rank 0's log reaches the console and train.log; other ranks keep the text file.
        log.info("profile: chrome trace %s; top operators by %s:\n%s", path,
                 self.sort_by.replace("_", " "), table)


def check_profile(train: TrainConfig, world_size: int) -> None:
    """train.profile's schedule and rank, when it is set."""
    if not train.profile:
        return
    steps = {"wait": train.profile_wait, "warmup": train.profile_warmup,
             "active": train.profile_active}
    if min(steps.values()) < 0 or steps["active"] < 1:
        raise ConfigError(f"train.profile_wait/warmup must be >= 0 and profile_active >= 1 "
                          f"(got {steps})")
    if not 0 <= train.profile_rank < world_size:
        raise ConfigError(f"train.profile_rank={train.profile_rank} is not a rank of this run "
                          f"(world size {world_size})")


def build_profiler(train: TrainConfig, output_dir: Path, device: DeviceInfo,
                   world: World) -> NoProfiler:
    """A StepProfiler on the profiled rank when train.profile is set, else a NoProfiler."""
    check_profile(train, world.world_size)
    if not train.profile or world.rank != train.profile_rank:
        return NoProfiler()
    return StepProfiler(output_dir / "profile", device, train.profile_rank,
                        train.profile_wait, train.profile_warmup, train.profile_active)
