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
    studies(name PK, config, path, updated_at)
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol

from loralab.errors import UserError

SCHEMA_VERSION = 2
DB_NAME = "results.sqlite"
STATUSES = ("pending", "running", "finished", "failed", "interrupted")
_JSON_COLUMNS = ("config", "metrics", "costs", "curves", "artifacts", "env", "notes", "quant")

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
        """Mark a run `running` (creating its row), clearing any earlier error."""
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "INSERT INTO runs(run_id, study, strategy, seed, status, config_hash, config, "
                "run_dir, created_at, started_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(run_id) DO UPDATE SET status=excluded.status, "
                "config_hash=excluded.config_hash, config=excluded.config, "
                "run_dir=excluded.run_dir, started_at=excluded.started_at, error=NULL, "
                "traceback=NULL, updated_at=excluded.updated_at",
                (spec.run_id, study, spec.strategy, spec.seed, "running", spec.config_hash,
                 json.dumps({"study": spec.config, "train": None}, default=str),
                 str(spec.run_dir), now, now, now))

    def record_run(self, spec: RunRow, record: dict[str, Any], *, status: str = "finished",
                   study: str | None = None) -> None:
        """Store a run record (the dict `loralab.training.loop.train` returns and record.json
        holds) under the spec's run_id. Raises ValueError for an unknown status."""
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
                "traceback=NULL, updated_at=excluded.updated_at",
                (spec.run_id, study, spec.strategy, spec.seed, status, spec.config_hash,
                 values["config"], values["metrics"], values["costs"], values["curves"],
                 values["artifacts"], values["env"], values["notes"], values["quant"],
                 str(spec.run_dir), now,
                 now if status == "finished" else None, now))

    def set_status(self, run_id: str, status: str, *, error: str | None = None,
                   traceback_text: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self.transaction():
            self.conn.execute("UPDATE runs SET status=?, error=?, traceback=?, updated_at=? "
                              "WHERE run_id=?",
                              (status, error, traceback_text, time.time(), run_id))

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
