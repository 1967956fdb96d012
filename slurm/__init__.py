"""SLURM submission through submitit (see issue: SLURM launcher). Empty for now."""
