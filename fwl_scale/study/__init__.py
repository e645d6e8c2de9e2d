"""`fwl study`: named variants × seeds × {fwl, baseline}, run locally or as a Slurm job array, collected
into one table (spec.py: the spec; runner.py: the runs; report.py: the table; slurm.py: the job array)."""
