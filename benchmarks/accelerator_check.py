"""Check imgtrain on one accelerator in a few minutes, and print a Markdown report.

- environment: torch, CUDA or CANN, cuDNN, the device;
- ResNet-152 synthetic training images/sec for amp O0, O1 and O2, with and without
  model.compile, beside ../shared/reference/bare_loop.py on the same device, with peak memory;
- host syncs in 20 training steps (torch.cuda's sync debug mode on a GPU, and imgtrain's own
  watch of host reads, benchmarks/host_syncs.py, on any device);
- overflow: amp.loss_scale=1e30 makes every float16 gradient overflow: the steps must be
  skipped (weights unchanged), not applied;
- resume and eval: a 1-epoch run resumed to 2 epochs, then its last.pt evaluated by mode=eval;
- the batch pool (dataset.reuse_batch_memory) on and off give identical losses on JPEG folders.

usage: python benchmarks/accelerator_check.py [--device auto|gpu|npu] [--skip-compile]
       python benchmarks/accelerator_check.py --device cpu --quick   # tiny sizes: a smoke run
                                             # (on a CPU its throughput table is O0 only)
Without a GPU or NPU it says so and exits with status 2. Each check runs in a fresh process
(--quick: in this one).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "benchmarks")]
TORCH_DEVICE = {"cpu": "cpu", "gpu": "cuda", "npu": "npu"}
SYNC_STEPS = 20


# ---- one check, in a process of its own ------------------------------------------------------
def resolve_plan(overrides: list[str]) -> Any:
    """The run's plan exactly as run.py resolves and checks it."""
    from hydra import compose, initialize_config_dir
    from imgtrain.resolve import resolve
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return resolve(cfg, overrides)


def build_trainer(plan: Any, out: Path) -> Any:
    """A rank-0 Trainer, built as a worker builds it (no resume)."""
    from imgtrain import assembly, device as devices
    import torch

    torch.manual_seed(plan.train.seed)  # as the worker seeds: the same run every time
    device = devices.for_local_rank(plan.device, 0)
    device.set_current()
    device.apply_settings(plan.cfg.device)
    return assembly.build_trainer(plan, out, device=device)


def peak_memory_gib(device: str) -> float | None:
    import torch
    if device == "cpu":
        return None
    return getattr(torch, TORCH_DEVICE[device]).max_memory_allocated() / 2**30


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    from imgtrain.worker import worker
    results = worker(resolve_plan(spec["overrides"]), spec["out"])
    history = results.get("history") or [{}]
    return {"images_per_sec": results.get("images_per_sec"), "status": results.get("status"),
            "final_acc1": results.get("final_acc1"), "train_loss": history[-1].get("train_loss"),
            "epochs_completed": results.get("epochs_completed"),
            "peak_memory_gib": peak_memory_gib(spec["device"])}


def child_syncs(spec: dict[str, Any]) -> dict[str, Any]:
    """Host syncs in steps 1..n of n + 2 (step 0 starts the throughput timer, a designed sync)."""
    from host_syncs import CudaSyncs, HostReads, watching_steps
    trainer = build_trainer(resolve_plan(spec["overrides"]), Path(spec["out"]))
    steps = spec["steps"]
    counts = {}
    for name, watch in (("host_reads", HostReads()), ("cuda_sync_debug", CudaSyncs())):
        if name == "cuda_sync_debug" and spec["device"] != "gpu":
            continue
        trainer.state.step_in_epoch = 0
        with watch, watching_steps(trainer, watch, first=1, last=steps):
            trainer.train_epoch(0)
        counts[name] = len(watch.events)
        counts[name + "_first"] = watch.events[:3]
    return counts


def child_overflow(spec: dict[str, Any]) -> dict[str, Any]:
    """Every step of an epoch at loss scale 1e30: count the steps that changed a weight."""
    import torch
    from imgtrain.plan import Amp
    plan = resolve_plan(spec["overrides"])
    if spec["device"] == "cpu":
        # float16 is refused on the CPU by the config: O2 float16 at scale 1e30 (what the
        # accelerator's overrides ask for) stands in for it, made here
        plan = dataclasses.replace(plan, amp=Amp("O2", torch.float16, 1e30))
    trainer = build_trainer(plan, Path(spec["out"]))
    step, applied = trainer.precision.step, []

    def counted_step(optimizer: Any, *args: Any) -> Any:
        before = [p.detach().clone() for p in trainer.model.parameters()]
        verdict = step(optimizer, *args)
        applied.append(any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())))
        return verdict  # the trainer leaves skipped steps out of the epoch's loss

    trainer.precision.step = counted_step
    metrics = trainer.train_epoch(0)
    finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
    return {"steps": len(applied), "applied": sum(applied), "loss": metrics["loss"],
            "weights_finite": bool(finite),
            "loss_scale": float(trainer.precision.loss_scale)}


CHILDREN = {"train": child_train, "syncs": child_syncs, "overflow": child_overflow}


def run_child(spec: dict[str, Any], in_process: bool) -> dict[str, Any]:
    if in_process:
        with contextlib.redirect_stdout(io.StringIO()):  # the runs' console lines
            return CHILDREN[spec["kind"]](spec)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:200]}
    return json.loads(lines[-1])


def run_json(command: list[str]) -> dict[str, Any]:
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": ((proc.stderr or "").strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


# ---- the report's sections -------------------------------------------------------------------
def environment(device: str) -> str:
    import torch
    rows = [("host", f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores"),
            ("python", platform.python_version()), ("torch", torch.__version__)]
    if device == "gpu":
        props = torch.cuda.get_device_properties(0)
        rows += [("CUDA", torch.version.cuda), ("cuDNN", str(torch.backends.cudnn.version())),
                 ("device", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                            f"{torch.cuda.device_count()} visible")]
    elif device == "npu":
        import torch_npu
        cann = getattr(getattr(torch_npu, "version", None), "cann", None)
        rows += [("torch_npu", torch_npu.__version__),
                 ("CANN", cann or os.environ.get("ASCEND_TOOLKIT_HOME", "unknown")),
                 ("device", f"{torch.npu.get_device_name(0)}, {torch.npu.device_count()} visible")]
    else:
        rows += [("device", f"CPU ({platform.processor() or platform.machine()})")]
    return "\n".join(["## Environment", "", "| | |", "|---|---|"]
                     + [f"| {key} | {value} |" for key, value in rows])


def _fmt(value: Any, pattern: str = "{:.1f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def throughput(device: str, quick: bool, compile_too: bool, reference: Path, work: Path) -> str:
    arch, size, steps, warmup = ("resnet18", 16, 1, 1) if quick else ("resnet152", 224, 45, 15)
    # --quick on a CPU: O1 and O2 train in bfloat16, ~1.5 s a step without bf16 units, and their
    # img/s would say nothing; the host-sync table below still trains both.
    levels = ("O0",) if quick and device == "cpu" else ("O0", "O1", "O2")
    bare_amp = {"O0": "none", "O1": "fp16", "O2": "fp16"}
    if device == "cpu":
        bare_amp = {"O0": "none", "O1": "bf16", "O2": "bf16"}
    lines = [f"## Training throughput: {arch}, synthetic data, {size} px, channels_last on "
             "accelerators", "",
             "| amp | compile | batch | imgtrain img/s | bare loop img/s | ratio | peak memory GiB |",
             "|---|---|---|---|---|---|---|"]
    for amp in levels:
        batch = 8 if quick else (128 if amp == "O0" else 256)  # fp32 at 256 may not fit
        for compiled in ((False, True) if compile_too else (False,)):
            overrides = [f"device={device}", "dataset=synthetic", f"model={arch}", f"amp={amp}",
                         f"dataset.image_size={size}", f"train.batch_size={batch}",
                         f"dataset.train_size={batch * (steps + warmup)}",
                         f"dataset.val_size={batch}", "train.epochs=1",
                         f"train.steps_per_epoch={steps + warmup}",
                         f"train.fps_warmup_steps={warmup}", f"model.compile={compiled}",
                         f"hydra.run.dir={work}/speed-{amp}-{compiled}"]
            if device != "cpu":
                overrides.append("model.channels_last=true")
            if quick:
                overrides += ["dataset.workers=0", "dataset.num_classes=10"]
            ours = run_child({"kind": "train", "device": device, "overrides": overrides,
                              "out": f"{work}/speed-{amp}-{compiled}"}, quick)
            bare: dict[str, Any] = {}
            if not quick or amp == "O0":
                bare = run_json([sys.executable, str(reference / "bare_loop.py"), "--arch", arch,
                                 "--image-size", str(size), "--batch-size", str(batch),
                                 "--num-classes", "1000" if not quick else "10",
                                 "--steps", str(steps), "--warmup", str(warmup),
                                 "--device", TORCH_DEVICE[device], "--amp", bare_amp[amp],
                                 *(["--channels-last"] if device != "cpu" else []),
                                 *(["--compile"] if compiled else [])])
            ratio = (ours["images_per_sec"] / bare["images_per_sec"]
                     if ours.get("images_per_sec") and bare.get("images_per_sec") else None)
            lines.append(f"| {amp} | {'yes' if compiled else 'no'} | {batch} | "
                         f"{_fmt(ours.get('images_per_sec')) if 'error' not in ours else ours['error']} | "
                         f"{_fmt(bare.get('images_per_sec')) if 'error' not in bare else bare['error']} | "
                         f"{_fmt(ratio, '{:.2f}x')} | {_fmt(ours.get('peak_memory_gib'), '{:.1f}')} |")
    lines.append("")
    lines.append(f"imgtrain: `run.py` settings, images/sec after {warmup} warm-up steps; the bare "
                 f"loop: same arch, batch and device, amp {bare_amp['O1']} for O1 and O2 "
                 "(it has no O2)." + ("" if len(levels) == 3 else
                                      " --quick on a CPU: O0 only (bfloat16 is emulated)."))
    return "\n".join(lines)


def _small_run(device: str, quick: bool, work: Path, name: str, *extra: str) -> list[str]:
    size, batch, steps = (16, 4, 3) if quick else (64, 32, 8)
    return [f"device={device}", "dataset=synthetic", "model=resnet18", f"dataset.image_size={size}",
            f"train.batch_size={batch}", "dataset.num_classes=10",
            f"dataset.train_size={batch * steps}",
            f"dataset.val_size={batch * 2}", "train.epochs=1",
            *(["dataset.workers=0"] if quick else []), f"hydra.run.dir={work}/{name}", *extra]


def host_syncs(device: str, quick: bool, work: Path) -> str:
    steps = 1 if quick else SYNC_STEPS
    levels = [("O0", "auto"), ("O1", "bfloat16"), ("O2", "bfloat16")]
    if device != "cpu":
        levels[1:1] = [("O1", "float16"), ("O2", "float16")]
    plural = "s" * (steps > 1)
    lines = [f"## Host syncs in {steps} training step{plural} (between print points)", "",
             "| amp | dtype | host reads (imgtrain's watch) | CUDA sync debug mode | first seen |",
             "|---|---|---|---|---|"]
    for amp, dtype in levels:
        # --quick: 32 px (the later override wins). At 16 px layer4 sees 1x1 maps, and under the
        # watch's TorchDispatchMode the CPU's bfloat16 convolution backward gave layer4.0.conv1 a
        # non-finite gradient (seed 49, every time; never without the watch, nor at 32 px).
        overrides = _small_run(device, quick, work, f"syncs-{amp}-{dtype}", f"amp={amp}",
                               f"amp.dtype={dtype}", *(["dataset.image_size=32"] if quick else []),
                               f"train.steps_per_epoch={steps + 2}",
                               "train.print_freq=100000", "train.fps_warmup_steps=1",
                               f"dataset.train_size={(4 if quick else 32) * (steps + 2)}")
        result = run_child({"kind": "syncs", "device": device, "overrides": overrides,
                            "out": f"{work}/syncs-{amp}-{dtype}", "steps": steps}, quick)
        if "error" in result:
            lines.append(f"| {amp} | {dtype} | {result['error']} | | |")
            continue
        first = result.get("cuda_sync_debug_first") or result.get("host_reads_first") or []
        lines.append(f"| {amp} | {dtype} | {result['host_reads']} | "
                     f"{result.get('cuda_sync_debug', 'n/a (not a GPU)')} | "
                     f"{'; '.join(first) or '-'} |")
    lines += ["", "Target: 0 everywhere."]
    return "\n".join(lines)


def overflow(device: str, quick: bool, work: Path) -> str:
    overrides = _small_run(device, quick, work, "overflow",
                           f"train.steps_per_epoch={3 if quick else 6}")
    if device != "cpu":
        overrides += ["amp=O2", "amp.dtype=float16", "amp.loss_scale=1e30"]
    result = run_child({"kind": "overflow", "device": device, "overrides": overrides,
                        "out": f"{work}/overflow"}, quick)
    if "error" in result:
        return f"## Overflow (amp.loss_scale=1e30)\n\nerror: {result['error']}"
    ok = result["applied"] == 0 and result["weights_finite"]
    return (f"## Overflow (O2 float16, amp.loss_scale=1e30)\n\n{result['steps']} steps, "
            f"{result['steps'] - result['applied']} skipped, {result['applied']} applied; weights "
            f"finite: {result['weights_finite']}; epoch loss {result['loss']:.4f} (skipped "
            f"steps are left out of it: nan when all are); scale still "
            f"{result['loss_scale']:.0e}. **{'pass' if ok else 'FAIL'}** (every step skipped, "
            "nothing diverged).")


def resume_and_eval(device: str, quick: bool, work: Path) -> str:
    # --quick: in float32, which a CPU without bfloat16 units runs ~10x faster than O2's default
    amp = ["amp=O0"] if quick else []
    run = lambda *extra: run_child({"kind": "train", "device": device, "out": f"{work}/resume",
                                    "overrides": _small_run(device, quick, work, "resume", *amp,
                                                            *extra)}, quick)
    first, resumed = run("train.epochs=1"), run("train.epochs=2")
    weights = f"{work}/resume/checkpoints/last.pt"
    evaluated = run_child({"kind": "train", "device": device, "out": f"{work}/eval",
                           "overrides": _small_run(device, quick, work, "eval", "mode=eval", *amp,
                                                   f"model.weights={weights}")}, quick)
    ok = (resumed.get("epochs_completed") == 2 and evaluated.get("final_acc1") is not None
          and abs(evaluated["final_acc1"] - resumed["final_acc1"]) <= 1.0)
    return ("## Resume and eval\n\n"
            f"epoch 1: {first.get('status', first.get('error'))}; resumed to epoch 2: "
            f"{resumed.get('status', resumed.get('error'))}, epochs completed "
            f"{resumed.get('epochs_completed')}, final Acc@1 {_fmt(resumed.get('final_acc1'), '{:.2f}')}; "
            f"mode=eval of its last.pt: Acc@1 {_fmt(evaluated.get('final_acc1'), '{:.2f}')}. "
            f"**{'pass' if ok else 'FAIL'}**")


def batch_pool(device: str, quick: bool, work: Path) -> str:
    from compare import QUICK, make_jpegs
    root = make_jpegs(work / "jpegs", QUICK)
    results = {}
    for reuse in (True, False):
        overrides = [f"device={device}", "dataset=imagenet", f"dataset.root={root}",
                     "model=resnet18", "amp=O0", "dataset.image_size=32", "train.batch_size=4",
                     "dataset.workers=2", "train.epochs=1", "device.cudnn_benchmark=false",
                     f"dataset.reuse_batch_memory={reuse}", f"hydra.run.dir={work}/pool-{reuse}"]
        results[reuse] = run_child({"kind": "train", "device": device, "overrides": overrides,
                                    "out": f"{work}/pool-{reuse}"}, quick)
    on, off = results[True], results[False]
    same = on.get("train_loss") is not None and on.get("train_loss") == off.get("train_loss")
    return ("## Batch pool on and off\n\n"
            f"train loss with dataset.reuse_batch_memory=true: {on.get('train_loss', on.get('error'))}, "
            f"false: {off.get('train_loss', off.get('error'))}. "
            f"**{'identical' if same else 'DIFFERENT'}** (O0, cudnn_benchmark off)")


# ---- the command -----------------------------------------------------------------------------
def pick_device(requested: str) -> str | None:
    from imgtrain.device import resolve_name
    from imgtrain.errors import ConfigError
    if requested == "cpu":
        return "cpu"
    try:
        name = resolve_name(requested)
    except ConfigError:
        return None
    return name if name != "cpu" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "gpu", "npu", "cpu"], default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, in-process: a smoke run")
    parser.add_argument("--skip-compile", action="store_true", help="leave out model.compile runs")
    parser.add_argument("--reference-dir", type=Path, default=REPO.parent / "shared" / "reference")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[json.loads(args.child)["kind"]](json.loads(args.child))))
        return
    device = pick_device(args.device)
    if device is None:
        sys.stderr.write(f"accelerator_check: no accelerator here (device={args.device}: no visible "
                         "GPU or NPU); run it on a GPU or NPU host, or use --device cpu --quick "
                         "for a smoke run\n")
        sys.exit(2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgtrain-check-") as tmp:
        work = args.work_dir or Path(tmp)
        compile_too = not (args.skip_compile or args.quick)
        sections = [environment(device),
                    throughput(device, args.quick, compile_too, args.reference_dir, work),
                    host_syncs(device, args.quick, work), overflow(device, args.quick, work),
                    resume_and_eval(device, args.quick, work), batch_pool(device, args.quick, work)]
    print(f"# imgtrain accelerator check: {device}{' (quick)' if args.quick else ''}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {(time.perf_counter() - started) / 60:.1f} min\n")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
