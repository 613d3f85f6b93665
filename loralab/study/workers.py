"""`loralab compare --jobs N`: N worker processes on this machine share one study.

Each worker is a fresh Python process that runs the same claim loop as a single `compare`
(`runner.run_study`: claim a run under a lease, then ingest, resume or train it), so the
workers never need to talk to each other or to the parent: the results database is the only
thing they share, and its leases make each run train once. Each worker is pinned to its own
device (`worker_devices`): one GPU each (CUDA_VISIBLE_DEVICES) when there are GPUs, otherwise
an equal share of the CPU cores (torch threads, OMP/MKL). A worker's output goes to
OUT/workers/worker-K.log; the parent shows one study-level display (runs done / running /
left, ETA) read from the database, notices a worker that died (kill -9, out of memory) and
starts a replacement, which takes the dead lease over and resumes the run from its checkpoint.
Ctrl-C stops every worker (their runs are marked interrupted and resume next time).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from loralab.errors import UserError
from loralab.results.database import DB_NAME, LEASE_SECONDS, ResultsDB, lease_alive
from loralab.study.leases import run_done
from loralab.study.plan import RunSpec, check_configs, plan, run_matrix, study_header
from loralab.study.spec import Study, study_summary

WORKER_CODE = ("import sys; from loralab.study.runner import run_study; "
               "from loralab.study.workers import worker_main; "
               "sys.exit(worker_main(sys.argv[1:], run_study))")
"""What a worker process runs (`python -c`): the worker's entry point with the claim loop."""
LOG_DIR = "workers"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
STOP_SECONDS = 30.0
"""How long Ctrl-C waits for the workers to mark their runs interrupted before killing them."""


@dataclass(frozen=True)
class WorkerDevice:
    """Where one worker computes: `env` is added to its environment, `threads` (None: torch's
    default) is its torch thread count; `label` says it in one line."""

    label: str
    env: dict[str, str] = field(default_factory=dict)
    threads: int | None = None


def worker_devices(jobs: int, *, gpus: int, cpus: int, visible: str | None = None
                   ) -> list[WorkerDevice]:
    """The device of each of `jobs` workers: with `gpus` > 0, one GPU each (worker k sees only
    the k-th visible GPU, `visible` being the parent's CUDA_VISIBLE_DEVICES, so a GPU is never
    shared); otherwise cpus // jobs threads each (at least 1), with OMP_NUM_THREADS and
    MKL_NUM_THREADS to match so no library oversubscribes the cores. Runs are independent, so
    a worker per device is the whole parallelism. Raises UserError for jobs < 1 or more
    workers than GPUs."""
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if gpus > 0:
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
        ids = ids[:gpus] if ids else [str(i) for i in range(gpus)]
        if jobs > len(ids):
            raise UserError(f"--jobs {jobs} asks for more workers than the {len(ids)} GPU(s) "
                            f"here (one GPU per worker); pass --jobs {len(ids)} or fewer")
        return [WorkerDevice(f"GPU {ids[k]}", {"CUDA_VISIBLE_DEVICES": ids[k]})
                for k in range(jobs)]
    threads = max(1, cpus // jobs)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    share = f"CPU, {threads} thread{'s' * (threads > 1)} of {cpus} cores"
    return [WorkerDevice(share, env, threads) for _ in range(jobs)]


def machine_devices(jobs: int) -> list[WorkerDevice]:
    """`worker_devices` for this machine: its CUDA GPUs, else the cores this process may use."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return worker_devices(jobs, gpus=gpus, cpus=cpus or 1,
                          visible=os.environ.get("CUDA_VISIBLE_DEVICES"))


# ----------------------------------------------------------------------------- the worker side
def worker_main(argv: list[str], run_study: Callable[..., Any]) -> int:
    """A worker process: `argv` = [job file, worker number, torch threads (0: default)]. Runs
    the study's claim loop with the job's study and run function; exit 0 when no run is left,
    2 on a UserError (its message is the log's last line), 130 on Ctrl-C."""
    job = pickle.loads(Path(argv[0]).read_bytes())
    if int(argv[2]) > 0:
        torch.set_num_threads(int(argv[2]))
    stamp = f"worker {argv[1]} (pid {os.getpid()})"
    print(f"{stamp}: {torch.get_num_threads()} torch threads, "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}", flush=True)
    try:
        run_study(job["study"], job["out_dir"], run_fn=job["run_fn"],
                  progress=lambda msg: print(msg, flush=True),
                  failed_before=job["failed_before"], lease_seconds=job["lease_seconds"],
                  poll_seconds=job["poll_seconds"])
    except UserError as exc:
        print(f"error: {exc}", flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{stamp}: interrupted", flush=True)
        return EXIT_INTERRUPTED
    print(f"{stamp}: no run left", flush=True)
    return 0


# ----------------------------------------------------------------------------- the parent side
@dataclass
class _Slot:
    """One worker place: its device, log file and the process running in it (None: done)."""

    index: int
    device: WorkerDevice
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0


def _start(slot: _Slot, job: Path) -> None:
    env = {**os.environ, **slot.device.env}
    with slot.log.open("a") as log:
        log.write(f"\n=== worker {slot.index} start {slot.starts + 1} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {slot.device.label}\n")
        log.flush()
        slot.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_CODE, str(job), str(slot.index),
             str(slot.device.threads or 0)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)  # Ctrl-C reaches the parent only; it stops the workers
    slot.starts += 1


def _stop(slots: list[_Slot]) -> None:
    """Ctrl-C: SIGINT every live worker (it marks its run interrupted), SIGKILL the stragglers."""
    live = [s.proc for s in slots if s.proc is not None and s.proc.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_SECONDS
    for proc in live:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].removeprefix("error: ") if lines else "(no output)"


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def study_counts(study: Study, out_dir: Path, db: ResultsDB, failed_before: float,
                 lease_seconds: float) -> dict[str, Any]:
    """{done, failed, running, left, rows}: the study's runs finished (or failed since
    `failed_before`), of those failed, held under a live lease, and neither."""
    counts: dict[str, Any] = {"done": 0, "failed": 0, "running": 0, "left": 0, "rows": {}}
    for spec in run_matrix(study, out_dir):
        row = db.get(spec.run_id)
        counts["rows"][spec.run_id] = (spec, row)
        if run_done(row, spec, failed_before):
            counts["done"] += 1
            counts["failed"] += row is not None and row["status"] == "failed"
        elif row is not None and lease_alive(row, lease_seconds=lease_seconds):
            counts["running"] += 1
        else:
            counts["left"] += 1
    return counts


class StudyDisplay:
    """The parent's view of a study run by workers: a line per run that ends, and the runs
    done / running / left with the elapsed time and an ETA (elapsed per run done so far, times
    the runs still open). On a terminal the counts are a tqdm bar on stderr, else a plain line
    whenever they change."""

    def __init__(self, name: str, total: int, done0: int, say: Callable[[str], None], *,
                 bar: bool, stream: TextIO | None = None) -> None:
        self.name, self.total, self.done0, self.say = name, total, done0, say
        self.t0 = time.perf_counter()
        self.last: tuple[int, int, int] | None = None
        self.ended: set[str] = set()
        stream = stream if stream is not None else sys.stderr
        self.bar: Any = None
        if bar and stream.isatty() and total > done0:
            from tqdm import tqdm

            self.bar = tqdm(total=total - done0, desc=f"study {name}", unit="run",
                            file=stream, dynamic_ncols=True, leave=True)

    def line(self, counts: dict[str, Any]) -> str:
        spent = time.perf_counter() - self.t0
        finished_here = counts["done"] - self.done0
        open_ = counts["running"] + counts["left"]
        eta = (time.strftime("%H:%M:%S", time.gmtime(spent / finished_here * open_))
               if finished_here > 0 else "-")
        failed = f" ({counts['failed']} failed)" if counts["failed"] else ""
        return (f"study {self.name}: {counts['done']}/{self.total} runs done{failed}, "
                f"{counts['running']} running, {counts['left']} left; "
                f"{time.strftime('%H:%M:%S', time.gmtime(spent))} elapsed, ETA {eta}")

    def update(self, counts: dict[str, Any], failed_before: float) -> None:
        for run_id, (spec, row) in counts["rows"].items():
            if run_id not in self.ended and run_done(row, spec, failed_before):
                self.ended.add(run_id)
                if float(row["updated_at"]) >= failed_before:  # not finished earlier
                    self._print(_ended(spec, row))
        key = (counts["done"], counts["running"], counts["left"])
        if key == self.last:
            return
        self.last = key
        if self.bar is not None:
            self.bar.n = counts["done"] - self.done0
            self.bar.set_postfix_str(f"{counts['running']} running, {counts['left']} left")
        else:
            self._print(self.line(counts))

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.say(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ended(spec: RunSpec, row: dict[str, Any]) -> str:
    secs = (row.get("costs") or {}).get("train_seconds")
    took = f" ({secs:.0f} s training)" if isinstance(secs, (int, float)) and secs > 0 else ""
    error = f": {row['error']}" if row["status"] == "failed" and row.get("error") else ""
    return f"{spec.strategy} seed {spec.seed}: {row['status']}{took}{error}"


def run_jobs(study: Study, out_dir: str | os.PathLike, jobs: int, *,
             progress: Callable[[str], None] = print, bar: bool = False,
             run_fn: Callable[[dict[str, Any], bool], dict[str, Any]] | None = None,
             devices: list[WorkerDevice] | None = None, lease_seconds: float = LEASE_SECONDS,
             poll_seconds: float = 1.0, restarts: int | None = None) -> list[dict[str, Any]]:
    """Run the study's missing runs with `jobs` worker processes on this machine
    (`machine_devices`, or `devices`); return the database rows of all its runs. `run_fn`
    (picklable: a module-level function; default `runner.default_run_fn`) trains one run in
    a worker. A worker that dies while runs remain is started again, at most `restarts` times
    in all (default 2 per worker); its run is taken over (its pid is dead) and resumed.
    Raises UserError (after stopping the others) when a worker stops on one, and
    KeyboardInterrupt after stopping every worker."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    devices = devices if devices is not None else machine_devices(jobs)
    if run_fn is None:
        check_configs(study, out_dir)
    since = time.time()
    with ResultsDB(out_dir / DB_NAME) as db:
        db.save_study(study.name, study_summary(study), study.path)
        actions = list(plan(study, out_dir, db))
        todo = sum(a != "skip" for _, a in actions)
        progress(study_header(study, todo, out_dir))
        if todo == 0:
            return db.list_runs(study=study.name)
        logs = out_dir / LOG_DIR
        logs.mkdir(exist_ok=True)
        job = logs / f"job-{os.getpid()}.pkl"
        job.write_bytes(pickle.dumps({
            "study": study, "out_dir": str(out_dir), "run_fn": run_fn, "failed_before": since,
            "lease_seconds": lease_seconds, "poll_seconds": poll_seconds}))
        slots = [_Slot(k, d, logs / f"worker-{k}.log")
                 for k, d in enumerate(devices[:min(jobs, todo)], 1)]
        progress(f"{len(slots)} workers: " + "; ".join(f"{s.index}: {s.device.label}"
                                                        for s in slots)
                 + f"; each worker's output: {logs}/worker-K.log")
        t0 = time.perf_counter()
        counts = study_counts(study, out_dir, db, since, lease_seconds)
        display = StudyDisplay(study.name, len(actions), counts["done"], progress, bar=bar)
        try:
            for slot in slots:
                _start(slot, job)
            _watch(slots, job, study, out_dir, db, display, since, lease_seconds, poll_seconds,
                   2 * len(slots) if restarts is None else restarts, progress)
        except BaseException:
            _stop(slots)
            raise
        finally:
            display.close()
            job.unlink(missing_ok=True)
        display.update(study_counts(study, out_dir, db, since, lease_seconds), since)
        progress(f"study '{study.name}' done in {time.perf_counter() - t0:.0f} s")
        return db.list_runs(study=study.name)


def _watch(slots: list[_Slot], job: Path, study: Study, out_dir: Path, db: ResultsDB,
           display: StudyDisplay, since: float, lease_seconds: float, poll_seconds: float,
           restarts: int, say: Callable[[str], None]) -> None:
    """Poll the workers and the database until every worker has exited with nothing left;
    restart a worker that died while runs remain (up to `restarts` in all)."""
    while any(s.proc is not None for s in slots):
        time.sleep(poll_seconds)
        counts = study_counts(study, out_dir, db, since, lease_seconds)
        display.update(counts, since)
        for slot in slots:
            code = None if slot.proc is None else slot.proc.poll()
            if code is None or slot.proc is None:
                continue
            pid, slot.proc = slot.proc.pid, None
            if code == 0:
                continue
            if code == EXIT_USER_ERROR:
                raise UserError(f"worker {slot.index}: {_last_line(slot.log)} "
                                f"(log: {slot.log})")
            remaining = counts["running"] + counts["left"]
            text = f"worker {slot.index} (pid {pid}) died ({_how(code)}); log {slot.log}"
            if remaining and restarts > 0:
                restarts -= 1
                say(f"{text}; starting it again (its run is taken over and resumes from its "
                    "last checkpoint)")
                _start(slot, job)
            elif remaining:
                say(f"{text}; no restarts left, the other workers carry on")
            else:
                say(text)
    counts = study_counts(study, out_dir, db, since, lease_seconds)
    if counts["left"] + counts["running"]:
        say(f"{counts['left'] + counts['running']} run(s) not done: every worker stopped;"
            " run the same command again to finish them")
