"""Studies: a study file's spec, the plan of runs, running them, and overrides."""
