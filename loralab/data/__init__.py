"""Datasets for the three tasks: raw sources and presets (`sources`), tokenisation (`tokenise`),
splits, cache and collation (`tasks`), the `loralab data` summary (`describe`)."""

MIN_SEQ_LEN = 8
"""The shortest example length (tokens) a dataset is prepared for: `load_task_data` and
`TrainConfig.seq_len` both check it."""
