"""`loralab train`: one run from --config and the options typed (`parsers.add_train_parser`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from loralab.training import loop
from loralab.training.config import config_fields, config_from_yaml, make_config


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (None = not given)."""
    return {name: getattr(args, name) for name in config_fields()
            if getattr(args, name, None) is not None}


def mfu_text(costs: dict, estimates: dict) -> str:
    """MFU and the peak it divides by; never a figure above 100% (the record then holds None
    and the reason, shown among the notes)."""
    if costs.get("mfu") is None:
        return "MFU unreliable (see note)"
    peak = estimates.get("peak_flops_per_second") or 0.0
    of = f" of a {peak / 1e9:.1f} GFLOP/s matmul peak" if peak else ""
    return f"MFU {100 * costs['mfu']:.2f}%{of}"


def run_train(args: argparse.Namespace) -> int:
    """Train, then print the run's parameters, metrics and costs. 1 if it did not finish."""
    overrides = train_overrides(args)
    previous = Path(args.out or "", "record.json")
    if args.resume and args.config is None and args.out and previous.exists():
        # resume with the run's own config (command-line options still override it)
        saved = json.loads(previous.read_text()).get("config") or {}
        config = make_config(saved, **overrides)
    else:
        config = config_from_yaml(args.config, **overrides)
    record = loop.train(config, resume=args.resume)
    if record.get("status") != "finished":
        return 1
    costs = record["costs"]
    print(f"run {record['run_id']}: {config.method} on {config.model}, "
          f"{costs['trainable_params']:,} of {costs['total_params']:,} parameters trained "
          f"({costs['trainable_pct']:.3g}%)")
    for split, metrics in record["metrics"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float))
        print(f"  {split}: {shown}")
    print(f"  train {costs.get('train_seconds', 0):.1f} s, "
          f"{costs.get('tokens_per_second', 0):.0f} tokens/s, "
          f"peak memory +{costs.get('peak_memory_bytes', 0) / 2**20:.0f} MiB, "
          f"artifact {costs.get('artifact_bytes', 0) / 2**20:.2f} MiB, "
          f"{mfu_text(costs, record.get('estimates') or {})}")
    for note in record.get("notes", []):
        print(f"  note: {note}")
    print(f"record: {config.out}/record.json   tensorboard --logdir {config.out}/tb")
    return 0


RUN = {"train": run_train}
