"""imgtrain's Hydra launcher for SLURM (hydra/launcher=slurm: conf/hydra/launcher/slurm.yaml)."""
