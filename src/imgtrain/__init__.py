"""imgtrain: Hydra-configured ResNet training on Ascend NPUs, NVIDIA GPUs and CPUs."""
import atexit
import gc
import re

from omegaconf import OmegaConf

from imgtrain import config as _config, records as _records, rundir as _rundir

__version__ = "0.1.0"


# A run's folder is pasted back into overrides (hydra.run.dir=..., model.weights=.../best.pt), where
# Hydra's grammar reads = , [ ] ( ) { } and quote marks as syntax (and a shell splits at spaces):
# a name keeps letters, digits and _ . + @ % - only.
_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_.+@%-]")


def job_dirname(overrides: str) -> str:
    """A run's or sweep job's folder name from its overrides, `key-value+key-value`: nothing a
    path or an unquoted override would misread, at most 160 characters."""
    name = overrides.replace("=", "-").replace(",", "+")
    return (_NOT_IN_A_NAME.sub("_", name) or "default")[:160]


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
_rundir.register()

# At its exit the interpreter collects, pass after pass, the ~350k objects that torch's and
# torchvision's imports made. Frozen first (registered on import, this handler runs after those
# registered later), they are freed without those passes: each process, a launcher or a spawned
# rank, ends ~1.3 s sooner.
atexit.register(gc.freeze)
