"""Running a study: every missing run of its matrix, one row per run in the results database.

`run_study` follows `plan.plan` (skip, ingest, resume or train each run) and keeps each run's
database row current: `running` -> `finished` | `failed` (`interrupted` on Ctrl-C). The
function that trains one run is injected (`run_fn(config: dict, resume: bool) -> record`), so
the bookkeeping is testable without training; `default_run_fn` wires in
`loralab.training.loop.train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from loralab.data.tasks import load_task_data, subsample
from loralab.errors import UserError
from loralab.models import loading
from loralab.progress import Progress
from loralab.results.database import ResultsDB
from loralab.study.generation import generating_sets, generation_scores, score_generations
from loralab.study.plan import (
    RunSpec,
    check_configs,
    describe_run,
    plan,
    stored_record,
    to_train_config,
)
from loralab.study.runs import model_from_record
from loralab.study.spec import Study, study_summary
from loralab.training import loop
from loralab.training.checkpoint import seed_everything
from loralab.training.config import TrainConfig
from loralab.training.record import ExtraResults
from loralab.training.strategies import registry

RunFn = Callable[[dict[str, Any], bool], dict[str, Any]]
"""Trains one run: (run config, resume) -> its record (the dict record.json holds)."""


def run_study(study: Study, out_dir: str | os.PathLike, *, run_fn: RunFn | None = None,
              progress: Callable[[str], None] = print, db: ResultsDB | None = None,
              bar: bool = False) -> list[dict[str, Any]]:
    """Run every missing run of the study; return the database rows of all its runs. `bar`:
    also show the runs done of those to run, with the elapsed time, on stderr
    (`loralab.progress`: a bar on a terminal, a plain line after each run otherwise).

    Each run's row goes `running` -> `finished` | `failed`; an interrupted run stays `running`
    (or `interrupted`) and is resumed next time. A failed run does not stop the study; a
    UserError (bad config) does, since every other run would fail the same way.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_fn is None:
        check_configs(study, out_dir)
        run_fn = default_run_fn
    own_db = db is None
    db = db or ResultsDB(out_dir / "results.sqlite")
    try:
        db.save_study(study.name, study_summary(study), study.path)
        actions = list(plan(study, out_dir, db))
        todo = sum(a != "skip" for _, a in actions)
        progress(f"study '{study.name}': {len(actions)} runs ({len(study.strategies)} strategies"
                 f" x {len(study.seeds)} seeds), {len(actions) - todo} finished, {todo} to run;"
                 f" output {out_dir}")
        t_study = time.perf_counter()
        shown = Progress(f"study {study.name}", todo, "run", "runs", enabled=bar and todo > 0,
                         lines=todo)
        for i, (spec, action) in enumerate(actions, 1):
            head = f"[{i}/{len(actions)}] {spec.strategy} seed {spec.seed}"
            if action == "skip":
                progress(f"{head}: finished earlier, skipped")
                continue
            _run_one(study, spec, action, run_fn, db, _prefixed(progress, head))
            shown.update()
        shown.close()
        progress(f"study '{study.name}' done in {time.perf_counter() - t_study:.0f} s")
        return db.list_runs(study=study.name)
    finally:
        if own_db:
            db.close()


def _prefixed(progress: Callable[[str], None], head: str) -> Callable[[str], None]:
    """`progress` with every message prefixed by `head: `."""
    return lambda msg: progress(f"{head}: {msg}")


def _run_one(study: Study, spec: RunSpec, action: str, run_fn: RunFn, db: ResultsDB,
             say: Callable[[str], None]) -> None:
    """Ingest, resume or train one run and record the outcome in its database row. Re-raises
    a UserError (except a diverged run's) and KeyboardInterrupt; other failures are recorded."""
    if action == "ingest":
        db.record_run(spec, stored_record(spec.run_dir) or {}, status="finished")
        say("finished earlier (record.json), added to the database")
        return
    say(f"{'resuming from checkpoint' if action == 'resume' else 'training'}"
        f" ({describe_run(spec.config)}) ...")
    if action == "train":
        _prepare_run_dir(spec)
    db.start_run(spec, study.name)
    t0 = time.perf_counter()
    try:
        record = run_fn(spec.config, action == "resume")
    except UserError as exc:
        db.set_status(spec.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        if type(exc).__name__ != "TrainingDiverged":  # a NaN is this run's problem
            raise
        say(f"FAILED: {exc}")
        return
    except KeyboardInterrupt:
        db.set_status(spec.run_id, "interrupted")
        raise
    except Exception as exc:  # one failed run must not sink the study
        msg = f"{type(exc).__name__}: {exc}"
        db.set_status(spec.run_id, "failed", error=msg, traceback_text=traceback.format_exc())
        say(f"FAILED after {time.perf_counter() - t0:.0f} s: {msg}")
        return
    record = dict(record or {})
    status = record.get("status") or "finished"
    db.record_run(spec, record, status=status)
    say(f"{status} in {time.perf_counter() - t0:.0f} s{_headline(record)}")


def _headline(record: dict[str, Any]) -> str:
    """`: <eval set> perplexity 17.91, ...`: the first headline metric of each eval set."""
    bits = []
    for set_name, metrics in (record.get("metrics") or {}).items():
        if not isinstance(metrics, dict):
            continue
        for key in ("perplexity", "f1", "accuracy", "bleu"):
            if isinstance(metrics.get(key), (int, float)):
                bits.append(f"{set_name} {key} {metrics[key]:.4g}")
                break
    return (": " + ", ".join(bits)) if bits else ""


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _prepare_run_dir(spec: RunSpec) -> None:
    """Write the run's study config first, so a later resume knows what it belongs to. Whatever
    an earlier attempt left (another config, or a run killed before its first checkpoint) is
    kept, renamed aside, never deleted."""
    if spec.run_dir.exists() and any(spec.run_dir.iterdir()):
        aside = spec.run_dir.with_name(f"{spec.run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(spec.run_dir, aside)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(spec.run_dir / "study_config.json", spec.config)


# ----------------------------------------------------------------------------- one real run
def build_task_data(config: dict[str, Any], tokenizer):
    """The run's data with the study's evaluation sets as extra splits.

    `train` evaluates every non-train split of the data it is given, so each eval set becomes
    a split named after it: the training set's own held-out split (test, else validation) or
    the test split of another preset, tokenised with the same tokenizer and seq_len,
    subsampled to max_examples (the same examples for every run). The validation split (for
    the validation-loss curve and best-checkpoint choice) is subsampled to eval_max_examples.
    Raises UserError for an eval set whose dataset has no usable split."""
    common = {"seq_len": config.get("seq_len", 128), "seed": config.get("seed", 0)}
    base = load_task_data(config["data"], config["task"], tokenizer,
                          data_fraction=config.get("data_fraction", 1.0),
                          **common, **config.get("data_options", {}))
    default_n = config.get("eval_max_examples")
    splits = {"train": base.splits["train"]} if "train" in base.splits else {}
    if "validation" in base.splits:
        splits["validation"] = subsample(base.splits["validation"], default_n)
    for ev in config.get("eval_sets", []):
        n = ev.get("max_examples") or default_n
        if ev["data"] == config["data"] and not ev.get("options"):
            source = base
        else:
            options = dict(ev.get("options", {}))
            if ev["data"] == config["data"]:
                options = {**config.get("data_options", {}), **options}
            source = load_task_data(ev["data"], config["task"], tokenizer, **common, **options)
        split = ev.get("split") or "test"
        if split not in source.splits:
            fallback = next((s for s in ("test", "validation") if s in source.splits), None)
            if fallback is None:
                raise UserError(f"eval set '{ev['name']}': dataset {ev['data']} has no "
                                f"'{split}' split (splits: {', '.join(source.splits)}); set "
                                "'split' in the study")
            split = fallback
        splits[ev["name"]] = subsample(source.splits[split], n)
    return dataclasses.replace(base, splits=splits)


def default_run_fn(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    """Train one run with `loralab.training.loop.train`, on data built by `build_task_data` so
    the record's metrics are keyed by the study's eval sets; returns the run's record.

    train() writes record.json once with everything in it: the model loading and data
    preparation seconds (`extra_costs`, reported apart from training) and, for eval sets with
    `generate:`, the generation scores and their costs (`after_evaluation`, computed after the
    final evaluation, before the trackers close). The study never rewrites the record."""
    tc = to_train_config(config)
    t0 = time.perf_counter()
    # Seed before loading, as train() does when it loads the model itself: a newly initialised
    # head (a classifier) must depend on the run's seed only, not on what earlier runs of the
    # study drew from the global RNG (else strategies of one seed start from different heads).
    seed_everything(tc.seed)
    loaded = loading.load_model(tc.model, cast(loading.Task, tc.task), num_labels=tc.num_labels)
    t1 = time.perf_counter()
    task_data = build_task_data(config, loaded.tokenizer)
    costs = {"load_seconds": t1 - t0, "data_seconds": time.perf_counter() - t1,
             "data_from_cache": bool(getattr(task_data, "from_cache", False))}
    hook = _generation_hook(config, tc, task_data) if generating_sets(config) else None
    return loop.train(tc, resume=resume, loaded=loaded, task_data=task_data, extra_costs=costs,
                      after_evaluation=hook)


def _generation_hook(config: dict[str, Any], tc: TrainConfig, task_data: Any
                     ) -> Callable[[Any, Any, dict[str, Any]], ExtraResults]:
    """train()'s `after_evaluation` for a run with generating eval sets: decode and score them
    with the model the run records. A quantized method records another model than the one it
    trained (its deployed form), rebuilt from the artefacts already saved
    (`runs.model_from_record`)."""
    def hook(model: Any, tokenizer: Any, record: dict[str, Any]) -> ExtraResults:
        if registry.get_spec(tc.method).quantized:
            model, tokenizer = model_from_record({**record, "study_config": config},
                                                 Path(tc.out))
        return score_generations(model, tokenizer, task_data, config, scorer=generation_scores)
    return hook
