"""One training run: its config, strategies, the loop, evaluation, distribution,
checkpoints, tracking and the run record."""
