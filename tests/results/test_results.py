"""The results database: round trips, filters, rollback, two processes writing at once, and
leases (claim, heartbeat, takeover, exactly-once claims from several processes)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import socket
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from loralab.errors import UserError
from loralab.results.database import Owner, ResultsDB, find_db, lease_alive, process_alive


@dataclass(frozen=True)
class Spec:
    """What the database needs of a run (`RunRow`), without importing the study layer (and
    torch) into the processes these tests spawn."""

    run_id: str
    strategy: str
    seed: int
    run_dir: Path
    config: dict

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]


def spec(study: str, strategy: str, seed: int, root: Path) -> Spec:
    return Spec(run_id=f"{study}/{strategy}/seed{seed}", strategy=strategy, seed=seed,
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
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == 3
        cols = {r[1] for r in db.conn.execute("PRAGMA table_info(runs)")}
        assert {"owner", "host", "pid", "heartbeat"} <= cols
        assert db.integrity_ok()


# ----------------------------------------------------------------------------- leases
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_claim_refuses_a_live_lease_and_takes_over_dead_ones(tmp_path):
    host = socket.gethostname()
    me = Owner.here()
    assert me == Owner.here() and me.pid == os.getpid() and me.host == host
    other = Owner("elsewhere:1:1", "another-host", 1)
    s = spec("st", "a", 0, tmp_path)
    with ResultsDB(tmp_path / "r.sqlite") as db:
        first = db.claim(s, "st", me)
        assert first is not None and first.previous_status is None and not first.taken_over
        row = db.get(s.run_id)
        assert (row["status"], row["owner"], row["host"], row["pid"]) == (
            "running", me.owner_id, host, me.pid)
        assert lease_alive(row)
        assert db.claim(s, "st", other) is None  # live: this process, fresh heartbeat
        assert db.claim(s, "st", me) is not None  # an owner may re-claim its own lease
        assert db.heartbeat(s.run_id, me) and not db.heartbeat(s.run_id, other)

        # dead by heartbeat age (an owner on another host: only the heartbeat tells)
        db.conn.execute("UPDATE runs SET owner=?, host=?, pid=?, heartbeat=? WHERE run_id=?",
                        (other.owner_id, other.host, other.pid, time.time() - 50, s.run_id))
        assert db.claim(s, "st", me, lease_seconds=60) is None
        taken = db.claim(s, "st", me, lease_seconds=30)
        assert taken is not None and taken.taken_over and taken.previous_owner == other
        assert not db.heartbeat(s.run_id, other)  # the old owner learns it lost the lease

        # dead by pid on this host, although its heartbeat is fresh
        pid = _dead_pid()
        db.conn.execute("UPDATE runs SET owner=?, host=?, pid=?, heartbeat=? WHERE run_id=?",
                        (f"{host}:{pid}:1", host, pid, time.time(), s.run_id))
        assert not lease_alive(db.get(s.run_id))
        assert db.claim(s, "st", other).taken_over
        # a running row without an owner (an older loralab) has no live lease
        db.set_status(s.run_id, "running")
        assert db.get(s.run_id)["owner"] is None
        again = db.claim(s, "st", other)
        assert again is not None and again.previous_status == "running" and not again.taken_over


def test_process_alive_sees_zombies_and_reused_pids():
    me = Owner.here()
    assert process_alive(me.pid, me.owner_id)
    host, pid, start = me.owner_id.rsplit(":", 2)
    assert not process_alive(me.pid, f"{host}:{pid}:{int(start) + 1}")  # a reused pid
    assert process_alive(me.pid, "any-id-of-another-form")
    assert not process_alive(_dead_pid())
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.01)
    assert not process_alive(zombie.pid)  # exited, not yet reaped
    zombie.wait()


def test_only_the_lease_holder_records_and_finished_or_failed_runs_are_refused(tmp_path):
    me, other = Owner.here(), Owner("x:2:2", "another-host", 2)
    s = spec("st", "a", 0, tmp_path)
    with ResultsDB(tmp_path / "r.sqlite") as db:
        db.claim(s, "st", me)
        assert not db.record_run(s, record(0), study="st", owner=other)
        assert not db.set_status(s.run_id, "failed", error="x", owner=other)
        row = db.get(s.run_id)
        assert row["status"] == "running" and row["metrics"] is None and row["owner"]
        assert db.record_run(s, record(0), study="st", owner=me)
        row = db.get(s.run_id)
        assert row["status"] == "finished" and row["metrics"] == {"v": {"loss": 1.5}}
        assert (row["owner"], row["host"], row["pid"], row["heartbeat"]) == (None,) * 4
        assert db.claim(s, "st", other) is None  # finished with the same config
        changed = Spec(s.run_id, s.strategy, s.seed, s.run_dir, {**s.config, "rank": 4})
        assert db.claim(changed, "st", other).previous_status == "finished"
        # failed: retried by a later invocation, not by one started before it failed
        assert db.set_status(s.run_id, "failed", error="boom", owner=other)
        failed_at = db.get(s.run_id)["updated_at"]
        assert db.claim(changed, "st", me, failed_before=failed_at - 10) is None
        assert db.claim(changed, "st", me, failed_before=failed_at + 10) is not None
        assert db.integrity_ok()


def _claimer(path: str, n: int, barrier, out: str) -> None:
    """Claim every run of the study, training (recording) those it gets."""
    db = ResultsDB(path, timeout=60)
    me = Owner.here()
    got = []
    barrier.wait()
    for _ in range(2):  # a second sweep: everything must be refused by then
        for i in range(n):
            s = spec("st", f"s{i}", 0, Path(path).parent)
            if db.claim(s, "st", me, lease_seconds=60) is not None:
                got.append(s.run_id)
                time.sleep(0.01)
                assert db.heartbeat(s.run_id, me)
                assert db.record_run(s, record(i), study="st", owner=me)
    db.close()
    Path(out).write_text("\n".join(got))


def test_concurrent_claims_from_several_processes_take_each_run_once(tmp_path):
    path = str(tmp_path / "results.sqlite")
    ResultsDB(path).close()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    n = 40
    outs = [str(tmp_path / f"got{k}.txt") for k in range(4)]
    procs = [ctx.Process(target=_claimer, args=(path, n, barrier, out)) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * 4
    got = [line for out in outs for line in Path(out).read_text().split("\n") if line]
    assert sorted(got) == sorted(f"st/s{i}/seed0" for i in range(n))  # each exactly once
    assert sum(1 for out in outs if Path(out).read_text()) >= 2  # they did share the work
    with ResultsDB(path) as db:
        assert db.integrity_ok()
        assert {r["status"] for r in db.list_runs()} == {"finished"}
