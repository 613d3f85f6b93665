"""Claiming a study's runs under leases (loralab.study.leases) and the claim loop of
run_study with other owners about: a live lease is left alone and waited for, a dead one is
taken over and resumed, the heartbeat keeps a lease alive and notices when it is lost."""

from __future__ import annotations

import socket
import subprocess
import time

from loralab import study as st
from loralab.results.database import Owner, ResultsDB
from loralab.study import leases
from study_helpers import BASE, fake_run_fn

OTHER = Owner("another-host:7:7", "another-host", 7)


def test_claim_next_takes_runs_in_plan_order_and_open_runs_lists_the_rest(tmp_path):
    s = st.parse_study(BASE)
    me = Owner.here()
    with ResultsDB(tmp_path / "results.sqlite") as db:
        first = leases.claim_next(s, tmp_path, db, OTHER)
        assert first is not None and first[0].run_id == "t/untuned/seed0" and first[1] == "train"
        got = leases.claim_next(s, tmp_path, db, me)  # OTHER's lease is live: the next one
        assert got is not None and got[0].run_id == "t/head/seed0"
        # an owner may re-claim its own lease: a driver skips the runs it has in flight
        assert leases.claim_next(s, tmp_path, db, me, skip={"t/lora-r1/seed0"})[0] == got[0]
        assert leases.claim_next(s, tmp_path, db, me,
                                 skip={"t/head/seed0", "t/lora-r1/seed0"}) is None
        assert [x.run_id for x in leases.open_runs(s, tmp_path, db)] == [
            "t/untuned/seed0", "t/head/seed0", "t/lora-r1/seed0"]
        assert leases.holders(leases.open_runs(s, tmp_path, db), db) == {
            "t/untuned/seed0": "another-host pid 7", "t/head/seed0": f"{me.host} pid {me.pid}"}
        db.record_run(got[0], {"status": "finished"}, owner=me)
        assert "t/head/seed0" not in [x.run_id for x in leases.open_runs(s, tmp_path, db)]


def test_the_action_is_decided_under_the_lease(tmp_path):
    """A run another process checkpointed (and then died) resumes; one it finished but never
    recorded is ingested."""
    s = st.parse_study(BASE)
    calls: list = []
    st.run_study(s, tmp_path, run_fn=fake_run_fn(calls), progress=lambda m: None)
    spec = st.run_matrix(s, tmp_path)[1]
    with ResultsDB(tmp_path / "results.sqlite") as db:
        db.set_status(spec.run_id, "interrupted")
        assert leases.claim_run(spec, "t", db, Owner.here()) == "ingest"
        (spec.run_dir / "record.json").unlink()
        (spec.run_dir / "checkpoints").mkdir()
        (spec.run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
        assert leases.claim_run(spec, "t", db, Owner.here()) == "resume"


def test_heartbeat_keeps_a_lease_alive_and_notices_it_lost(tmp_path):
    s = st.parse_study(BASE)
    spec = st.run_matrix(s, tmp_path)[0]
    me = Owner.here()
    with ResultsDB(tmp_path / "results.sqlite") as db:
        db.claim(spec, "t", me)
        with leases.Heartbeat(db.path, me, [spec.run_id], every=0.05) as hb:
            time.sleep(0.6)
            assert time.time() - db.get(spec.run_id)["heartbeat"] < 0.4
            assert db.claim(spec, "t", OTHER, lease_seconds=0.5) is None  # still alive
            # another owner takes the run (as after a stall longer than the lease)
            db.conn.execute("UPDATE runs SET owner=? WHERE run_id=?",
                            (OTHER.owner_id, spec.run_id))
            deadline = time.time() + 5
            while spec.run_id not in hb.lost:
                assert time.time() < deadline
                time.sleep(0.02)
        assert db.get(spec.run_id)["owner"] == OTHER.owner_id


def test_run_study_leaves_live_leases_alone_and_takes_over_dead_ones(tmp_path):
    """Another process on this host holds `head` live: run_study trains the other runs, waits,
    and takes `head` over (resuming it) once that process is gone. A run held by a process
    that is already dead is taken over at once. No run directory is renamed aside."""
    s = st.parse_study(BASE)
    untuned, head, lora = st.run_matrix(s, tmp_path)
    host = socket.gethostname()
    holder = subprocess.Popen(["sleep", "1.5"])
    start = open(f"/proc/{holder.pid}/stat").read().rsplit(")", 1)[1].split()[19]
    live = Owner(f"{host}:{holder.pid}:{start}", host, holder.pid)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with ResultsDB(tmp_path / "results.sqlite") as db:
        for spec, owner in ((head, live), (lora, Owner(f"{host}:{dead.pid}:1", host, dead.pid))):
            st.prepare_run_dir(spec)
            (spec.run_dir / "checkpoints").mkdir()
            (spec.run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
            assert db.claim(spec, "t", owner) is not None
    calls: list = []
    said: list = []
    t0 = time.time()
    st.run_study(s, tmp_path, run_fn=fake_run_fn(calls), progress=said.append,
                 poll_seconds=0.2)
    holder.wait()
    assert calls == [("untuned", 0, False), ("lora-r1", 0, True), ("head", 0, True)]
    assert time.time() - t0 >= 1.0  # it waited for the live holder
    assert any("waiting for 1 run(s) held by other processes" in m and "t/head/seed0" in m
               for m in said)
    assert not list((tmp_path / "runs").glob("*.old-*"))
    with ResultsDB(tmp_path / "results.sqlite") as db:
        assert {r["status"] for r in db.list_runs()} == {"finished"}
        assert all(r["owner"] is None for r in db.list_runs())
