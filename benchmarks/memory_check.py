"""The memory check's estimate against the peak that real training steps reach.

Each configuration trains a few steps with `python run.py` (dataset=synthetic, checkpoints and a
validation pass included) in a fresh process of its own. At the moment the worker runs the memory
check, that process records the check's estimate and resets its peak; after the run it reads the
peak it reached:

- on the CPU, the peak resident set size (VmHWM, reset through /proc/self/clear_refs) less the
  resident size at the check: what the run added to a process that MemAvailable already left out;
- on a GPU or NPU, the allocator's max_memory_allocated plus the device memory the process holds
  outside the allocator (context, kernels, library workspaces: used less reserved at the end, on a
  device nothing else uses).

The target: the estimate is never below the measured peak, and at most 25% above it.

usage: python benchmarks/memory_check.py [--device cpu|gpu|npu] [--quick] [--work-dir DIR]
(--quick: one tiny configuration, a smoke run, not a measurement)
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = float(1 << 20)
TARGET_ABOVE = 0.25
# (arch, image size, per-device batch, amp level, EMA): both model sizes, two image sizes and
# batches, with and without the EMA's copy, fp32 and O2's half weights with fp32 masters.
CONFIGS = [("resnet18", 64, 32, "O0", False), ("resnet18", 64, 64, "O0", True),
           ("resnet18", 96, 32, "O2", True), ("resnet50", 128, 16, "O0", False),
           ("resnet50", 128, 16, "O2", True)]
QUICK_CONFIGS = [("resnet18", 32, 8, "O0", True)]
STEPS = 3  # the second step is the first with the optimizer's momentum in place


def overrides(arch: str, size: int, batch: int, amp: str, ema: bool, device: str,
              run_dir: Path) -> list[str]:
    return [f"model={arch}", "dataset=synthetic", f"dataset.image_size={size}",
            "dataset.num_classes=1000", f"dataset.train_size={batch * STEPS}",
            f"dataset.val_size={batch}", f"train.batch_size={batch}", f"amp={amp}",
            f"device={device}", "train.epochs=1", f"train.steps_per_epoch={STEPS}",
            "train.print_freq=1", "sched.warmup_epochs=0",
            *(["ema.decay=0.999", "ema.steps=1"] if ema else []), f"hydra.run.dir={run_dir}"]


# ---- in the child: one run, measured -----------------------------------------------------------
def _status_kib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(result_path: Path, run_args: list[str]) -> None:
    """Run run.py here, with the memory check (build_trainer's) wrapped to record the estimate
    and reset the peak; write what was measured to `result_path`."""
    sys.path.insert(0, str(REPO / "src"))
    from imgtrain import assembly, memory

    record: dict[str, Any] = {}
    checked = assembly.check_memory

    def measured_check(plan: Any, device: Any, world: Any) -> None:
        est, per_device = memory.plan(plan, device)
        record.update(estimate=est.total(per_device), device=device.name)
        record["accelerator"] = device.is_accelerator
        if device.is_accelerator:
            device.module().reset_peak_memory_stats(device.torch_device)
            record["device_index"] = device.torch_device
        else:
            # Freed heap pages stay resident (imgtrain turns glibc's trimming off on the CPU) and
            # training would reuse them without growing RSS: hand them back first, so that the
            # peak counts every page the run uses from here on.
            ctypes.CDLL(None).malloc_trim(0)
            record["rss_at_check"] = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # VmHWM starts again from the current RSS
        checked(plan, device, world)

    assembly.check_memory = measured_check  # build_trainer's call
    sys.argv = [str(REPO / "run.py"), *run_args]
    code: Any = 0
    try:
        runpy.run_path(str(REPO / "run.py"), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    record["exit_code"] = code
    if record.get("accelerator"):
        import torch
        module = getattr(torch, "cuda" if record["device"] == "gpu" else "npu")
        free, total = module.mem_get_info()
        record["max_allocated"] = module.max_memory_allocated()
        record["outside_allocator"] = (total - free) - module.memory_reserved()
        record["measured"] = record["max_allocated"] + record["outside_allocator"]
    elif "rss_at_check" in record:
        record["measured"] = _status_kib("VmHWM") - record["rss_at_check"]
    result_path.write_text(json.dumps(record))


# ---- in the parent: every configuration, then the table ----------------------------------------
def measure(config: tuple, device: str, work: Path) -> dict[str, Any]:
    arch, size, batch, amp, ema = config
    name = f"{arch}-{size}px-b{batch}-{amp}{'-ema' if ema else ''}"
    result = work / f"{name}.json"
    args = overrides(*config, device=device, run_dir=work / name)
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", str(result), "--", *args],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"error: {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads(result.read_text())
    if record.get("exit_code") not in (0, None) or "measured" not in record:
        raise SystemExit(f"error: {name} did not train:\n{proc.stderr[-3000:]}")
    print(f"{name}: estimate {record['estimate'] / MIB:.0f} MiB, measured "
          f"{record['measured'] / MIB:.0f} MiB ({time.time() - started:.0f} s)", file=sys.stderr)
    return {"config": config, **record}


def table(rows: list[dict[str, Any]]) -> str:
    measured_as = ("max_memory_allocated + outside the allocator" if rows[0]["accelerator"]
                   else "peak RSS over RSS at the check")
    lines = [f"| arch | image px | batch | amp | EMA | estimate MiB | measured MiB ({measured_as}) "
             "| estimate / measured | target |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        arch, size, batch, amp, ema = row["config"]
        ratio = row["estimate"] / row["measured"]
        met = "yes" if 1.0 <= ratio <= 1.0 + TARGET_ABOVE else "**no**"
        lines.append(f"| {arch} | {size} | {batch} | {amp} | {'yes' if ema else 'no'} | "
                     f"{row['estimate'] / MIB:.0f} | {row['measured'] / MIB:.0f} | "
                     f"{ratio:.2f} | {met} |")
    return "\n".join(lines)


def header(device: str) -> str:
    import torch
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{when}, {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, device={device}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu", "npu"])
    parser.add_argument("--quick", action="store_true", help="one tiny configuration")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(args.child, [a for a in rest if a != "--"])
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        rows = [measure(config, args.device, work)
                for config in (QUICK_CONFIGS if args.quick else CONFIGS)]
        print(header(args.device) + "\n\n" + table(rows))


if __name__ == "__main__":
    main()
