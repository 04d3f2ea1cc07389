"""One Trainer: train_epoch, evaluate and fit. Device, world, precision and logger are handed in."""
from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from imgtrain import checkpoint
from imgtrain.checkpointing import Checkpointing, TrainState
from imgtrain.data import Loaders
from imgtrain.data.mixing import build_batch_mix, dominant_label
from imgtrain.data.transforms import Normalizer
from imgtrain.device import DeviceInfo
from imgtrain.distributed import World
from imgtrain.ema import WeightAverage
from imgtrain.errors import Preempted
from imgtrain.logger import RunLogger, epoch_scalars
from imgtrain.precision import Precision, bare_model
from imgtrain.preemption import StopSignals
from imgtrain.profiling import build_profiler
from imgtrain.progress import Progress
from imgtrain.results import run_results
from imgtrain.throughput import Throughput


def epoch_steps(loaders: Loaders, cap: int | None) -> int:
    """Optimizer steps per epoch: the loader's batches over train.accumulate_steps, capped by
    train.steps_per_epoch if set."""
    if loaders.train is None:  # mode=eval reads no training data
        return 0
    steps = len(loaders.train) // loaders.accumulate_steps
    return min(steps, cap) if cap else steps


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


class Trainer(Checkpointing):
    """Training, evaluation and the epoch loop; what a checkpoint holds and when one is written
    come from Checkpointing (checkpointing.py)."""

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 precision: Precision, loaders: Loaders, device: DeviceInfo, world: World,
                 logger: RunLogger, cfg: dict[str, Any], output_dir: Path,
                 channels_last: bool, eval_model: nn.Module | None = None,
                 ema: WeightAverage | None = None,
                 stop_signals: StopSignals | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        # Evaluation runs the module without its DDP wrapper: DDP's forward broadcasts buffers, a
        # collective that a rank with no validation batch would never join.
        self.eval_model = eval_model if eval_model is not None else bare_model(model)
        self.precision, self.loaders, self.device, self.world = precision, loaders, device, world
        self.logger, self.cfg, self.train_cfg = logger, cfg, cfg["train"]
        self.checkpoints = checkpoint.CheckpointWriter(output_dir / "checkpoints", cfg["train"])
        self.state = TrainState()
        self.normalize = Normalizer(device.torch_device, channels_last)
        self.batch_mix = build_batch_mix(cfg["dataset"], loaders.num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.train_cfg["label_smoothing"])
        self.ema = ema
        self.global_batch = loaders.per_rank_batch * world.world_size
        self.steps_per_epoch = epoch_steps(loaders, self.train_cfg["steps_per_epoch"])
        # Installed by the worker from its start, so that a signal during setup is not lost.
        self.stop_signals = stop_signals if stop_signals is not None else StopSignals()
        self.resumed: dict[str, int] | None = None  # where a resume started: epoch, step, restart
        self.progress = Progress.for_trainer(self)  # rank 0's console; does nothing elsewhere
        self.profiler = build_profiler(self.train_cfg, output_dir, device, world)

    # ---- training -------------------------------------------------------------------------
    def _train_step(self, micro_batches: tuple[tuple[torch.Tensor, torch.Tensor], ...],
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
        overflowed = self.precision.step(self.optimizer, self.train_cfg["clip_grad_norm"])
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
        sampler = self.loaders.train_sampler
        sampler.set_epoch(epoch)
        first_step = self.state.step_in_epoch
        # The steps already trained are not read, not decoded; this run's layout of the epoch's
        # micro-batches is recorded, for a resume on another number of processes.
        sampler.resume_at(first_step, self.state.epoch_layout)
        self.state.epoch_layout = [*map(list, sampler.earlier_layouts),
                                   [first_step, sampler.micro_batches_per_step]]
        micro_steps = self.loaders.accumulate_steps
        # Loss sum over the steps applied with a finite loss, correct, samples behind that loss
        # sum: a step skipped for an fp16 overflow is left out of the epoch's loss.
        sums = torch.zeros(3, device=self.device.torch_device)
        window = torch.zeros(3, device=self.device.torch_device)
        throughput = Throughput(self.device, self.train_cfg["fps_warmup_steps"], self.global_batch)
        data_time, epoch_start = 0.0, time.perf_counter()
        window_start, end, window_steps = epoch_start, epoch_start, 0
        step = first_step
        self.progress.start_epoch(epoch, first_step)
        # islice, not a break: a capped epoch must not decode one batch more than it trains on.
        batches = itertools.islice(self.loaders.train,
                                   max(0, self.steps_per_epoch - first_step) * micro_steps)
        for step, micro_batches in enumerate(_grouped(batches, micro_steps), start=first_step):
            data_time += time.perf_counter() - end
            self._fault_injection(step)
            if self.state.global_step == 0 and self.train_cfg["log_images"]:
                # once per run, when asked for: what the network sees (host memory)
                self.logger.batch_grid(micro_batches[0][0], self.state.global_step)
            loss, correct, overflowed = self._train_step(micro_batches, epoch)
            counted = loss.isfinite() if overflowed is None else loss.isfinite() & (overflowed == 0)
            # A host number: multiplying by it needs no device copy.
            samples = sum(target.shape[0] for _, target in micro_batches)
            batch = torch.stack([torch.where(counted, loss, 0.0) * samples, correct.float(),
                                 counted.float() * samples])
            sums += batch
            window += batch
            window_steps += 1
            throughput.step()
            self.profiler.step()
            self.state.step_in_epoch, self.state.global_step = step + 1, self.state.global_step + 1
            if (step + 1) % self.train_cfg["print_freq"] == 0:
                self._log_progress(epoch, step + 1, window, window_steps,
                                   time.perf_counter() - window_start,
                                   data_time / (step + 1 - first_step))
                window.zero_()
                window_start, window_steps = time.perf_counter(), 0
            throughput.exclude(self._maybe_checkpoint_mid_epoch(step + 1))
            end = time.perf_counter()
        steps_run = max(1, step + 1 - first_step)
        if window_steps:  # the epoch's last few steps
            self._log_progress(epoch, self.state.step_in_epoch, window, window_steps,
                               time.perf_counter() - window_start, data_time / steps_run)
        images_timed, seconds_timed = throughput.finish(epoch_start)
        self.state.timed_images += images_timed
        self.state.timed_seconds += seconds_timed
        self.state.train_seconds += time.perf_counter() - epoch_start
        loss_sum, correct, finite_samples = self.world.sum(sums).tolist()
        samples = steps_run * self.global_batch
        self._check_finite(f"epoch {epoch + 1}")
        return {"loss": loss_sum / finite_samples if finite_samples else float("nan"),
                "acc1": 100.0 * correct / samples,
                "images_per_sec": images_timed / max(seconds_timed, 1e-9),
                "data_time": data_time / steps_run}

    def _log_progress(self, epoch: int, step: int, window: torch.Tensor, window_steps: int,
                      seconds: float, data_time: float) -> None:
        """One console line and TensorBoard points for the steps since the last print point."""
        loss_sum, correct, finite_samples = window.tolist()  # the one host sync per print point
        samples = window_steps * self.loaders.per_rank_batch
        images_per_sec = samples * self.world.world_size / max(seconds, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        loss = loss_sum / finite_samples if finite_samples else float("nan")
        acc1 = 100.0 * correct / max(samples, 1)
        # Tags named for TensorBoard's first screen: logger.py says why.
        values = {"train/loss": loss, "accuracy/train_acc1": acc1,
                  "throughput/images_per_sec": images_per_sec, "train/lr": lr,
                  "throughput/loader_wait_seconds": data_time}
        values.update(self.progress.train_update(epoch, step, values, seconds, data_time))
        if self.precision.loss_scale is not None:
            values["train/loss_scale"] = float(self.precision.loss_scale.item())
        self.logger.scalars(self.state.global_step, values)

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Loss, Acc@1 and Acc@5 of `model` (the one trained) over the whole validation set, each
        sample counted exactly once."""
        model = self.eval_model if model is None else model
        model.eval()
        self._sync_buffers()
        sums = torch.zeros(3, device=self.device.torch_device)  # loss sum, top1, top5
        samples = 0
        self.progress.start_val()
        for batch, (images, target) in enumerate(self.loaders.val, start=1):
            images, target = self._to_device(images, target)
            with self.precision.autocast():
                output = model(self.normalize(images)).float()
            k = min(5, output.shape[1])
            hits = output.topk(k, dim=1).indices == target[:, None]
            sums += torch.stack([nn.functional.cross_entropy(output, target, reduction="sum"),
                                 hits[:, 0].sum().float(), hits.any(dim=1).sum().float()])
            samples += target.shape[0]
            self.progress.val_update(batch)  # a host counter; the display decides when to redraw
        totals = torch.cat([sums, torch.full((1,), float(samples), device=sums.device)])
        loss_sum, top1, top5, count = self.world.sum(totals).tolist()
        self.progress.end_val()
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "acc1": 100.0 * top1 / count,
                "acc5": 100.0 * top5 / count, "samples": int(count)}

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train the remaining epochs, evaluating and checkpointing after each; return the last
        metrics. A stop signal is acted on at an agreed step, or else at the epoch's end."""
        epochs = self.train_cfg["epochs"]
        val: dict[str, float] = self.state.history[-1] if self.state.history else {}
        with self.stop_signals, self.profiler, self.progress:
            for epoch in range(self.state.epoch, epochs):
                train = self.train_epoch(epoch)
                val = self.evaluate()
                if self.ema is not None:
                    val.update({f"ema_{key}": value for key, value in
                                self.evaluate(self.ema.module).items() if key != "samples"})
                self._end_epoch(epoch, train, val)
                if epoch + 1 < epochs and self.world.any(self.stop_signals.requested,
                                                         self.device.torch_device):
                    raise Preempted(f"at the end of epoch {epoch + 1}; {self._saved_or_not()}")
        return val

    def _end_epoch(self, epoch: int, train: dict[str, float], val: dict[str, float]) -> None:
        is_best = val["acc1"] > self.state.best_acc1 or not self.state.history
        self.state.best_acc1 = max(self.state.best_acc1, val["acc1"])
        self.state.best_ema_acc1 = max(self.state.best_ema_acc1, val.get("ema_acc1", 0.0))
        self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        ema = {key: val[key] for key in ("ema_acc1", "ema_acc5", "ema_loss") if key in val}
        self.state.history.append({"epoch": epoch + 1, "acc1": val["acc1"], "acc5": val["acc5"],
                                   "loss": val["loss"], "samples": val["samples"],
                                   "train_loss": train["loss"],
                                   "images_per_sec": train["images_per_sec"], **ema})
        self.logger.info("epoch %d done: train loss %.4f acc1 %.2f | val loss %.4f acc1 %.3f acc5 "
                         "%.3f (%d images)%s | %.1f img/s", epoch + 1, train["loss"], train["acc1"],
                         val["loss"], val["acc1"], val["acc5"], val["samples"],
                         f" | ema acc1 {ema['ema_acc1']:.3f} acc5 {ema['ema_acc5']:.3f}"
                         if ema else "", train["images_per_sec"])
        self.logger.scalars(self.state.global_step, epoch_scalars(epoch, train, val))
        self.save_checkpoint(f"epoch-{epoch + 1}.pt", best=is_best)
        self.logger.results({**run_results(self.cfg, self), "status": "running"})
        self.logger.flush()
