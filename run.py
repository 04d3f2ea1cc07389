"""imgtrain's command line: python run.py [group=option ...] [key=value ...] [-m for sweeps]."""
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from imgtrain.cli import exit_on_install_mismatch, run_main, stop_line
from imgtrain.errors import JobFailed
from imgtrain.rundir import with_recorded_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Imported here: torch and torchvision take seconds to import, which --help, --cfg and a
    # config Hydra refuses do not need.
    from imgtrain.app import run

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    outcome = run(cfg, hydra_cfg.runtime.output_dir, overrides, multirun=multirun)
    if outcome.traceback:  # a bug in a worker: show where
        sys.stderr.write(outcome.traceback.rstrip() + "\n")
    for line in outcome.stderr:  # a stop's, a requeue's
        sys.stderr.write(stop_line(line) + "\n")
    if outcome.exit_at_once:  # a SLURM task whose step is being ended (app.Outcome)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(outcome.exit_code)
    if outcome.error is not None and multirun:  # Hydra runs the sweep's other jobs
        raise JobFailed(f"error: {outcome.error} (sweep job: {' '.join(overrides) or 'defaults'})")
    if outcome.error is not None:
        sys.stderr.write(f"error: {outcome.error}\n")
    if outcome.exit_code:
        sys.exit(outcome.exit_code)
    return outcome.best_acc1


if __name__ == "__main__":
    exit_on_install_mismatch()  # before anything imports torchvision or makes a folder
    # hydra.run.dir=<run> alone resumes that run as it was made: its recorded overrides first.
    sys.argv[1:], note = with_recorded_overrides(sys.argv[1:])
    if note and not any(arg.startswith("-") for arg in sys.argv[1:]):  # not --help, --cfg ...
        print(note, flush=True)
    run_main(main)  # user errors, Hydra's included, as one `error:` line
