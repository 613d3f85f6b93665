"""The results database: round trips, filters, rollback, and two processes writing at once."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from loralab.errors import UserError
from loralab.results.database import ResultsDB, find_db
from loralab.study.plan import RunSpec


def spec(study: str, strategy: str, seed: int, root: Path) -> RunSpec:
    return RunSpec(run_id=f"{study}/{strategy}/seed{seed}", strategy=strategy, seed=seed,
                   run_dir=root / f"{strategy}-seed{seed}",
                   config={"method": "lora", "seed": seed, "strategy": strategy})


def record(seed: int) -> dict:
    return {"status": "finished", "config": {"lr": 1e-3}, "metrics": {"v": {"loss": 1.5 + seed}},
            "costs": {"trainable_params": 7}, "curves": {"train_loss": [[1, 2.0]]},
            "artifacts": {"adapter": "a"}, "env": {"torch": "x"}, "notes": ["n"]}


def test_round_trip_and_filters(tmp_path):
    with ResultsDB(tmp_path / "results.sqlite") as db:
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        for strategy in ("full", "lora"):
            for seed in (0, 1):
                s = spec("st", strategy, seed, tmp_path)
                db.start_run(s, "st")
                if strategy == "full":
                    db.record_run(s, record(seed), study="st")
        row = db.get("st/full/seed1")
        assert row["status"] == "finished" and row["metrics"] == {"v": {"loss": 2.5}}
        assert row["config"]["study"]["strategy"] == "full"
        assert row["config"]["train"] == {"lr": 1e-3}
        assert row["curves"]["train_loss"] == [[1, 2.0]]
        assert len(db.list_runs(status="running")) == 2
        assert [r["seed"] for r in db.list_runs(strategy="full")] == [0, 1]
        db.set_status("st/lora/seed0", "failed", error="boom")
        assert db.get("st/lora/seed0")["error"] == "boom"
        assert db.integrity_ok()
    assert find_db(tmp_path) == tmp_path / "results.sqlite"
    with pytest.raises(UserError, match="no results database"):
        find_db(tmp_path / "missing")
    # `compare --out OUT` writes OUT/<study>/results.sqlite: the error on OUT names the study
    # folders instead of advising the compare that was just run
    study = tmp_path / "out" / "default"
    study.mkdir(parents=True)
    (study / "results.sqlite").touch()
    with pytest.raises(UserError, match=r"holds the results of 'default'; pass a study's folder"):
        find_db(tmp_path / "out")


def test_failed_transaction_rolls_back(tmp_path):
    with ResultsDB(tmp_path / "r.sqlite") as db:
        db.start_run(spec("st", "a", 0, tmp_path), "st")
        with pytest.raises(RuntimeError):
            with db.transaction() as conn:
                conn.execute("UPDATE runs SET status='failed'")
                raise RuntimeError("killed mid-transaction")
        assert db.get("st/a/seed0")["status"] == "running"


def _writer(path: str, study: str, n: int, barrier) -> None:
    db = ResultsDB(path, timeout=60)
    barrier.wait()
    root = Path(path).parent
    for i in range(n):
        s = spec(study, f"s{i % 5}", i, root)
        db.start_run(s, study)
        db.record_run(s, record(i), study=study)
        db.list_runs(study=study)  # readers interleave with the other writer
    db.close()


def test_two_processes_writing_at_once(tmp_path):
    path = str(tmp_path / "results.sqlite")
    ResultsDB(path).close()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    n = 60
    procs = [ctx.Process(target=_writer, args=(path, name, n, barrier)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    with ResultsDB(path) as db:
        assert db.integrity_ok()
        for name in ("a", "b"):
            rows = db.list_runs(study=name)
            assert len(rows) == n
            assert all(r["status"] == "finished" for r in rows)
            assert sorted(r["metrics"]["v"]["loss"] for r in rows) == [1.5 + i for i in range(n)]
    # a plain sqlite3 client sees the same committed data
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2 * n
    con.close()


def _killer(path: str) -> None:
    db = ResultsDB(path)
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE runs SET status='failed'")
    import os

    os._exit(1)  # killed mid-transaction: nothing committed


def test_killed_writer_leaves_committed_state(tmp_path):
    path = str(tmp_path / "results.sqlite")
    with ResultsDB(path) as db:
        db.start_run(spec("st", "a", 0, tmp_path), "st")
    p = mp.get_context("spawn").Process(target=_killer, args=(path,))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 1
    with ResultsDB(path) as db:
        assert db.get("st/a/seed0")["status"] == "running"
        assert db.integrity_ok()


def test_quant_section_round_trips_and_old_databases_gain_the_column(tmp_path):
    """A qat-lora/qlora/lora-ptq record's "quant" section is stored; a run without one reads
    back None; a schema-1 database (no quant column) opens, keeps its rows and gains it."""
    path = tmp_path / "results.sqlite"
    conn = sqlite3.connect(path)  # a version-1 database, as loralab wrote it before
    conn.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, study TEXT NOT NULL, strategy TEXT NOT NULL,
            seed INTEGER NOT NULL, status TEXT NOT NULL, config_hash TEXT, config TEXT,
            metrics TEXT, costs TEXT, curves TEXT, artifacts TEXT, env TEXT, notes TEXT,
            run_dir TEXT, error TEXT, traceback TEXT, created_at REAL NOT NULL, started_at REAL,
            finished_at REAL, updated_at REAL NOT NULL);
        INSERT INTO runs(run_id, study, strategy, seed, status, metrics, created_at, updated_at)
            VALUES ('st/old/seed0', 'st', 'old', 0, 'finished', '{"v": {"loss": 1.0}}', 1, 1);
        PRAGMA user_version = 1;""")
    conn.close()
    quant = {"scheme": "int8", "quantized_model_bytes": 123,
             "merge_logit_drift": {"max_abs": 0.01}, "latency": {"merged": {"median_ms": 2.0}}}
    with ResultsDB(path) as db:
        assert db.get("st/old/seed0")["metrics"] == {"v": {"loss": 1.0}}
        assert db.get("st/old/seed0")["quant"] is None
        db.record_run(spec("st", "qat", 0, tmp_path), {**record(0), "quant": quant}, study="st")
        db.record_run(spec("st", "lora", 0, tmp_path), record(0), study="st")
        assert db.get("st/qat/seed0")["quant"] == quant
        assert db.get("st/lora/seed0")["quant"] is None
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.integrity_ok()
