"""imgtrain's command line: python run.py [group=option ...] [key=value ...] [-m for sweeps]."""
import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from imgtrain.errors import run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Imported here: torch and torchvision take seconds to import, which --help, --cfg and a
    # config Hydra refuses do not need.
    from imgtrain.app import run

    hydra_cfg = HydraConfig.get()
    return run(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task),
               multirun=hydra_cfg.mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    run_main(main)  # user errors, Hydra's included, as one `error:` line
