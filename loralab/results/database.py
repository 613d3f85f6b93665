"""The results database: one SQLite row per run, in the study's output directory.

Why SQLite: a study is long and can be killed at any moment, and two studies may write to the
same directory at once. SQLite in WAL mode gives atomic transactions (a killed writer leaves the
previous committed state), lets readers run while a writer writes, and `busy_timeout` makes a
second writer wait for the lock instead of failing. Every write is one short `BEGIN IMMEDIATE`
transaction; nothing holds the lock while training.

Schema (JSON columns hold the parts of the run record, `loralab.training.record.Record`, as
record.json has them; `config` keeps both the study's run config and the record's TrainConfig):
    runs(run_id PK, study, strategy, seed, status, config_hash, config, metrics, costs, curves,
         artifacts, env, notes, quant, run_dir, error, traceback, created_at, started_at,
         finished_at, updated_at)
    (`quant`: the record's quantization section of qat-lora / qlora / lora-ptq runs, NULL
    otherwise; added in schema version 2, older databases get the column on open.)
    (`owner, host, pid, heartbeat`: the lease of a `running` run, NULL otherwise; added in
    schema version 3.)
    studies(name PK, config, path, updated_at)

Leases: several processes (`compare` processes, `--jobs` workers, a Ray driver) share one
study. A process trains a run only after `claim` gave it the run's lease, in one transaction
that reads the row and writes the new owner; it keeps the lease alive with `heartbeat` while
it trains, and `record_run` / `set_status` release it. A lease is dead when its heartbeat is
older than `lease_seconds` or, on this host, when its process is gone; a dead lease is taken
over (the run resumes from its checkpoint), a live one never is. Every change is one
transaction, so a process killed at any point leaves whole rows.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loralab.errors import UserError

SCHEMA_VERSION = 3
DB_NAME = "results.sqlite"
STATUSES = ("pending", "running", "finished", "failed", "interrupted")
_JSON_COLUMNS = ("config", "metrics", "costs", "curves", "artifacts", "env", "notes", "quant")
LEASE_SECONDS = 90.0
"""A lease whose heartbeat is older than this is dead (its owner stopped without a trace)."""
_LEASE_COLUMNS = {"owner": "TEXT", "host": "TEXT", "pid": "INTEGER", "heartbeat": "REAL"}
_NO_LEASE = "owner=NULL, host=NULL, pid=NULL, heartbeat=NULL"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    study       TEXT NOT NULL,
    strategy    TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    status      TEXT NOT NULL,
    config_hash TEXT,
    config      TEXT,
    metrics     TEXT,
    costs       TEXT,
    curves      TEXT,
    artifacts   TEXT,
    env         TEXT,
    notes       TEXT,
    quant       TEXT,
    run_dir     TEXT,
    owner       TEXT,
    host        TEXT,
    pid         INTEGER,
    heartbeat   REAL,
    error       TEXT,
    traceback   TEXT,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_study ON runs(study, strategy, seed);
CREATE TABLE IF NOT EXISTS studies (
    name       TEXT PRIMARY KEY,
    config     TEXT NOT NULL,
    path       TEXT,
    updated_at REAL NOT NULL
);
"""


class RunRow(Protocol):
    """What the database needs of a run (a `loralab.study.plan.RunSpec`): its identity, its
    study config and that config's hash."""

    @property
    def run_id(self) -> str: ...
    @property
    def strategy(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def run_dir(self) -> Path: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def config_hash(self) -> str: ...


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: a process. `owner_id` is unique per process and, for
    `Owner.here()`, `host:pid:start` with the process's start time (clock ticks since boot,
    /proc/<pid>/stat), so a pid the system reused for another process is not mistaken for the
    owner."""

    owner_id: str
    host: str
    pid: int

    @classmethod
    def here(cls) -> Owner:
        """This process (the same value on every call in one process)."""
        host, pid = socket.gethostname(), os.getpid()
        stat = _proc_stat(pid)
        return cls(f"{host}:{pid}:{stat[1] if stat else 0}", host, pid)


@dataclass(frozen=True)
class Claim:
    """A granted claim: the run's row as the claim found it. `previous_owner` is the owner of
    the (dead) lease taken over, None for a fresh row or one without a lease."""

    run_id: str
    previous_status: str | None
    previous_owner: Owner | None

    @property
    def taken_over(self) -> bool:
        """The run was `running` under another owner's lease, now dead: resume it."""
        return self.previous_status == "running" and self.previous_owner is not None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc/<pid>/stat; None when the
    process does not exist or there is no /proc (not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name (field 2) may hold spaces
    return fields[0], fields[19]  # fields 3 (state) and 22 (starttime)


def process_alive(pid: int, owner_id: str = "") -> bool:
    """Is process `pid` of this host alive and the one `owner_id` names? A zombie (exited, not
    yet reaped) is dead; so is a reused pid whose start time differs from the one in an
    `Owner.here()` id. Without /proc: `os.kill(pid, 0)`."""
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False  # Linux, and no such process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by another user
        return True
    state, start = stat
    if state in ("Z", "X"):
        return False
    parts = owner_id.rsplit(":", 2)
    if len(parts) == 3 and parts[1] == str(pid) and parts[2].isdigit() and parts[2] != "0":
        return parts[2] == start
    return True


def lease_alive(row: dict[str, Any], *, now: float | None = None,
                lease_seconds: float = LEASE_SECONDS) -> bool:
    """Is the row (`ResultsDB.get`) `running` under a live lease? Live: an owner, a heartbeat at
    most `lease_seconds` old (wall clock: hosts sharing a study must keep their clocks in
    step) and, when the owner is on this host, its process alive (`process_alive`). A running
    row without an owner (written by an older loralab, or `set_status`) has no live lease."""
    if row.get("status") != "running" or not row.get("owner") or row.get("heartbeat") is None:
        return False
    if (time.time() if now is None else now) - float(row["heartbeat"]) > lease_seconds:
        return False
    if row.get("host") == socket.gethostname() and row.get("pid") is not None:
        return process_alive(int(row["pid"]), str(row["owner"]))
    return True


def find_db(path: str | Path) -> Path:
    """A study output dir or a .sqlite file -> the database path (UserError if absent)."""
    path = Path(path)
    db = path / DB_NAME if path.is_dir() else path
    if not db.is_file():
        # `compare --out OUT` writes each study to OUT/<study name>/: name those folders
        studies = sorted(p.parent for p in path.glob(f"*/{DB_NAME}")) if path.is_dir() else []
        if studies:
            raise UserError(f"{path} holds the results of "
                            f"{', '.join(repr(p.name) for p in studies)}; pass a study's folder, "
                            f"e.g. {studies[0]}")
        raise UserError(f"no results database at {db}; run `loralab compare STUDY.yaml --out "
                        f"{path}` first (it writes {path}/<study name>/), or pass the study's "
                        "output directory")
    return db


class ResultsDB:
    """A small transactional store of run rows. Safe across processes; one per process."""

    def __init__(self, path: str | Path, *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so every write transaction
        # takes the write lock up front (no lock upgrades, hence no SQLITE_BUSY deadlocks).
        self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints
        with self.transaction():
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                self.conn.execute(stmt)
            cols = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
            if "quant" not in cols:  # a version-1 database: add the column, keep every row
                self.conn.execute("ALTER TABLE runs ADD COLUMN quant TEXT")
            for col, kind in _LEASE_COLUMNS.items():  # version 2: add the lease, keep the rows
                if col not in cols:
                    self.conn.execute(f"ALTER TABLE runs ADD COLUMN {col} {kind}")
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- plumbing
    def transaction(self):
        return _Tx(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writes
    def save_study(self, name: str, config: dict[str, Any], path: str | None) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT INTO studies(name, config, path, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET config=excluded.config, path=excluded.path, "
                "updated_at=excluded.updated_at",
                (name, json.dumps(config, default=str), path, time.time()))

    def start_run(self, spec: RunRow, study: str) -> None:
        """Mark a run `running` (creating its row) without a lease, clearing any earlier error
        (`claim` is how a process takes a run it will train)."""
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "INSERT INTO runs(run_id, study, strategy, seed, status, config_hash, config, "
                "run_dir, created_at, started_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(run_id) DO UPDATE SET status=excluded.status, "
                "config_hash=excluded.config_hash, config=excluded.config, "
                "run_dir=excluded.run_dir, started_at=excluded.started_at, error=NULL, "
                f"traceback=NULL, {_NO_LEASE}, updated_at=excluded.updated_at",
                (spec.run_id, study, spec.strategy, spec.seed, "running", spec.config_hash,
                 json.dumps({"study": spec.config, "train": None}, default=str),
                 str(spec.run_dir), now, now, now))

    def claim(self, spec: RunRow, study: str, owner: Owner, *,
              lease_seconds: float = LEASE_SECONDS, failed_before: float | None = None
              ) -> Claim | None:
        """Take the run's lease, in one transaction that reads its row and writes the new owner
        (status running, owner/host/pid, heartbeat now, the spec's config and hash), or refuse
        (None) when the run is finished with the same config hash, `running` under a live
        lease of another owner (`lease_alive`), or failed at or after `failed_before` (a run
        that failed in this invocation is not retried by its sibling processes). An owner may
        re-claim its own lease. Returns what the claim found (`Claim`)."""
        now = time.time()
        with self.transaction():
            found = self.conn.execute("SELECT * FROM runs WHERE run_id = ?",
                                      (spec.run_id,)).fetchone()
            row = dict(found) if found is not None else None
            if row is not None:
                if row["status"] == "finished" and row["config_hash"] == spec.config_hash:
                    return None
                if (row["status"] == "failed" and failed_before is not None
                        and row["updated_at"] >= failed_before):
                    return None
                if (row["owner"] != owner.owner_id
                        and lease_alive(row, now=now, lease_seconds=lease_seconds)):
                    return None
            self.conn.execute(
                "INSERT INTO runs(run_id, study, strategy, seed, status, config_hash, config, "
                "run_dir, owner, host, pid, heartbeat, created_at, started_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(run_id) DO UPDATE SET status=excluded.status, "
                "config_hash=excluded.config_hash, config=excluded.config, "
                "run_dir=excluded.run_dir, owner=excluded.owner, host=excluded.host, "
                "pid=excluded.pid, heartbeat=excluded.heartbeat, "
                "started_at=excluded.started_at, error=NULL, traceback=NULL, "
                "updated_at=excluded.updated_at",
                (spec.run_id, study, spec.strategy, spec.seed, "running", spec.config_hash,
                 json.dumps({"study": spec.config, "train": None}, default=str),
                 str(spec.run_dir), owner.owner_id, owner.host, owner.pid, now, now, now, now))
        previous = None
        if row is not None and row["owner"] and row["owner"] != owner.owner_id:
            previous = Owner(row["owner"], row["host"] or "", int(row["pid"] or 0))
        return Claim(spec.run_id, row["status"] if row else None, previous)

    def heartbeat(self, run_id: str, owner: Owner) -> bool:
        """Renew `owner`'s lease on the run (heartbeat = now); False when it no longer holds
        it (another process took the run over, or its status changed)."""
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE runs SET heartbeat = ? WHERE run_id = ? AND owner = ? AND "
                "status = 'running'", (time.time(), run_id, owner.owner_id))
            return cur.rowcount == 1

    def _holds(self, run_id: str, owner: Owner | None) -> bool:
        """Inside a transaction: does `owner` hold the run's lease (None: no check)?"""
        if owner is None:
            return True
        row = self.conn.execute("SELECT owner FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row is not None and row["owner"] == owner.owner_id

    def record_run(self, spec: RunRow, record: dict[str, Any], *, status: str = "finished",
                   study: str | None = None, owner: Owner | None = None) -> bool:
        """Store a run record (the dict `loralab.training.loop.train` returns and record.json
        holds) under the spec's run_id and release its lease. With `owner`, only if that
        owner holds the lease: False (nothing written) when it lost it. Raises ValueError for
        an unknown status."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = time.time()
        study = study or spec.run_id.split("/")[0]
        values = {c: json.dumps(record.get(c), default=str) for c in _JSON_COLUMNS
                  if c != "config"}
        # Keep both: the study's view of the run and the TrainConfig that train.py recorded.
        values["config"] = json.dumps({"study": spec.config, "train": record.get("config")},
                                      default=str)
        with self.transaction():
            if not self._holds(spec.run_id, owner):
                return False
            self.conn.execute(
                "INSERT INTO runs(run_id, study, strategy, seed, status, config_hash, config, "
                "metrics, costs, curves, artifacts, env, notes, quant, run_dir, created_at, "
                "finished_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(run_id) DO UPDATE SET status=excluded.status, "
                "config_hash=excluded.config_hash, config=excluded.config, "
                "metrics=excluded.metrics, costs=excluded.costs, curves=excluded.curves, "
                "artifacts=excluded.artifacts, env=excluded.env, notes=excluded.notes, "
                "quant=excluded.quant, "
                "run_dir=excluded.run_dir, finished_at=excluded.finished_at, error=NULL, "
                f"traceback=NULL, {_NO_LEASE}, updated_at=excluded.updated_at",
                (spec.run_id, study, spec.strategy, spec.seed, status, spec.config_hash,
                 values["config"], values["metrics"], values["costs"], values["curves"],
                 values["artifacts"], values["env"], values["notes"], values["quant"],
                 str(spec.run_dir), now,
                 now if status == "finished" else None, now))
        return True

    def set_status(self, run_id: str, status: str, *, error: str | None = None,
                   traceback_text: str | None = None, owner: Owner | None = None) -> bool:
        """Set a run's status (and error) and release its lease. With `owner`, only if that
        owner holds the lease: False (nothing written) when it lost it. Raises ValueError for
        an unknown status."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self.transaction():
            if not self._holds(run_id, owner):
                return False
            cur = self.conn.execute(f"UPDATE runs SET status=?, error=?, traceback=?, "
                                    f"{_NO_LEASE}, updated_at=? WHERE run_id=?",
                                    (status, error, traceback_text, time.time(), run_id))
            return cur.rowcount == 1

    # -- reads
    def get(self, run_id: str) -> dict[str, Any] | None:
        cur = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        return _decode(row) if row else None

    def list_runs(self, *, study: str | None = None, status: str | None = None,
                  strategy: str | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        for col, val in (("study", study), ("status", status), ("strategy", strategy)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY study, created_at, seed"
        return [_decode(r) for r in self.conn.execute(sql, args).fetchall()]

    def studies(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM studies ORDER BY updated_at").fetchall()
        return [{"name": r["name"], "config": json.loads(r["config"]), "path": r["path"],
                 "updated_at": r["updated_at"]} for r in rows]

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (including KeyboardInterrupt)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for col in _JSON_COLUMNS:
        if out.get(col) is not None:
            out[col] = json.loads(out[col])
    return out
