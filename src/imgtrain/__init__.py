"""imgtrain: Hydra-configured ResNet training on Ascend NPUs, NVIDIA GPUs and CPUs."""
from omegaconf import OmegaConf

from imgtrain import config as _config, records as _records

__version__ = "0.1.0"


def job_dirname(overrides: str) -> str:
    """A sweep job's folder name from its overrides: no path separators, at most 160 characters."""
    name = overrides.replace("/", "_").replace("\\", "_") or "default"
    return name[:160]


def run_name(overrides: str, arch: str, dataset: str) -> str:
    """A single run's folder name after its time: its overrides, else what it trains on."""
    return job_dirname(overrides) if overrides else f"{arch}_{dataset}"


# Registered on import, so Hydra can resolve the sweep subdir in any process that runs a job.
if not OmegaConf.has_resolver("imgtrain.dirname"):
    OmegaConf.register_new_resolver("imgtrain.dirname", job_dirname)
if not OmegaConf.has_resolver("imgtrain.run_name"):
    OmegaConf.register_new_resolver("imgtrain.run_name", run_name)

_config.register()
_records.register()
