"""hydra/launcher=slurm: hydra-submitit-launcher's SLURM launcher, with each job's request made
from its `world` (imgtrain.slurm.request) and a wait that reports a job that failed, was
cancelled or died as failed as soon as SLURM says so, while the other jobs run on.

Hydra only instantiates launchers from the `hydra_plugins` package, hence this module's place.
"""
from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.errors import CompactHydraException
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.imgtrain_slurm import job_report

try:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # not installed (the `launchers` extra): no hydra/launcher=slurm then, and
    SlurmLauncher = object  # no warning from Hydra's plugin scan, which imports this module

log = logging.getLogger(__name__)
POLL_S = 1.0
# How often SLURM is asked for the jobs' states (submitit's own watcher waits up to 10 min).
STATE_REFRESH_S = 10
# How long a finished job's result file may take to appear (shared file systems lag).
RESULT_WAIT_S = 5


class ImgtrainSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"SLURM sweep output dir: {sweep_dir}")
        watcher = _state_watcher(STATE_REFRESH_S)
        jobs = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                         list(overrides))
            job = self._submit(job_cfg, list(overrides), idx, [job.job_id for job in jobs])
            for each in (job, *job._sub_jobs):  # a job of several tasks waits on each task
                each.watcher, each._results_timeout_s = watcher, RESULT_WAIT_S
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} "
                     f"(SLURM job {job.job_id})")
            jobs.append(job)
        returns = _wait(jobs, job_overrides, sweep_dir)
        table = job_report.sweep_table([run for run in (_run_dir(sweep_dir, job)
                                                        for job in jobs) if run])
        if table:
            log.info("the sweep's runs:\n%s", table)
        return returns

    def _submit(self, job_cfg: Any, overrides: list[str], idx: int, submitted: list[str]) -> Any:
        from submitit.core.utils import FailedJobError

        try:  # submitit prints sbatch's complaint in full as well: the error line says it
            with contextlib.redirect_stderr(io.StringIO()):
                return self.executor(job_cfg).submit(self, overrides, "hydra.sweep.dir", idx,
                                                     f"job_id_for_{idx}", Singleton.get_state())
        except (FailedJobError, OSError) as exc:  # sbatch refused the job, or is not there
            lines = [line for line in str(exc).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else type(exc).__name__
            running = (f"; jobs {', '.join(submitted)} were submitted and run on (scancel them "
                       "to stop)") if submitted else ""
            raise SubmitFailed(f"error: SLURM did not take sweep job {idx}: {reason}"
                               f"{running}") from None

    def executor(self, job_cfg: Any) -> Any:
        """A submitit executor set up with hydra.launcher's settings and what the job's world
        needs (imgtrain.slurm.request)."""
        import submitit

        from imgtrain import slurm

        params = dict(self.params)
        executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        params = {key if key in generic else f"slurm_{key}": value
                  for key, value in params.items()}
        if job_cfg.device.name == "auto":  # resolved here, on the login node: not the job's
            log.warning("warning: device=auto: hydra/launcher=slurm asks for no GPU or NPU; "
                        "set device=gpu or device=npu")
        executor.update_parameters(**_with_request(
            params, slurm.request(job_cfg.world, job_cfg.device.name)))
        return executor


class SubmitFailed(CompactHydraException):
    """sbatch refused a job (a bad partition, no such resource, no SLURM here): one line."""


def _with_request(params: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """The launcher's settings with `world`'s request: its node and task counts always; its
    devices unless hydra.launcher.gpus_per_node or gres says otherwise."""
    merged = dict(params)
    for key, value in request.items():
        name = key if key in ("nodes", "tasks_per_node", "gpus_per_node") else f"slurm_{key}"
        if key in ("nodes", "tasks_per_node") or merged.get(name) is None:
            merged[name] = value
    return merged


def _wait(jobs: list[Any], job_overrides: Sequence[Sequence[str]],
          sweep_dir: Path) -> list[JobReturn]:
    """Every job's return, in order; as each job ends, one line says how (a job that ends
    without a return is logged at once as failed)."""
    returns: dict[int, JobReturn] = {}
    while len(returns) < len(jobs):
        for index, job in enumerate(jobs):
            if index not in returns and job.done():
                returns[index] = _outcome(job, list(job_overrides[index]))
                log.info(_ended_line(job, returns[index], sweep_dir))
        time.sleep(POLL_S)
    return [returns[index] for index in range(len(jobs))]


def _run_dir(sweep_dir: Path, job: Any) -> Path | None:
    found = job_report.run_of(sweep_dir, job.job_id)
    return found[0] if found else None


def _ended_line(job: Any, returned: JobReturn, sweep_dir: Path) -> str:
    found = job_report.run_of(sweep_dir, job.job_id)
    error = None
    if returned.status == JobStatus.FAILED:
        error = str(returned._return_value).removesuffix(
            f" (sweep job: {' '.join(returned.overrides or []) or 'defaults'})")
        if "without a result" in error:  # _outcome's line, logged already: its gist
            error = f"it ended {job.state} without a result"
    return job_report.job_line(job.job_id, str(job.state), found[1] if found else None, error,
                               job.paths.stdout)


def _outcome(job: Any, overrides: list[str]) -> JobReturn:
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.results()[0]
    except (UncompletedJobError, FailedJobError):
        from imgtrain.errors import JobFailed

        sweep_job = " ".join(overrides) or "defaults"
        error = (f"error: SLURM job {job.job_id} ended {job.state} without a result "
                 f"(sweep job: {sweep_job}); its log: {job.paths.stderr}")
        log.error(error)
        return JobReturn(overrides=overrides, status=JobStatus.FAILED,
                         _return_value=JobFailed(error))


def _state_watcher(delay_s: int) -> Any:
    """submitit's SLURM state watcher, refreshed every `delay_s`, that reads the states from
    `scontrol` when `sacct` fails (a cluster without an accounting database): submitit alone
    would then see UNKNOWN, a state it waits on, for ever."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    from imgtrain import slurm

    class Watcher(SlurmInfoWatcher):
        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            try:
                output = subprocess.run(command, capture_output=True, check=True,
                                        timeout=60).stdout
                self._info_dict.update(self.read_info(output))
            except (OSError, subprocess.SubprocessError):
                job_ids = sorted({job.split("_")[0] for job in self._registered - self._finished})
                self._info_dict.update(slurm.job_states(job_ids))
            self._last_status_check = time.time()

    return Watcher(delay_s=delay_s)
