"""imgtrain's command line: python run.py [group=option ...] [key=value ...] [-m for sweeps]."""
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from imgtrain.app import run
from imgtrain.errors import config_error_line
from imgtrain.errors import one_line_job_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    return run(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task),
               multirun=hydra_cfg.mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    with one_line_job_errors():  # a failed sweep job: one `error:` line, not Hydra's framing
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's full report
            main()
        else:
            # Hydra then re-raises a bad override or config instead of printing it over several lines.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                main()
            except (HydraException, OmegaConfBaseException) as exc:
                message = config_error_line(exc)
                sys.stderr.write(message if message.startswith("error: ") else f"error: {message}")
                sys.stderr.write("\n")
                sys.exit(1)
