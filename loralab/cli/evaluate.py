"""`loralab eval`: a finished run, or a model (+ adapter), evaluated on a dataset."""

from __future__ import annotations

import argparse
import json

from loralab.cli.common import given_run_dir
from loralab.study.runs import evaluate_saved
from loralab.training.config import make_config


def run_eval(args: argparse.Namespace) -> int:
    """Print each split's metrics (or all of them as JSON)."""
    bound = args.eval_max_examples  # checked by the one validator, TrainConfig's
    bound = 0 if bound is None else make_config(eval_max_examples=bound).eval_max_examples
    results = evaluate_saved(run_dir=given_run_dir(args), model=args.model,
                             adapter=args.adapter, data=args.data, task=args.task,
                             splits=tuple(args.split or ()), batch_size=args.batch_size,
                             seq_len=args.seq_len, num_labels=args.num_labels,
                             precision=args.precision, eval_max_examples=bound)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for split, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items())
        print(f"{split}: {shown}")
    return 0


RUN = {"eval": run_eval}
