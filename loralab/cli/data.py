"""`loralab data`: what a dataset holds (splits, tokens, labels, a sample)."""

from __future__ import annotations

import argparse

import datasets

from loralab.data.describe import describe as describe_data
from loralab.errors import UserError


def run_data(args: argparse.Namespace) -> int:
    """Print `data.describe.describe` of the dataset. Raises UserError for a bad --option."""
    datasets.disable_progress_bars()
    options: dict[str, str] = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r} is not KEY=VALUE; e.g. --option text_column=text")
        options[key] = value
    if args.data_dir:
        options["data_dir"] = args.data_dir
    print(describe_data(args.name, task=args.task, tokenizer=args.tokenizer,
                        seq_len=args.seq_len, data_fraction=args.data_fraction, **options))
    return 0


RUN = {"data": run_data}
