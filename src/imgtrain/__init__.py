"""imgtrain: Hydra-configured ResNet training on Ascend NPUs, NVIDIA GPUs and CPUs."""
import atexit
import gc

from omegaconf import OmegaConf

from imgtrain import config as _config, names as _names, records as _records, rundir as _rundir

__version__ = "0.1.0"


# Registered on import, so Hydra can resolve a run's or a sweep job's folder in any process.
_config.register()
_names.register()
_records.register()
_rundir.register()

# At its exit the interpreter collects, pass after pass, the ~350k objects that torch's and
# torchvision's imports made. Frozen first (registered on import, this handler runs after those
# registered later), they are freed without those passes: each process, a launcher or a spawned
# rank, ends ~1.3 s sooner.
atexit.register(gc.freeze)
