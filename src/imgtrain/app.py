"""What run.py runs, once, in the parent process: resolve and check the config, launch, report."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imgtrain import device as devices, preemption, records, rundir
from imgtrain.config import check_choices, lr_rule, unknown_keys
from imgtrain.data import SPLITS, check_dataset, cpu_cores
from imgtrain.data.mixing import check_mixing
from imgtrain.data.transforms import val_sizes
from imgtrain.distributed import WorkerFailed, check_world, launch
from imgtrain.ema import check_ema
from imgtrain.errors import (ConfigError, Preempted, config_error_line, one_line,
                             unknown_key_line)
from imgtrain.jobenv import plan_job, started_by_torchrun
from imgtrain.models import check_arch, check_compile, check_freeze
from imgtrain.optim import check_schedule
from imgtrain.precision import resolve_dtype, resolve_loss_scale
from imgtrain.results import RESULTS, read as read_results, record_failure
from imgtrain.slurm import requeue_count, requeue_self

log = logging.getLogger("imgtrain")
MODES = ("train", "eval", "bench_data", "predict", "export")
NO_DATASET = ("predict", "export")  # they read images or nothing, not dataset.root


class JobFailed(CompactHydraException):
    """A sweep job failed: Hydra prints just this line, runs the other jobs, then exits non-zero."""


def resolve(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The config as plain data, with the device resolved once, for the workers."""
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(unknown_key_line(extra[0], added=True))
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:  # e.g. optim.lr_base_size=0, or a mistyped ${...}
        raise ConfigError(config_error_line(exc)) from None
    config.pop("hydra", None)
    check_choices(config)
    config["overrides"] = overrides
    config["optim"]["lr_rule"] = lr_rule(cfg)
    config["device"]["resolved"] = devices.resolve_name(config["device"]["name"])
    config["world"] = plan_job(config["world"]).as_world()  # a SLURM job's nodes, unless none
    return config


def check(config: dict[str, Any]) -> None:
    """Reject bad input before any process starts or any file is written."""
    if config["mode"] not in MODES:
        raise ConfigError(f"unknown mode {config['mode']!r}; choose one of {', '.join(MODES)}")
    check_arch(config["model"]["arch"])
    check_freeze(config["model"]["freeze"])
    check_compile(config["model"])
    device = devices.DeviceInfo(config["device"]["resolved"])
    dtype = resolve_dtype(config["amp"]["level"], str(config["amp"]["dtype"]), device)
    resolve_loss_scale(config["amp"]["level"], dtype, config["amp"]["loss_scale"])
    evaluating = config["mode"] == "eval"  # its batch is its own, its data the val split alone
    check_world(plan_job(config["world"]), device.name,
                None if evaluating else config["train"]["batch_size"])
    check_eval_batch(config)
    for key in ("epochs", "print_freq", "accumulate_steps"):
        if int(config["train"][key]) < 1:
            raise ConfigError(f"train.{key}={config['train'][key]} must be at least 1")
    if not evaluating:
        check_recipe(config)
    check_requeues(config["train"])
    if config["train"]["on_checkpoint_error"] not in ("fail", "warn"):
        raise ConfigError("train.on_checkpoint_error must be fail or warn")
    if config["mode"] in NO_DATASET:
        processes = int(config["world"]["nproc_per_node"]) * int(config["world"]["nnodes"])
        if processes > 1:
            raise ConfigError(f"mode={config['mode']} runs in one process; drop world=8p")
        val_sizes(config["dataset"])  # predict's preprocessing, export's input size
        return
    config["dataset"]["num_classes"] = check_dataset(config["dataset"],
                                                     ("val",) if evaluating else SPLITS)


def check_eval_batch(config: dict[str, Any]) -> None:
    """eval.batch_size, and mode=eval's batch resolved: eval.batch_size, else train.batch_size,
    never checked against the training set (which mode=eval does not read)."""
    batch = config["eval"]["batch_size"]
    key = "eval.batch_size"
    if batch is None:
        if config["mode"] != "eval":
            return  # training validates with its micro-step's batch
        key, batch = "train.batch_size", config["train"]["batch_size"]
    processes = plan_job(config["world"]).world_size
    if batch < 1 or batch % processes:
        raise ConfigError(f"{key}={batch} must be a positive multiple of the {processes} "
                          "process(es)")
    config["eval"]["batch_size"] = batch


def check_recipe(config: dict[str, Any]) -> None:
    """The training recipe's values that no type check catches."""
    train, processes = config["train"], plan_job(config["world"]).world_size
    micro_steps = processes * train["accumulate_steps"]
    if train["batch_size"] % micro_steps:
        raise ConfigError(f"train.batch_size={train['batch_size']} does not split into "
                          f"{processes} process(es) x train.accumulate_steps="
                          f"{train['accumulate_steps']}; use a multiple of {micro_steps}")
    if not 0.0 <= train["label_smoothing"] < 1.0:
        raise ConfigError(f"train.label_smoothing={train['label_smoothing']} must be in [0, 1)")
    if train["clip_grad_norm"] is not None and not train["clip_grad_norm"] > 0:
        raise ConfigError(f"train.clip_grad_norm={train['clip_grad_norm']} must be positive "
                          "(null: no clipping)")
    for key in ("weight_decay", "norm_weight_decay", "bias_weight_decay"):
        if (config["optim"][key] or 0.0) < 0:
            raise ConfigError(f"optim.{key}={config['optim'][key]} must not be negative")
    check_schedule(config["sched"])
    check_mixing(config["dataset"])
    check_ema(config["ema"])


def check_requeues(train: dict[str, Any]) -> None:
    """A job that keeps dying would otherwise be requeued by its scheduler for ever."""
    requeues, limit = requeue_count(), int(train["max_requeues"])
    if requeues > limit:
        raise ConfigError(f"this job has been requeued {requeues} times, more than "
                          f"train.max_requeues={limit}; it stops here (look at train.log for why "
                          "it keeps ending, or raise train.max_requeues)")


def check_directory(config: dict[str, Any], output_dir: str) -> None:
    """A run directory belongs to the mode that made it: an eval never replaces a training run's
    results.json, nor a training run an eval's."""
    previous = read_results(Path(output_dir) / RESULTS)
    if previous and previous.get("mode", "train") != config["mode"]:
        raise ConfigError(f"{output_dir} holds a mode={previous.get('mode', 'train')} run; "
                          f"mode={config['mode']} writes its own results, in a new directory "
                          "(leave hydra.run.dir out)")


def warn_about(config: dict[str, Any]) -> None:
    """Settings that work but are probably not what was meant."""
    warmup, epochs = config["sched"]["warmup_epochs"], config["train"]["epochs"]
    if config["mode"] == "train" and warmup >= epochs:
        log.warning("warning: sched.warmup_epochs=%s is not shorter than train.epochs=%s: the lr "
                    "never reaches optim.lr=%s", warmup, epochs, config["optim"]["lr"])
    processes, cores = int(config["world"]["nproc_per_node"]), cpu_cores()
    if (config["device"]["resolved"] == "cpu" and processes > cores
            and not started_by_torchrun()):
        log.warning("warning: %d processes on %d CPU cores are oversubscribed: each imports torch "
                    "and trains on a share of a core, so they start slowly (minutes) and train "
                    "slower than world.nproc_per_node=%d would", processes, cores, cores)


def announce_launch(config: dict[str, Any]) -> None:
    """Ranks take seconds each to start (each imports torch, then all rendezvous): a line says
    what is starting before that silence."""
    world = config["world"]
    if plan_job(world).launches_ranks:
        node = (f" on node {world['node_rank']} of {world['nnodes']}"
                if int(world["nnodes"]) > 1 else "")
        follows = "the start summary" if config["mode"] == "train" else "rank 0's output"
        log.info("starting %s processes%s (%s); %s follows once all have joined",
                 world["nproc_per_node"], node, world["start_method"], follows)


def _console() -> None:
    """This process's lines (warn_about's) print as the workers' do, `warning: ...`, not under the
    `[date][HYDRA]` prefix of the root logger that Hydra sets up."""
    if not log.handlers:
        from imgtrain.logger import setup_logging
        setup_logging(None, is_main=True)


def run(cfg: DictConfig, output_dir: str, overrides: list[str], multirun: bool) -> float | None:
    """Run one job; return its best Acc@1 (what Optuna maximises)."""
    started = time.time()
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=False)  # for failure records
    _console()
    try:
        config = resolve(cfg, overrides)
        check(config)
        check_directory(config, output_dir)
        warn_about(config)
        announce_launch(config)
        config["run_dir_reason"] = rundir.reason(output_dir)  # for the start summary
        config["resume_hint"] = _resume_hint(config, output_dir, multirun)
        with rundir.hold(output_dir) if config["mode"] == "train" else contextlib.nullcontext():
            results = launch(_worker_entry(), config, output_dir, plan_job(config["world"]))
    except ConfigError as exc:
        return _fail(config, output_dir, one_line(str(exc)), started, multirun)
    except Preempted as exc:  # the elastic agent caught the signal; its workers have stopped
        _stopped(config, output_dir, exc.signal, started)
    except KeyboardInterrupt:  # Ctrl-C before a worker's handlers were in place
        _stopped(config, output_dir, preemption.CTRL_C, started)
    except WorkerFailed as exc:
        stopped = _stop_reported(output_dir, started)
        if stopped:  # ranks stopped by a signal the agent did not get (sent to them alone)
            _exit(config, stopped["status"], stopped["exit_code"])
        if not exc.user_error and exc.traceback:  # a bug in a worker: show where
            sys.stderr.write(exc.traceback.rstrip() + "\n")
        return _fail(config, output_dir, str(exc), started, multirun)
    except Exception as exc:  # a bug or a crash: keep its traceback, but record the failure first
        _record(config, output_dir, f"{type(exc).__name__}: {one_line(str(exc))}", started)
        raise
    if results is not None and results.get("status") in preemption.STOPPED:
        _exit(config, results["status"], results["exit_code"])  # rank 0 said where it stopped
    return None if results is None else results.get("best_acc1")


def _resume_hint(config: dict[str, Any], output_dir: str, multirun: bool) -> str:
    """What a stopped run's last line says: the same command finds its unfinished run
    (rundir.py), except a sweep's, which its folder alone names (with the job's overrides)."""
    if not config["train"]["save_checkpoints"]:
        return "nothing to resume from"
    if multirun:
        return f"to resume this job: python run.py hydra.run.dir={output_dir}"
    return f"to resume, run the same command again (or python run.py hydra.run.dir={output_dir})"


def _stop_reported(output_dir: str, started: float) -> dict[str, Any] | None:
    """results.json as rank 0 left it after a stop in this command, else None."""
    path = Path(output_dir) / RESULTS
    previous = read_results(path)
    if previous and previous.get("status") in preemption.STOPPED and \
            path.stat().st_mtime >= started:
        return previous
    return None


def _stopped(config: dict[str, Any], output_dir: str, sig: int | None, started: float) -> None:
    """Exit after a stop signal. Rank 0 reports a stop during training; one before it (setup,
    or a mode that does not train) has nothing to resume, and leaves nothing it started."""
    status, code = preemption.outcome(sig, config.get("train", {}).get("preempt_exit_code", 143))
    if not _stop_reported(output_dir, started):
        records.discard_startup(output_dir, started, keep_error_record=False)
        when = "before training started" if config.get("mode") == "train" \
            else f"(mode={config.get('mode')})"
        kept = (Path(output_dir) / "checkpoints" / "last.pt").is_file()  # a resumed run's
        after = config.get("resume_hint", "its checkpoint is kept") if kept else "nothing to resume"
        sys.stderr.write(f"{status} by {preemption.name(sig)} {when}; {after} (exit code {code})\n")
    _exit(config, status, code)


def _exit(config: dict[str, Any], status: str, code: int) -> None:
    """A preempted SLURM job goes back in the queue first, to run again and resume."""
    if status == "preempted":
        requeued = requeue_self(int(config.get("train", {}).get("max_requeues", 10)))
        if requeued:
            sys.stderr.write(requeued + "\n")
    sys.exit(code)


def _worker_entry() -> Any:
    from imgtrain.worker import worker
    return worker


def _record(config: dict[str, Any], output_dir: str, error: str, started: float) -> None:
    try:
        record_failure(Path(output_dir), config, error, since=started)
    except (OSError, KeyError, TypeError):
        pass  # never mask the original error with a bookkeeping one


def _fail(config: dict[str, Any], output_dir: str, error: str, started: float,
          multirun: bool) -> None:
    """Report a user error. A sweep job keeps an error record; a single run that changed nothing
    leaves nothing behind."""
    if not records.discard_startup(output_dir, started, keep_error_record=multirun):
        _record(config, output_dir, error, started)
    if multirun:
        job = " ".join(config.get("overrides") or []) or "defaults"
        raise JobFailed(f"error: {error} (sweep job: {job})")  # run.py drops Hydra's framing
    sys.stderr.write(f"error: {error}\n")
    sys.exit(1)
