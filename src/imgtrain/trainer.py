"""One Trainer: train_epoch, evaluate and fit, and what a checkpoint holds. The plan, device,
world, precision and logger are handed in; when a checkpoint is written is checkpoint_policy.py's,
an epoch's bookkeeping meter.py's."""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from imgtrain import checkpoint_files
from imgtrain.checkpoint_policy import CheckpointManager, log_resume_changes
from imgtrain.data import Loaders
from imgtrain.data.mixing import build_batch_mix, dominant_label
from imgtrain.data.transforms import Normalizer
from imgtrain.device import DeviceInfo
from imgtrain.distributed import World
from imgtrain.ema import WeightAverage
from imgtrain.errors import Preempted
from imgtrain.faults import injected_fault
from imgtrain.logger import RunLogger, epoch_scalars
from imgtrain.meter import EpochMeter, val_sums
from imgtrain.model_checks import check_finite, sync_buffers
from imgtrain.optim import group_weight_decay, load_optimizer_state
from imgtrain.plan import RunPlan
from imgtrain.masters import bare_model
from imgtrain.precision import Precision
from imgtrain.preemption import StopSignals
from imgtrain.profiling import build_profiler
from imgtrain.progress import Progress
from imgtrain.results import run_results
from imgtrain.summary import epoch_done_line
from imgtrain.train_state import TrainState

log = logging.getLogger("imgtrain")
Batch = tuple[torch.Tensor, torch.Tensor]


def _grouped(batches: Iterator[Any], size: int) -> Iterator[tuple[Any, ...]]:
    """Consecutive micro-batches, `size` at a time (one optimizer step's worth)."""
    return zip(*[iter(batches)] * size)


def _gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync for the micro-steps before an optimizer step's last: their gradients only
    accumulate locally, and the last backward all-reduces the sum once."""
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    if sync or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


class Trainer:
    """Training, evaluation and the epoch loop for one rank."""

    def __init__(self, plan: RunPlan, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, precision: Precision, loaders: Loaders, device: DeviceInfo,
                 world: World, logger: RunLogger, output_dir: Path, steps_per_epoch: int,
                 eval_model: nn.Module | None = None, ema: WeightAverage | None = None,
                 stop_signals: StopSignals | None = None) -> None:
        """`scheduler`: built at the step training starts from (a resume's global step);
        `steps_per_epoch`: plan.batches.steps_per_epoch of the training loader (0: mode=eval)."""
        self.plan, self.steps_per_epoch = plan, steps_per_epoch
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        # Evaluation runs the module without its DDP wrapper: DDP's forward broadcasts buffers, a
        # collective that a rank with no validation batch would never join.
        self.eval_model = eval_model if eval_model is not None else bare_model(model)
        self.precision, self.loaders, self.device, self.world = precision, loaders, device, world
        self.logger, self.ema = logger, ema
        self.state = TrainState()
        self.normalize = Normalizer(device.torch_device, plan.channels_last)
        self.batch_mix = build_batch_mix(plan.dataset, plan.num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=plan.train.label_smoothing)
        # Installed by the worker from its start, so that a signal during setup is not lost.
        self.stop_signals = stop_signals if stop_signals is not None else StopSignals()
        self.checkpoints = CheckpointManager(plan.train, output_dir / "checkpoints", world=world,
                                             device=device, stop_signals=self.stop_signals,
                                             steps_per_epoch=steps_per_epoch)
        self.fault = injected_fault(plan.train, world.rank)  # test-only; None in real runs
        self.resumed: dict[str, int] | None = None  # where a resume started: epoch, step, restart
        self.resumed_from: Path | None = None       # ... and from which checkpoint
        self.trained_size: int | None = None        # the last epoch's crop in this process
        self.progress = Progress.for_trainer(self)  # rank 0's console; does nothing elsewhere
        self.profiler = build_profiler(plan.train, output_dir, device, world)

    # ---- training -------------------------------------------------------------------------
    def _train_step(self, micro_batches: tuple[Batch, ...],
                    epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step over its micro-batches; the mean loss, the correct count and the
        loss scaler's verdict (see Precision.step), all on the device."""
        self.precision.zero_grad(self.model, self.optimizer)
        loss_sum, correct = 0.0, 0
        for i, (images, target) in enumerate(micro_batches):
            with _gradient_sync(self.model, sync=i == len(micro_batches) - 1):
                loss, hits = self._forward_backward(*self._to_device(images, target),
                                                    len(micro_batches))
            loss_sum, correct = loss_sum + loss, correct + hits
        overflowed = self.precision.step(self.optimizer, self.plan.train.clip_grad_norm)
        self.scheduler.step()
        if self.ema is not None and self.ema.due(self.state.global_step + 1):
            self.ema.update(epoch, self.precision.master_params(self.model),
                            bare_model(self.model).buffers())
        return loss_sum / len(micro_batches), correct, overflowed

    def _forward_backward(self, images: torch.Tensor, target: torch.Tensor,
                          micro_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.normalize(images)
        if self.batch_mix is not None:  # soft targets; accuracy counts the dominant label
            images, target = self.batch_mix(images, target)
        with self.precision.autocast():
            output = self.model(images)
            loss = self.criterion(output.float(), target)
        # Each micro-step's gradient is its share of the step's mean loss.
        self.precision.backward(loss / micro_steps)
        return loss.detach(), (output.argmax(1) == dominant_label(target)).sum()

    def _to_device(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.device.copy_in(images), self.device.copy_in(target)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch, from the step a resumed checkpoint stopped at; return its metrics."""
        self.model.train()
        first_step = self._start_sampler(epoch)
        image_size = self.plan.train_size(epoch)
        self._say_image_size(epoch, image_size)
        meter = EpochMeter(self.device, self.plan.batches, self.plan.train)
        self.progress.start_epoch(epoch, first_step)
        for step, micro_batches in self._steps(first_step):
            meter.batch_arrived()
            if self.state.global_step == 0 and self.plan.train.log_images:
                # once per run, when asked for: what the network sees (host memory)
                self.logger.batch_grid(micro_batches[0][0], self.state.global_step)
            meter.add_step(*self._train_step(micro_batches, epoch),
                           samples=sum(target.shape[0] for _, target in micro_batches))
            self.profiler.step()
            self.state.step_in_epoch, self.state.global_step = step + 1, self.state.global_step + 1
            if meter.print_point(step + 1):
                self._log_progress(epoch, step + 1, meter)
                meter.next_window()
            # a checkpoint's seconds are not training's
            meter.end_step(self.checkpoints.after_step(step + 1, self.state, self.save_checkpoint))
        if meter.window_steps:  # the epoch's last few steps
            self._log_progress(epoch, self.state.step_in_epoch, meter)
        self.state.add_time(*meter.stop(), image_size=image_size)
        metrics = {**meter.totals(self.world), "image_size": image_size}
        self._check_finite(f"epoch {epoch + 1}")
        return metrics

    def _say_image_size(self, epoch: int, image_size: int) -> None:
        """Under dataset.res_schedule, a line when this process starts training or the size
        changes; the `epoch N done` line names every epoch's size."""
        if self.plan.scheduled_sizes and image_size != self.trained_size:
            self.logger.info("epoch %d: training at %d px (dataset.res_schedule)", epoch + 1,
                             image_size)
        self.trained_size = image_size

    def _start_sampler(self, epoch: int) -> int:
        """Set the sampler at the epoch and the step it resumes from; return that step."""
        sampler, first_step = self.loaders.train_sampler, self.state.step_in_epoch
        sampler.set_epoch(epoch)
        # The steps already trained are not read, not decoded; this run's layout of the epoch's
        # micro-batches is recorded, for a resume on another number of processes.
        sampler.resume_at(first_step, self.state.epoch_layout)
        self.state.epoch_layout = [*map(list, sampler.earlier_layouts),
                                   [first_step, sampler.micro_batches_per_step]]
        return first_step

    def _steps(self, first_step: int) -> Iterator[tuple[int, tuple[Batch, ...]]]:
        """(step, its micro-batches) for the epoch's steps from `first_step` on."""
        micro_steps = self.plan.batches.accumulate_steps
        # islice, not a break: a capped epoch must not decode one batch more than it trains on.
        batches = itertools.islice(self.loaders.train,
                                   max(0, self.steps_per_epoch - first_step) * micro_steps)
        steps = enumerate(_grouped(batches, micro_steps), start=first_step)
        return steps if self.fault is None else self.fault.watch(steps, self.state)

    def _log_progress(self, epoch: int, step: int, meter: EpochMeter) -> None:
        """One console line and TensorBoard points for the steps since the last print point."""
        values, seconds = meter.read_window()  # the one host sync per print point
        data_time = meter.data_time_per_step
        # Tags named for TensorBoard's first screen: logger.py says why.
        values.update({"train/lr": self.optimizer.param_groups[0]["lr"],
                       "throughput/loader_wait_seconds": data_time})
        values.update(self.progress.train_update(epoch, step, values, seconds, data_time))
        if self.precision.loss_scale is not None:
            values["train/loss_scale"] = float(self.precision.loss_scale.item())
        self.logger.scalars(self.state.global_step, values)

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self, model: nn.Module | None = None,
                 loader: Iterable[Any] | None = None) -> dict[str, float]:
        """Loss, Acc@1 and Acc@5 of `model` (the one trained) over the whole validation set
        (`loader`'s: another test size's, eval_sweep.py), each sample counted exactly once."""
        return self.evaluate_models([self.eval_model if model is None else model], loader)[0]

    def validate(self) -> dict[str, float]:
        """The epoch's validation: the trained model's metrics, and with an EMA the average's
        as ema_loss, ema_acc1 and ema_acc5, from one pass over the validation set."""
        models = [self.eval_model, *([self.ema.module] if self.ema is not None else [])]
        val, *averaged = self.evaluate_models(models)
        for ema in averaged:
            val.update({f"ema_{key}": value for key, value in ema.items() if key != "samples"})
        return val

    @torch.no_grad()
    def evaluate_models(self, models: list[nn.Module],
                        loader: Iterable[Any] | None = None) -> list[dict[str, float]]:
        """Each model's metrics over the validation set (`loader`'s, default the run's), in one
        pass: a batch is read, decoded and copied to the device once and evaluated by every model
        in turn. Each model's sums are added in the same order as a pass of its own would add
        them (the same numbers), and all are summed over the ranks in one collective."""
        loader = self.loaders.val if loader is None else loader
        for model in models:
            model.eval()
        self._sync_buffers()
        # per model: loss sum, top1, top5
        sums = torch.zeros(len(models), 3, device=self.device.torch_device)
        samples = 0
        self.progress.start_val()
        for batch, (images, target) in enumerate(loader, start=1):
            images, target = self._to_device(images, target)
            images = self.normalize(images)
            for row, model in enumerate(models):
                with self.precision.autocast():
                    output = model(images).float()
                sums[row] += val_sums(output, target)
            samples += target.shape[0]
            self.progress.val_update(batch)  # a host counter; the display decides when to redraw
        totals = torch.cat([sums.flatten(), torch.full((1,), float(samples), device=sums.device)])
        *model_sums, count = self.world.sum(totals).tolist()
        self.progress.end_val()
        count = max(count, 1.0)
        return [{"loss": loss_sum / count, "acc1": 100.0 * top1 / count,
                 "acc5": 100.0 * top5 / count, "samples": int(count)}
                for loss_sum, top1, top5 in zip(*[iter(model_sums)] * 3)]

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train the remaining epochs, evaluating and checkpointing after each; return the last
        metrics. A stop signal is acted on at an agreed step, or else at the epoch's end."""
        epochs = self.plan.train.epochs
        val: dict[str, float] = self.state.history[-1] if self.state.history else {}
        with self.stop_signals, self.profiler, self.progress:
            for epoch in range(self.state.epoch, epochs):
                train = self.train_epoch(epoch)
                val = self.validate()  # the EMA's too, in the same pass
                self._end_epoch(epoch, train, val)
                if epoch + 1 < epochs and self.checkpoints.stop_requested():
                    raise Preempted(f"at the end of epoch {epoch + 1}; "
                                    f"{self.checkpoints.saved_or_not()}")
        return val

    def _end_epoch(self, epoch: int, train: dict[str, float], val: dict[str, float]) -> None:
        is_best = self.state.end_epoch(epoch, train, val)
        self.logger.info("%s", epoch_done_line(epoch, train, val))
        self.logger.scalars(self.state.global_step, epoch_scalars(epoch, train, val))
        self.save_checkpoint(f"epoch-{epoch + 1}.pt", best=is_best)
        self.logger.results({**run_results(self.plan, self), "status": "running"})
        self.logger.flush()

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything a resume needs; `rng_states` holds every rank's generators, by rank."""
        return {
            "format_version": checkpoint_files.FORMAT_VERSION,
            "model": self.precision.full_precision_state(self.model),
            **({"model_ema": self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "state": self.state.saved(),
            "identity": checkpoint_files.identity(self.plan),
            "class_names": self.loaders.class_names,  # for mode=predict|export
            "rng": rng_states,
            "config": self.plan.record(),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore a `state_dict()`: weights, optimizer, scale, position and this rank's RNG.

        This run's optim settings and train.epochs apply from here on (a changed lr is logged):
        the scheduler, built at the saved step with them, sets the lr, not the checkpoint.
        """
        step = saved["state"]["global_step"]
        if self.scheduler.last_epoch != step:  # a bug in the caller, not the user's doing
            raise RuntimeError(f"the scheduler starts at step {self.scheduler.last_epoch}, the "
                               f"checkpoint at {step}: build it at the checkpoint's step")
        lrs = self.scheduler.get_last_lr()
        self.precision.load_full_precision_state(self.model, saved["model"])
        load_optimizer_state(self.optimizer, saved["optimizer"])
        self.precision.load_state_dict(saved["precision"])
        if self.ema is not None and saved.get("model_ema") is not None:
            self.ema.load_state_dict(saved["model_ema"])
        elif self.ema is not None:
            log.info("resume: the checkpoint has no EMA weights; the average starts from the "
                     "resumed weights")
            self.ema.restart()
        self.state = TrainState(**saved["state"])
        self.checkpoints.restore_rng(saved["rng"])
        log_resume_changes(saved["config"], self.plan)
        optim = self.plan.optim
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group.update(lr=lr, momentum=optim.momentum, initial_lr=optim.lr,
                         weight_decay=group_weight_decay(group.get("kind", "other"), optim))

    def save_checkpoint(self, name: str, best: bool = False) -> float:
        """Every rank calls this; rank 0 writes. A model whose weights are not finite is never
        written: the run stops as diverged instead. Returns the seconds it took."""
        start = time.perf_counter()
        self._sync_buffers()
        self._check_finite(f"step {self.state.global_step}")
        self.checkpoints.save(name, self.state_dict, best)
        return time.perf_counter() - start

    def _sync_buffers(self) -> None:
        sync_buffers(self.world, [bare_model(self.model),
                                  *([self.ema.module] if self.ema is not None else [])])

    def _check_finite(self, where: str) -> None:
        check_finite(self.model, self.precision, where, self.plan.optim.lr)
