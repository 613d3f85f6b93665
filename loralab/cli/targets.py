"""`loralab targets`: what a LoRA preset adapts, grouped, and what a run would train.

The default output is one line per kind of module (per-layer names collapsed to one glob:
`model.layers.*.self_attn.q_proj`) with its count, shape and LoRA parameters; `--all` lists
every module. The trainable count and percentage are the ones a `loralab train --method lora`
run records (`costs.trainable_params`, `costs.trainable_pct`): the model is prepared exactly as
training prepares it (the strategy's `prepare`, so a classifier's head trains too) and counted by
the same function (`quant.count_parameters`: tied weights once, LoRA factors included in
the total).
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from torch import nn

from loralab.lora.config import LoRAConfig
from loralab.lora.inject import describe_targets
from loralab.models.loading import load_model
from loralab.quant import count_parameters
from loralab.training.config import TrainConfig
from loralab.training.strategies.base import strategy_for


def group_rows(rows: list[dict]) -> list[dict]:
    """Rows of `lora.describe_targets` grouped by module name with layer numbers collapsed
    (`h.0.attn.c_attn`, `h.1.attn.c_attn` -> `h.*.attn.c_attn`), shape and slices: one group
    per kind of module, with its count and summed LoRA parameters, in model order."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        name = re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", r["name"])
        slices = tuple(map(tuple, r["slices"])) if r["slices"] else None
        key = (name, r["kind"], r["d_in"], r["d_out"], slices)
        g = groups.setdefault(key, {"name": name, "kind": r["kind"], "d_in": r["d_in"],
                                    "d_out": r["d_out"], "slices": r["slices"], "count": 0,
                                    "lora_params": 0})
        g["count"] += 1
        g["lora_params"] += r["lora_params"]
    return list(groups.values())


def run_counts(model: nn.Module, args: argparse.Namespace, alpha: float) -> tuple[int, int]:
    """(trainable, total) parameters of a `--method lora` run with these targets, as its
    record counts them. Prepares (changes) `model`."""
    targets = args.targets or args.preset
    config = TrainConfig(model=args.model, task=args.task, method="lora", preset=targets,
                         rank=args.rank, alpha=alpha, num_labels=args.num_labels)
    strategy_for(config).prepare(model)
    return count_parameters(model)


def cmd_targets(args: argparse.Namespace) -> int:
    """Print the adapted modules (grouped, or --all) and the counts a lora run records."""
    config = LoRAConfig(rank=args.rank, alpha=args.alpha or 2.0 * args.rank,
                        targets=args.targets or args.preset)
    torch.manual_seed(0)
    model = load_model(args.model, args.task, num_labels=args.num_labels).model
    rows = describe_targets(model, config)
    groups = group_rows(rows)
    lora = sum(r["lora_params"] for r in rows)
    trainable, total = run_counts(model, args, config.alpha)
    pct = 100.0 * trainable / max(1, total)
    if args.json:
        print(json.dumps({"model": args.model, "targets": config.targets, "rank": config.rank,
                          "groups": groups, "modules": rows, "lora_params": lora,
                          "trainable_params": trainable, "total_params": total,
                          "trainable_pct": pct}, indent=2))
        return 0
    print(f"{args.model}: {len(rows)} modules match {config.targets!r} (rank {config.rank})")
    shown = rows if args.all else groups
    width = max(len("module"), *(len(r["name"]) for r in shown))
    count = "" if args.all else f"{'count':>5}  "
    print(f"{'module':<{width}}  {'kind':<7} {count}{'d_in x d_out':>13}  {'slices':<18} "
          f"{'params':>10}")
    for r in shown:
        slices = ",".join(f"{a}:{b}" for a, b in r["slices"]) if r["slices"] else "all"
        shape = f"{r['d_in']} x {r['d_out']}"
        count = "" if args.all else f"{r['count']:>5}  "
        print(f"{r['name']:<{width}}  {r['kind']:<7} {count}{shape:>13}  {slices:<18} "
              f"{r['lora_params']:>10,}")
    other = trainable - lora
    extra = f" + {other:,} task head" if other else ""
    print(f"LoRA parameters: {lora:,}{extra}; trainable in a --method lora run: {trainable:,} "
          f"of {total:,} ({pct:.3f}%, as its record counts them)")
    if not args.all:
        print("(one line per kind of module; --all lists every module)")
    return 0


RUN = {"targets": cmd_targets}
