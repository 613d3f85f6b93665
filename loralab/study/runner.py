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
from loralab.results.database import DB_NAME, LEASE_SECONDS, Owner, ResultsDB
from loralab.study.generation import generating_sets, generation_scores, score_generations
from loralab.study.leases import Heartbeat, claim_run, holders, run_done
from loralab.study.plan import (
    RunSpec,
    check_configs,
    describe_run,
    plan,
    stored_record,
    study_header,
    to_train_config,
)
from loralab.study.runs import model_from_record
from loralab.study.spec import Study, study_summary
from loralab.study.workers import run_jobs
from loralab.training import loop
from loralab.training.checkpoint import seed_everything
from loralab.training.config import TrainConfig
from loralab.training.record import ExtraResults
from loralab.training.strategies import registry

RunFn = Callable[[dict[str, Any], bool], dict[str, Any]]
"""Trains one run: (run config, resume) -> its record (the dict record.json holds)."""
EXECUTORS = ("local", "ray")
POLL_SECONDS = 2.0
"""How often a process waiting for runs held by others looks at the database again."""


def run_study(study: Study, out_dir: str | os.PathLike, *, run_fn: RunFn | None = None,
              progress: Callable[[str], None] = print, db: ResultsDB | None = None,
              bar: bool = False, jobs: int = 1, executor: str = "local",
              ray_address: str | None = None, ray_cpus: int | None = None,
              failed_before: float | None = None,
              lease_seconds: float = LEASE_SECONDS, poll_seconds: float = POLL_SECONDS
              ) -> list[dict[str, Any]]:
    """Run every missing run of the study; return the database rows of all its runs. `bar`:
    also show the runs done of those to run, with the elapsed time, on stderr
    (`loralab.progress`: a bar on a terminal, a plain line after each run otherwise).

    Each run is claimed under a lease before anything is done with it (`leases`), so any
    number of processes may run the same study at once and each run is trained once: a run
    held live by another process is left to it and revisited; when only such runs remain this
    process waits (polling every `poll_seconds`) until they finish or their leases die
    (`lease_seconds`), then takes the dead ones over and resumes them. `failed_before`: a run
    that failed at or after this time is not retried (default: this call's start).
    `jobs` > 1 runs N worker processes on this machine (`workers.run_jobs`); `executor="ray"`
    runs each run as a Ray task (`ray_executor.run_on_ray`; `ray_address`: the cluster, default
    a local one; `ray_cpus`: CPUs per run on a cluster without GPUs).

    Each run's row goes `running` -> `finished` | `failed`; an interrupted run stays `running`
    (or `interrupted`) and is resumed next time. A failed run does not stop the study; a
    UserError (bad config) does, since every other run would fail the same way.
    """
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and executor == "ray":
        raise UserError("--jobs is for the local executor; with --executor ray, Ray places "
                        "the runs (one per GPU, or --ray-cpus CPUs each)")
    if executor == "ray":  # ray_executor imports this module: imported here, no cycle
        from loralab.study.ray_executor import run_on_ray

        return run_on_ray(study, out_dir, run_fn=run_fn, progress=progress, bar=bar,
                          address=ray_address, cpus_per_run=ray_cpus,
                          failed_before=failed_before, lease_seconds=lease_seconds,
                          poll_seconds=poll_seconds)
    if jobs > 1:
        return run_jobs(study, out_dir, jobs, progress=progress, bar=bar, run_fn=run_fn,
                        lease_seconds=lease_seconds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_fn is None:
        check_configs(study, out_dir)
        run_fn = default_run_fn
    failed_before = time.time() if failed_before is None else failed_before
    own_db = db is None
    db = db or ResultsDB(out_dir / DB_NAME)
    try:
        db.save_study(study.name, study_summary(study), study.path)
        actions = list(plan(study, out_dir, db))
        todo = sum(a != "skip" for _, a in actions)
        progress(study_header(study, todo, out_dir))
        t_study = time.perf_counter()
        shown = Progress(f"study {study.name}", todo, "run", "runs", enabled=bar and todo > 0,
                         lines=todo)
        loop = _ClaimLoop(study, db, run_fn, Owner.here(), failed_before, lease_seconds)
        later = []
        for i, (spec, action) in enumerate(actions, 1):
            head = f"[{i}/{len(actions)}] {spec.strategy} seed {spec.seed}"
            if action == "skip":
                progress(f"{head}: finished earlier, skipped")
                continue
            if loop.attempt(spec, _prefixed(progress, head)):
                shown.update()
            else:
                later.append((spec, head))
        while later:  # runs held by other processes: wait for them, take over dead leases
            later = loop.revisit(later, progress, poll_seconds, shown.update)
        shown.close()
        progress(f"study '{study.name}' done in {time.perf_counter() - t_study:.0f} s")
        return db.list_runs(study=study.name)
    finally:
        if own_db:
            db.close()


class _ClaimLoop:
    """One process's side of a shared study: claim a run, then ingest, resume or train it under
    a heartbeat; runs another process holds are revisited until they are done."""

    def __init__(self, study: Study, db: ResultsDB, run_fn: RunFn, owner: Owner,
                 failed_before: float, lease_seconds: float) -> None:
        self.study, self.db, self.run_fn, self.owner = study, db, run_fn, owner
        self.failed_before, self.lease_seconds = failed_before, lease_seconds
        self.waited_for: dict[str, str] = {}

    def attempt(self, spec: RunSpec, say: Callable[[str], None]) -> bool:
        """Claim and run `spec`; True when it is over for this process (run here, or done by
        another), False when another process holds it live."""
        action = claim_run(spec, self.study.name, self.db, self.owner,
                           failed_before=self.failed_before, lease_seconds=self.lease_seconds)
        if action is None:
            row = self.db.get(spec.run_id)
            if run_done(row, spec, self.failed_before):
                say(f"{row['status'] if row else 'finished'} by another process")
                return True
            return False
        _run_one(self.study, spec, action, self.run_fn, self.db, say, self.owner)
        return True

    def revisit(self, later: list[tuple[RunSpec, str]], progress: Callable[[str], None],
                poll_seconds: float, done: Callable[[], None]) -> list[tuple[RunSpec, str]]:
        """Wait `poll_seconds`, then try the held runs again; the ones still held."""
        held = holders([spec for spec, _ in later], self.db, lease_seconds=self.lease_seconds)
        if held:
            if held != self.waited_for:  # said once per change, not at every poll
                progress(f"waiting for {len(held)} run(s) held by other processes ("
                         + ", ".join(f"{rid} on {who}" for rid, who in held.items())
                         + "); a run whose process dies is taken over and resumed")
            self.waited_for = held
            time.sleep(poll_seconds)
        still = []
        for spec, head in later:
            if self.attempt(spec, _prefixed(progress, head)):
                done()
            else:
                still.append((spec, head))
        return still


def _prefixed(progress: Callable[[str], None], head: str) -> Callable[[str], None]:
    """`progress` with every message prefixed by `head: `."""
    return lambda msg: progress(f"{head}: {msg}")


def _run_one(study: Study, spec: RunSpec, action: str, run_fn: RunFn, db: ResultsDB,
             say: Callable[[str], None], owner: Owner) -> None:
    """Ingest, resume or train one run whose lease `owner` holds, and record the outcome in
    its database row. Re-raises a UserError (except a diverged run's) and KeyboardInterrupt;
    other failures are recorded."""
    if action == "ingest":
        db.record_run(spec, stored_record(spec.run_dir) or {}, status="finished", owner=owner)
        say("finished earlier (record.json), added to the database")
        return
    say(f"{'resuming from checkpoint' if action == 'resume' else 'training'}"
        f" ({describe_run(spec.config)}) ...")
    if action == "train":
        prepare_run_dir(spec)
    t0 = time.perf_counter()
    try:
        with Heartbeat(db.path, owner, [spec.run_id]):
            record = run_fn(spec.config, action == "resume")
    except KeyboardInterrupt:
        db.set_status(spec.run_id, "interrupted", owner=owner)
        raise
    except Exception as exc:  # one failed run must not sink the study
        say(record_outcome(db, spec, study.name, owner, error=exc,
                           traceback_text=traceback.format_exc(),
                           seconds=time.perf_counter() - t0))
        if isinstance(exc, UserError) and type(exc).__name__ != "TrainingDiverged":
            raise  # a bad config: every other run would fail the same way
        return
    say(record_outcome(db, spec, study.name, owner, record=record,
                       seconds=time.perf_counter() - t0))


def record_outcome(db: ResultsDB, spec: RunSpec, study: str, owner: Owner, *,
                   record: dict[str, Any] | None = None, error: BaseException | None = None,
                   traceback_text: str | None = None, seconds: float = 0.0) -> str:
    """Record how a run `owner` holds ended, releasing its lease: its record (`finished`, or
    the record's own status), else `failed` with `error` (a UserError keeps no traceback).
    Returns the one-line message for the run's log. Nothing is written when `owner` lost the
    lease (another process took the run over): the message says so."""
    if error is not None:
        msg = f"{type(error).__name__}: {error}"
        tb = None if isinstance(error, UserError) else traceback_text
        held = db.set_status(spec.run_id, "failed", error=msg, traceback_text=tb, owner=owner)
        text = (f"FAILED: {error}" if isinstance(error, UserError)
                else f"FAILED after {seconds:.0f} s: {msg}")
    else:
        record = dict(record or {})
        status = record.get("status") or "finished"
        held = db.record_run(spec, record, status=status, study=study, owner=owner)
        text = f"{status} in {seconds:.0f} s{_headline(record)}"
    if not held:
        return (f"{text}; NOT recorded: this process lost the run's lease (another process "
                "took it over)")
    return text
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


def prepare_run_dir(spec: RunSpec) -> None:
    """Write the run's study config first, so a later resume knows what it belongs to. Whatever
    an earlier attempt left (another config, or a run killed before its first checkpoint) is
    kept, renamed aside, never deleted. Only the holder of the run's lease may call it: the
    directory of a run another process trains is never moved."""
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
