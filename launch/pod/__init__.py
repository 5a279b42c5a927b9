"""`python -m launch.pod`: start `launch.train` on every host of a TPU pod slice (Cloud TPU VMs
or queued resources for multislice), a GKE cluster (a JobSet manifest) or a SLURM GPU cluster
(an sbatch script). See `__main__.py` for the flags."""
