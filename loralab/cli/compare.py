"""`loralab compare`, `runs` and `report`: run a study, list its runs, rebuild its report."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from loralab import study
from loralab.cli.studies import dry_run
from loralab.report import collect, render, write
from loralab.results.database import ResultsDB, find_db
from loralab.training.config import parse_report_to


def run_compare(args: argparse.Namespace) -> int:
    """Run the study's missing runs and write its report; 1 if a run failed."""
    overrides = list(args.overrides or [])
    if args.study and "=" in args.study and not Path(args.study).is_file():
        args.study, overrides = None, [args.study, *overrides]  # `compare KEY=VALUE`: default
    path = study.resolve_study_path(args.study)
    spec = study.with_seeds(study.load_study(path, overrides=overrides), args.seeds)
    if args.report_to is not None:  # outside the config hash: finished runs stay finished
        spec = dataclasses.replace(spec, report_to=parse_report_to(args.report_to))
    out_dir = Path(args.out) / spec.name
    if args.dry_run:
        return dry_run(spec, out_dir)
    if not args.report_only:
        study.run_study(spec, out_dir, progress=lambda msg: print(msg, flush=True), bar=True,
                        jobs=args.jobs, executor=args.executor, ray_address=args.ray_address,
                        ray_cpus=args.ray_cpus)
    written = write.write_report(out_dir, study=spec.name)
    data = collect.load(out_dir, spec.name)[0]
    print()
    print(render.terminal_report(data))
    print(f"\nreport: {written[0]}  {written[1]}  {written[2]}")
    failed = [r for r in data.rows if r["status"] != "finished"]
    return 1 if failed and not args.report_only else 0


def headline(row: dict) -> str:
    """A run's headline metric: the first of perplexity, f1, accuracy, BLEU (else the first
    metric) of its first evaluation set, validation last; "" if it has none."""
    sets = sorted((row.get("metrics") or {}).items(), key=lambda kv: kv[0] == "validation")
    for set_name, metrics in sets:
        if isinstance(metrics, dict) and metrics:
            key = next((k for k in ("perplexity", "f1", "accuracy", "BLEU") if k in metrics),
                       next(iter(metrics)))
            return f"{set_name} {key}={metrics[key]:.4g}" if isinstance(
                metrics[key], (int, float)) else ""
    return ""


def run_runs(args: argparse.Namespace) -> int:
    """Print the matching runs as a table (or their full rows as JSON)."""
    with ResultsDB(find_db(args.dir)) as db:
        rows = db.list_runs(study=args.study, status=args.status, strategy=args.strategy)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no runs match")
        return 0
    header = ["run_id", "status", "train s", "headline", "run dir"]
    table = []
    for r in rows:
        secs = (r.get("costs") or {}).get("train_seconds")
        table.append([r["run_id"], r["status"], f"{secs:.0f}" if secs is not None else "-",
                      headline(r) or (r.get("error") or "")[:60], r.get("run_dir") or ""])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Rewrite the report files and print each study's tables."""
    written = write.write_report(args.dir, study=args.study)
    for data in collect.load(args.dir, args.study):
        print(render.terminal_report(data))
        print()
    print("wrote " + "  ".join(str(p) for p in written[:3]))
    return 0


RUN = {"compare": run_compare, "runs": run_runs, "report": run_report}
