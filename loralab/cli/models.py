"""`loralab merge` and `loralab generate`: use a finished run's model."""

from __future__ import annotations

import argparse

from loralab import study
from loralab.cli.common import run_dir


def run_merge(args: argparse.Namespace) -> int:
    """Write the merged model (notes on quantized runs say which float form it is)."""
    out = study.merge_run(run_dir(args), args.out, note=lambda m: print(f"note: {m}"))
    print(f"merged model written to {out}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """Print each prompt with its sampled continuation (or a classifier's label)."""
    prompts = args.prompt or ["The history of"]
    outputs = study.generate_from_run(run_dir(args), prompts, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, seed=args.seed)
    for prompt, text in zip(prompts, outputs, strict=True):
        if text.startswith("label "):  # a classifier run
            print(f"{prompt!r} -> {text}")
        else:
            print(f"{prompt}{'' if text[:1].isspace() else ' '}{text}\n")
    return 0


RUN = {"merge": run_merge, "generate": run_generate}
