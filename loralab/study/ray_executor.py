"""Running a study's runs as Ray tasks (`loralab compare --executor ray`), on a cluster or on a
local Ray instance.

Ray is the engine: it places each run on a node with the resources the run asks for (one GPU
where the cluster has GPUs, else `cpus_per_run` CPUs), starts the worker processes, retries a
run whose worker died, and tells the driver when a run is done (`ray.wait`). No scheduler,
socket or queue of our own. The driver (the `compare` process) stays the one writer of the
results database: it claims each run with a lease (`loralab.study.leases`, so a Ray study can
run beside local `compare` processes on the same study), prepares the run directory, submits
the run, keeps the leases of the runs in flight alive (`leases.Heartbeat`), and records each
outcome as the run finishes. A task writes only its run directory (record.json, checkpoints):
the output folder must be on storage every node sees (NFS, a shared volume).

A worker retried after its process died (kill -9, a lost node) resumes from the run's last
checkpoint: the task decides what to do from what the run directory holds (`_train_task`).

Ray is an optional dependency (`pip install 'loralab[ray]'`), imported only when a study runs
on it. Source: Ray core API, https://docs.ray.io/en/latest/ray-core/api/core.html
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralab.errors import UserError
from loralab.progress import Progress
from loralab.results.database import DB_NAME, LEASE_SECONDS, Owner, ResultsDB
from loralab.study.leases import HEARTBEAT_SECONDS, Heartbeat, claim_next, open_runs
from loralab.study.plan import (
    RunSpec,
    check_configs,
    describe_run,
    disk_action,
    stored_record,
    study_header,
)
from loralab.study.runner import RunFn, default_run_fn, prepare_run_dir, record_outcome
from loralab.study.spec import Study, study_summary

RAY_MISSING = "--executor ray needs Ray: pip install 'loralab[ray]'"
DEFAULT_CPUS_PER_RUN = 4
"""CPUs of a run on a cluster without GPUs, at most a node's CPUs: a small model's training
step stops getting faster beyond a few threads, so more runs side by side use a node better."""
RETRIES = 2
"""Times Ray restarts a run whose worker process died (not a run that raised)."""
ENV_PREFIXES = ("LORALAB_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "WANDB_", "MLFLOW_",
                "THP_MEM_ALLOC_ENABLE", "CUBLAS_WORKSPACE_CONFIG")
"""Environment variables the driver passes to every task (`runtime_env` env_vars): offline
mode and caches (HF_HUB_OFFLINE, LORALAB_CACHE), trackers, fault-injection hooks."""


def import_ray() -> Any:
    """The `ray` module. Raises UserError (one line, with the install command) without it."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def task_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` a run needs on a worker (those starting with ENV_PREFIXES)."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES)}


@dataclass(frozen=True)
class Request:
    """What one run asks of Ray: `gpus` (0 or 1) and `cpus`; its torch threads are `cpus`."""

    gpus: int
    cpus: int

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `remote_fn.options(...)`."""
        return {"num_gpus": self.gpus, "num_cpus": self.cpus, "max_retries": RETRIES}


def node_resources(nodes: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """The resources (CPU, GPU, ...) of each live node of `ray.nodes()`."""
    return [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive", True)]


def run_request(nodes: list[dict[str, float]], cpus_per_run: int | None) -> Request:
    """One GPU per run (and `cpus_per_run` CPUs, default 1) when some node has a GPU; else
    `cpus_per_run` CPUs (default DEFAULT_CPUS_PER_RUN, capped at the largest node's CPUs).
    Raises UserError when no node could ever hold the run (it would wait forever)."""
    if cpus_per_run is not None and cpus_per_run < 1:
        raise UserError(f"--ray-cpus {cpus_per_run}: give at least 1 CPU per run")
    largest = int(max((n.get("CPU", 0.0) for n in nodes), default=0))
    if any(n.get("GPU", 0.0) >= 1 for n in nodes):
        request = Request(gpus=1, cpus=cpus_per_run or 1)
        fits = any(n.get("GPU", 0.0) >= 1 and n.get("CPU", 0.0) >= request.cpus for n in nodes)
    else:
        request = Request(gpus=0, cpus=cpus_per_run or max(1, min(DEFAULT_CPUS_PER_RUN,
                                                                  largest)))
        fits = largest >= request.cpus
    if not fits:
        raise UserError(f"no Ray node has {request.cpus} CPUs{' and a GPU' * request.gpus} for "
                        f"a run (largest node: {largest} CPUs); pass a smaller --ray-cpus")
    return request


def capacity(nodes: list[dict[str, float]], request: Request) -> int:
    """How many runs the cluster holds at once: per node, its GPUs (or CPUs) over the
    request's, summed; at least 1 (Ray queues what does not fit yet)."""
    total = 0
    for n in nodes:
        slots = int(n.get("CPU", 0.0) // request.cpus)
        if request.gpus:
            slots = min(slots, int(n.get("GPU", 0.0) // request.gpus))
        total += slots
    return max(total, 1)


def _train_task(run_fn: RunFn, spec: RunSpec, resume: bool, threads: int) -> dict[str, Any]:
    """The body of a run's Ray task: train with `threads` torch threads (the task's CPU share)
    and return the record. On a retry after the worker died, continue from what the earlier
    attempt left in the run directory: its record if it finished, else its last checkpoint."""
    torch.set_num_threads(threads)
    if not resume:
        left = disk_action(spec)  # the driver prepared a fresh directory: "train" the 1st time
        if left == "ingest":
            return stored_record(spec.run_dir) or {}
        resume = left == "resume"
    return run_fn(spec.config, resume)


def run_on_ray(study: Study, out_dir: str | os.PathLike, *, run_fn: RunFn | None = None,
               progress: Callable[[str], None] = print, bar: bool = False,
               address: str | None = None, cpus_per_run: int | None = None,
               failed_before: float | None = None, lease_seconds: float = LEASE_SECONDS,
               poll_seconds: float = 2.0) -> list[dict[str, Any]]:
    """Train every run of the study not done yet as a Ray task (`run_fn`, default
    `runner.default_run_fn`, on a worker); return the database rows of all its runs, once no
    run is left open (finished, failed since `failed_before` (default: now), or held by
    another process: waited for, polling every `poll_seconds`, and taken over if its lease
    dies).

    `address`: a running cluster (`auto`, `ray://host:10001`, `host:6379`); None starts a
    local instance with this machine's CPUs and GPUs, shut down on return. Raises UserError
    without Ray or for a request no node can hold; re-raises a run's UserError (bad config,
    not a diverged run) after recording it, and KeyboardInterrupt, in both cases after
    cancelling the runs in flight and marking them `interrupted`."""
    ray = import_ray()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_fn is None:
        check_configs(study, out_dir)
        run_fn = default_run_fn
    failed_before = time.time() if failed_before is None else failed_before
    if address and not out_dir.is_absolute():
        progress(f"note: --out {out_dir} is relative; Ray workers on other nodes resolve it "
                 "from their own working directory: give the shared folder's absolute path")
    with ResultsDB(out_dir / DB_NAME) as db:
        db.save_study(study.name, study_summary(study), study.path)
        todo = len(open_runs(study, out_dir, db, failed_before=failed_before))
        progress(study_header(study, todo, out_dir))
        if todo:  # a finished study needs no cluster
            started = _connect(ray, address)
            try:
                t0 = time.perf_counter()
                _drive(ray, study, out_dir, db, todo, run_fn=run_fn, progress=progress,
                       bar=bar, cpus_per_run=cpus_per_run, failed_before=failed_before,
                       lease_seconds=lease_seconds, poll_seconds=poll_seconds)
                progress(f"study '{study.name}' done in {time.perf_counter() - t0:.0f} s")
            finally:
                if started:
                    ray.shutdown()
        return db.list_runs(study=study.name)


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to the cluster at `address`, or start a quiet local instance (no dashboard,
    workers' output kept in Ray's session logs). True if we started (and must stop) it."""
    if ray.is_initialized():
        return False
    common = {"runtime_env": {"env_vars": task_env(os.environ)}, "log_to_driver": False,
              "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(include_dashboard=False, **common)
    return True


@dataclass
class _Flight:
    """A run submitted to Ray: its spec, its log prefix, when it was submitted."""

    spec: RunSpec
    head: str
    t0: float


def _drive(ray: Any, study: Study, out_dir: Path, db: ResultsDB, todo: int, *, run_fn: RunFn,
           progress: Callable[[str], None], bar: bool, cpus_per_run: int | None,
           failed_before: float, lease_seconds: float, poll_seconds: float) -> None:
    """The driver loop: keep the cluster full of claimed runs (as many as it holds at once),
    record each as it finishes, wait for runs other processes hold; a KeyboardInterrupt or a
    run's bad config stops the runs in flight (`_abandon`)."""
    nodes = node_resources(ray.nodes())
    request = run_request(nodes, cpus_per_run)
    remote = ray.remote(_train_task).options(**request.options())
    owner = Owner.here()
    progress(f"on Ray: {len(nodes)} node(s), up to {capacity(nodes, request)} run(s) at once, "
             f"each with {request.gpus} GPU and {request.cpus} CPU(s)")
    shown = Progress(f"study {study.name}", todo, "run", "runs", enabled=bar and todo > 0,
                     lines=todo)
    in_flight: dict[Any, _Flight] = {}
    started = 0
    every = min(HEARTBEAT_SECONDS, lease_seconds / 6)
    with Heartbeat(db.path, owner, every=every) as hb, shown:
        try:
            while True:
                limit = capacity(node_resources(ray.nodes()), request)
                while len(in_flight) < limit:
                    claimed = claim_next(study, out_dir, db, owner, failed_before=failed_before,
                                         lease_seconds=lease_seconds,
                                         skip=[f.spec.run_id for f in in_flight.values()])
                    if claimed is None:
                        break
                    spec, action = claimed
                    started += 1
                    head = f"[{started}/{todo}] {spec.strategy} seed {spec.seed}"
                    if action == "ingest":
                        db.record_run(spec, stored_record(spec.run_dir) or {}, owner=owner)
                        progress(f"{head}: finished earlier (record.json), added to the "
                                 "database")
                        shown.update()
                        continue
                    if action == "train":
                        prepare_run_dir(spec)
                    hb.add(spec.run_id)
                    ref = remote.remote(run_fn, spec, action == "resume", request.cpus)
                    in_flight[ref] = _Flight(spec, head, time.perf_counter())
                    progress(f"{head}: {'resuming' if action == 'resume' else 'training'} "
                             f"({describe_run(spec.config)}) ...")
                if not in_flight:
                    if not open_runs(study, out_dir, db, failed_before=failed_before):
                        return
                    time.sleep(poll_seconds)  # the rest is held by other processes
                    continue
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_seconds)
                for ref in ready:
                    flight = in_flight.pop(ref)
                    hb.discard(flight.spec.run_id)
                    _finish(ray, ref, flight, study.name, db, owner, progress)
                    shown.update()
                _drop_lost(ray, in_flight, hb.lost, progress)
        except BaseException:
            _abandon(ray, in_flight, db, owner)
            raise


def _finish(ray: Any, ref: Any, flight: _Flight, study: str, db: ResultsDB, owner: Owner,
            progress: Callable[[str], None]) -> None:
    """Record a finished task's outcome (its record, or its error). Re-raises a run's
    UserError other than a diverged run's: every other run would fail the same way."""
    seconds = time.perf_counter() - flight.t0
    try:
        record = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # the run raised: exc.cause is its exception
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        progress(f"{flight.head}: " + record_outcome(
            db, flight.spec, study, owner, error=cause, traceback_text=str(exc),
            seconds=seconds))
        if isinstance(cause, UserError) and type(cause).__name__ != "TrainingDiverged":
            raise cause from None
        return
    except ray.exceptions.RayError as exc:  # its worker or node died more than RETRIES times
        progress(f"{flight.head}: " + record_outcome(
            db, flight.spec, study, owner, error=exc, traceback_text=traceback.format_exc(),
            seconds=seconds))
        return
    progress(f"{flight.head}: " + record_outcome(db, flight.spec, study, owner, record=record,
                                                 seconds=seconds))


def _drop_lost(ray: Any, in_flight: dict[Any, _Flight], lost: frozenset[str],
               progress: Callable[[str], None]) -> None:
    """Cancel the tasks whose lease another process took over (our heartbeat came too late):
    that process now owns the run and its directory."""
    for ref, flight in list(in_flight.items()):
        if flight.spec.run_id in lost:
            ray.cancel(ref, force=True)
            del in_flight[ref]
            progress(f"{flight.head}: lease taken over by another process; left to it")


def _abandon(ray: Any, in_flight: dict[Any, _Flight], db: ResultsDB, owner: Owner) -> None:
    """Stop the runs in flight (Ctrl-C, or a run's bad config) and mark them `interrupted`,
    so the next `compare` resumes them from their checkpoints."""
    for ref, flight in in_flight.items():
        ray.cancel(ref, force=True)
        db.set_status(flight.spec.run_id, "interrupted", owner=owner)
    in_flight.clear()
