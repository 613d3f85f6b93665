"""Claiming a study's runs under leases, so that any number of processes share one study.

A process (a `loralab compare`, a `--jobs` worker, a Ray driver) trains a run only once it
holds the run's lease in the results database (`ResultsDB.claim`, one transaction), and it
decides what to do with the run (ingest a finished record, resume from a checkpoint, or train)
only after that, under the lease: another process may have finished, checkpointed or died in
the meantime. While the run trains, a `Heartbeat` thread renews the lease; a process that dies
leaves a lease that goes dead (its pid gone on this host, or its heartbeat too old), and the
next process to look takes the run over and resumes it from its last checkpoint.

    claim_next   the first run of the plan this process can take now, and what to do with it
    open_runs    the runs not done yet (claimable, or held by someone): wait while any remain
    Heartbeat    a daemon thread with its own connection that keeps several leases alive
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from loralab.results.database import LEASE_SECONDS, Owner, ResultsDB, lease_alive
from loralab.study.plan import RunSpec, disk_action, run_matrix
from loralab.study.spec import Study

HEARTBEAT_SECONDS = 15.0
"""How often a lease holder renews its leases: well inside `LEASE_SECONDS`, so a busy
database or a slow step never lets a live lease look dead."""


def claim_run(spec: RunSpec, study: str, db: ResultsDB, owner: Owner, *,
              failed_before: float | None = None, lease_seconds: float = LEASE_SECONDS
              ) -> str | None:
    """Claim one run for `owner` and decide under the lease what to do with it: 'ingest',
    'resume' or 'train' (`plan.disk_action`); None when the claim is refused (finished,
    held live by another owner, or failed since `failed_before`)."""
    claim = db.claim(spec, study, owner, lease_seconds=lease_seconds,
                     failed_before=failed_before)
    return None if claim is None else disk_action(spec)


def claim_next(study: Study, out_dir: str | os.PathLike, db: ResultsDB, owner: Owner, *,
               skip: Iterable[str] = (), failed_before: float | None = None,
               lease_seconds: float = LEASE_SECONDS) -> tuple[RunSpec, str] | None:
    """The first run of the study's plan (seed-major) not in `skip` (run ids) that `owner`
    could claim, with its action (`claim_run`); None when none can be claimed now (see
    `open_runs` for whether any remain). An owner may re-claim a lease it holds, so a driver
    with several runs in flight passes them in `skip`."""
    skipped = set(skip)
    for spec in run_matrix(study, Path(out_dir)):
        if spec.run_id in skipped:
            continue
        action = claim_run(spec, study.name, db, owner, failed_before=failed_before,
                           lease_seconds=lease_seconds)
        if action is not None:
            return spec, action
    return None


def run_done(row: dict[str, Any] | None, spec: RunSpec, failed_before: float | None) -> bool:
    """Is this run over for a process started at `failed_before`: finished with the spec's
    config, or failed since then (nobody retries it in this invocation)?"""
    if row is None:
        return False
    if row["status"] == "finished" and row.get("config_hash") == spec.config_hash:
        return True
    return (row["status"] == "failed" and failed_before is not None
            and float(row["updated_at"]) >= failed_before)


def open_runs(study: Study, out_dir: str | os.PathLike, db: ResultsDB, *,
              failed_before: float | None = None) -> list[RunSpec]:
    """The runs of the study not done yet (`run_done`): claimable now or held by some owner.
    When `claim_next` finds nothing and this is not empty, other processes hold the rest:
    wait for them to finish or for their leases to die."""
    return [spec for spec in run_matrix(study, Path(out_dir))
            if not run_done(db.get(spec.run_id), spec, failed_before)]


def holders(specs: Iterable[RunSpec], db: ResultsDB, *,
            lease_seconds: float = LEASE_SECONDS) -> dict[str, str]:
    """{run_id: "host pid N"} of the runs held under a live lease, for messages."""
    out = {}
    for spec in specs:
        row = db.get(spec.run_id)
        if row is not None and lease_alive(row, lease_seconds=lease_seconds):
            out[spec.run_id] = f"{row['host']} pid {row['pid']}"
    return out


class Heartbeat:
    """Keeps `owner`'s leases on `run_ids` alive while it is open: a daemon thread, with its own
    database connection, renews each one every `every` seconds (`ResultsDB.heartbeat`). A
    lease found lost (another owner took the run over after this process stalled for longer
    than the lease) is dropped and listed in `lost`; its run's result must not be recorded.

        with Heartbeat(db.path, owner, [spec.run_id]):
            record = train(...)
    """

    def __init__(self, db_path: str | os.PathLike, owner: Owner, run_ids: Iterable[str] = (),
                 *, every: float = HEARTBEAT_SECONDS) -> None:
        self.db_path, self.owner, self.every = Path(db_path), owner, every
        self._ids = set(run_ids)
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="loralab-heartbeat",
                                        daemon=True)

    def add(self, run_id: str) -> None:
        with self._lock:
            self._ids.add(run_id)
            self._lost.discard(run_id)

    def discard(self, run_id: str) -> None:
        with self._lock:
            self._ids.discard(run_id)

    @property
    def lost(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._lost)

    def _beat(self) -> None:
        db = ResultsDB(self.db_path)
        try:
            while not self._stop.wait(self.every):
                with self._lock:
                    ids = sorted(self._ids)
                for run_id in ids:
                    try:
                        held = db.heartbeat(run_id, self.owner)
                    except Exception:  # a locked or busy database: try again next beat
                        continue
                    if not held:
                        with self._lock:
                            if run_id in self._ids:  # not released in the meantime
                                self._ids.discard(run_id)
                                self._lost.add(run_id)
        finally:
            db.close()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.every))
