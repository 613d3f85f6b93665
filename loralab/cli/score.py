"""`loralab score`: any system's outputs scored against references (the E2E metrics)."""

from __future__ import annotations

import argparse
import json

from loralab.errors import UserError
from loralab.scoring.e2e import read_score_inputs, score_e2e
from loralab.scoring.generations import read_generations


def run_score(args: argparse.Namespace) -> int:
    """Print the corpus scores of SYSTEM against REFS as a table (or JSON)."""
    if args.generations:
        return score_generations(args)
    if not (args.refs and args.system):
        raise UserError("score needs REFS and SYSTEM files, or --generations "
                        "RUN/generations.jsonl")
    refs, hyps = read_score_inputs(args.refs, args.system)
    scores = score_e2e(refs, hyps, java=not args.no_java, progress="scoring")
    if args.json:
        print(json.dumps(scores))
        return 0
    n_refs = sum(len(r) for r in refs)
    print(f"{len(hyps)} outputs, {n_refs} references ({n_refs / len(hyps):.1f} per source)")
    print(f"{'metric':<10} {'score':>9}")
    for key, value in scores.items():
        print(f"{key:<10} {value:>9.4f}")
    return 0


def score_generations(args: argparse.Namespace) -> int:
    """`score --generations`: each eval set of a run's generations.jsonl scored again."""
    sets = read_generations(args.generations)
    results = {name: score_e2e(refs, hyps, java=not args.no_java, progress=f"scoring, {name}")
               for name, (refs, hyps) in sets.items()}
    if args.json:
        print(json.dumps(results))
        return 0
    for name, scores in results.items():
        print(f"{name}: {len(sets[name][1])} outputs")
        for key, value in scores.items():
            print(f"  {key:<10} {value:>9.4f}")
    return 0


RUN = {"score": run_score}
