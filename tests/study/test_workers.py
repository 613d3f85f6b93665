"""`compare --jobs N` (loralab.study.workers) with real processes: the device of each worker,
several processes on one study training each run exactly once, and a worker killed with
SIGKILL mid-run whose run is taken over and resumed from its checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from loralab import study as st
from loralab.errors import UserError
from loralab.results.database import ResultsDB, process_alive
from loralab.study import workers
from study_helpers import BASE, fake_run_fn

REPO = Path(__file__).resolve().parents[2]


def test_worker_devices_one_gpu_each_or_a_share_of_the_cores():
    gpus = workers.worker_devices(2, gpus=4, cpus=16)
    assert [d.env for d in gpus] == [{"CUDA_VISIBLE_DEVICES": "0"},
                                     {"CUDA_VISIBLE_DEVICES": "1"}]
    assert all(d.threads is None for d in gpus)
    # the parent already sees a subset: worker k gets the k-th of those, never a shared GPU
    mapped = workers.worker_devices(2, gpus=2, cpus=16, visible="3,5")
    assert [d.env["CUDA_VISIBLE_DEVICES"] for d in mapped] == ["3", "5"]
    assert [d.label for d in mapped] == ["GPU 3", "GPU 5"]
    with pytest.raises(UserError, match=r"--jobs 3 asks for more workers than the 2 GPU\(s\)"):
        workers.worker_devices(3, gpus=2, cpus=16)
    cpu = workers.worker_devices(2, gpus=0, cpus=2)
    assert [d.threads for d in cpu] == [1, 1]
    assert cpu[0].env == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert [d.threads for d in workers.worker_devices(3, gpus=0, cpus=8)] == [2, 2, 2]
    assert workers.worker_devices(4, gpus=0, cpus=2)[0].threads == 1  # at least one
    assert workers.worker_devices(1, gpus=0, cpus=2)[0].label == "CPU, 2 threads of 2 cores"
    with pytest.raises(UserError, match="--jobs must be at least 1"):
        workers.worker_devices(0, gpus=0, cpus=2)


def counting_run_fn(config: dict, resume: bool) -> dict:
    """`fake_run_fn` logging each training to OUT/trainings.txt (one append per line: atomic
    across processes). A run does not end before a second process has started one, so the
    processes overlap however slowly they start."""
    log = Path(config["out"]).parents[1] / "trainings.txt"
    with log.open("a") as f:
        f.write(f"{config['strategy']}-seed{config['seed']} {int(resume)} {os.getpid()}\n")
    deadline = time.time() + 120
    while len({ln.split()[2] for ln in log.read_text().splitlines()}) < 2:
        assert time.time() < deadline, "no second process started a run"
        time.sleep(0.1)
    time.sleep(0.2)
    return fake_run_fn([])(config, resume)


STUDY_SCRIPT = """
import sys
from loralab import study as st
from test_workers import counting_run_fn
spec = st.parse_study(open(sys.argv[1]).read())
st.run_study(spec, sys.argv[2], run_fn=counting_run_fn, poll_seconds=0.2)
"""


@pytest.mark.slow
def test_jobs_and_another_process_share_a_study_each_run_once(tmp_path, monkeypatch):
    """`run_jobs` with 2 worker processes and, at the same time, another process running the
    same study: every run is trained once, nothing renamed aside, the database intact."""
    text = BASE.replace("seeds: 1", "seeds: 3")
    (tmp_path / "s.yaml").write_text(text)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "tests" / "study"), os.environ.get("PYTHONPATH", "")])}
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    other = subprocess.Popen([sys.executable, "-c", STUDY_SCRIPT, str(tmp_path / "s.yaml"),
                              str(out)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    said: list = []
    rows = workers.run_jobs(st.parse_study(text), out, 2, run_fn=counting_run_fn,
                            progress=said.append, poll_seconds=0.2)
    assert other.wait(timeout=300) == 0, other.stdout.read() if other.stdout else ""
    trained = [line.split() for line in (out / "trainings.txt").read_text().splitlines()]
    counts = Counter(name for name, _, _ in trained)
    assert sorted(counts) == sorted(f"{s}-seed{n}" for s in ("untuned", "head", "lora-r1")
                                    for n in range(3))
    assert set(counts.values()) == {1}  # each run trained exactly once
    assert {resume for _, resume, _ in trained} == {"0"}
    assert len({pid for _, _, pid in trained}) >= 2  # the processes shared the work
    assert len(rows) == 9 and {r["status"] for r in rows} == {"finished"}
    assert not list((out / "runs").glob("*.old-*"))
    assert any(re.match(r"study t: 9/9 runs done, 0 running, 0 left", m) for m in said)
    assert not list((out / "workers").glob("job-*.pkl"))
    with ResultsDB(out / "results.sqlite") as db:
        assert db.integrity_ok()


# ----------------------------------------------------------------------------- real training
TINY = """\
name: jobs
model: minilm-l6
task: classify
num_labels: 2
data: {name: rt-snippets, fraction: 0.02}
eval: [{name: rt-snippets, data: rt-snippets, max_examples: 16}]
budget: {max_steps: MAX_STEPS, batch_size: 8, seq_len: 32, lr: 1.0e-3, eval_every: 1000,
         eval_batches: 1, eval_max_examples: 16}
train_options: {checkpoint_every: 2}
seeds: 2
strategies:
  - {name: head, method: head}
  - {name: lora-r2, method: lora, preset: qv, rank: 2, alpha: 4}
"""
RUN_LINE = re.compile(r"\[\d+/\d+\] (\S+) seed (\d+): (training|resuming from checkpoint) \(")


def _need_minilm() -> None:
    try:
        from loralab.models.loading import load_tokenizer

        load_tokenizer("minilm-l6")
    except UserError as exc:
        pytest.skip(f"bundled minilm-l6 not installed: {exc}")


def _compare(path: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loralab", "compare", str(path), "--out",
                             str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _trainings(texts: list[str]) -> Counter:
    return Counter((m.group(1), int(m.group(2)), m.group(3))
                   for text in texts for m in RUN_LINE.finditer(text))


@pytest.mark.slow
def test_two_compares_and_jobs_2_train_each_run_once(tmp_path):
    """Two `loralab compare` processes and a `compare --jobs 2` on one small MiniLM study,
    started together: each of its 6 runs is trained exactly once, all finish, no run
    directory is renamed aside and every process exits 0."""
    _need_minilm()
    path = tmp_path / "jobs.yaml"
    path.write_text(TINY.replace("MAX_STEPS", "4"))
    out = tmp_path / "out"
    procs = [_compare(path, out), _compare(path, out), _compare(path, out, "--jobs", "2")]
    texts = []
    for p in procs:
        text, _ = p.communicate(timeout=600)
        texts.append(text)
        assert p.returncode == 0, text[-3000:]
    root = out / "jobs"
    logs = [f.read_text() for f in sorted((root / "workers").glob("worker-*.log"))]
    trained = _trainings(texts + logs)
    assert sorted(trained) == sorted((s, n, "training") for s in ("untuned", "head", "lora-r2")
                                     for n in (0, 1))
    assert set(trained.values()) == {1}
    assert not list((root / "runs").glob("*.old-*"))
    with ResultsDB(root / "results.sqlite") as db:
        rows = db.list_runs()
        assert len(rows) == 6 and {r["status"] for r in rows} == {"finished"}
        assert db.integrity_ok()


@pytest.mark.slow
def test_killed_worker_run_is_taken_over_and_resumed(tmp_path):
    """kill -9 of a `--jobs 2` worker after its run's first checkpoint: the parent starts a
    replacement, the run is taken over (its pid is dead) and resumed from the checkpoint, the
    study finishes with every run trained once, and the database has no half-written row."""
    _need_minilm()
    path = tmp_path / "jobs.yaml"
    path.write_text(TINY.replace("MAX_STEPS", "24").replace("seeds: 2", "seeds: 1"))
    out = tmp_path / "out"
    root = out / "jobs"
    proc = _compare(path, out, "--jobs", "2")
    killed = None
    deadline = time.time() + 400
    while killed is None and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint of a trained run appeared"
        time.sleep(0.05)
        if not (root / "results.sqlite").exists():
            continue
        with ResultsDB(root / "results.sqlite") as db:
            for row in db.list_runs(status="running"):
                if row["pid"] and (Path(row["run_dir"]) / "checkpoints" / "last.pt").exists():
                    os.kill(row["pid"], signal.SIGKILL)
                    killed = row
                    break
    text, _ = proc.communicate(timeout=600)
    assert killed is not None, text[-3000:]
    assert proc.returncode == 0, text[-3000:]
    died = next(line for line in text.splitlines() if f"(pid {killed['pid']}) died" in line)
    assert "died (killed by SIGKILL)" in died and "starting it again" in died
    with ResultsDB(root / "results.sqlite") as db:
        assert db.integrity_ok()
        rows = {r["run_id"]: r for r in db.list_runs()}
        assert {r["status"] for r in rows.values()} == {"finished"}
        assert all(r["owner"] is None and r["metrics"] for r in rows.values())
        resumed = rows[killed["run_id"]]
        assert any(str(n).startswith("resumed from step") for n in resumed["notes"])
    logs = [f.read_text() for f in sorted((root / "workers").glob("worker-*.log"))]
    trained = _trainings(logs)
    name = (killed["strategy"], killed["seed"])
    assert trained[(*name, "training")] == 1 and trained[(*name, "resuming from checkpoint")] == 1
    others = [k for k in trained if k[:2] != name]
    assert all(trained[k] == 1 and k[2] == "training" for k in others)
    assert not list((root / "runs").glob("*.old-*"))


def sleepy_run_fn(config: dict, resume: bool) -> dict:
    """A run that logs its start to OUT/trainings.txt and then takes two minutes."""
    with (Path(config["out"]).parents[1] / "trainings.txt").open("a") as f:
        f.write(f"{config['strategy']}-seed{config['seed']} {int(resume)} {os.getpid()}\n")
    time.sleep(120)
    return fake_run_fn([])(config, resume)


JOBS_SCRIPT = """
import sys
from loralab import study as st
from loralab.study import workers
from test_workers import sleepy_run_fn
spec = st.parse_study(open(sys.argv[1]).read())
workers.run_jobs(spec, sys.argv[2], 2, run_fn=sleepy_run_fn, poll_seconds=0.2)
"""


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_marks_their_runs_interrupted(tmp_path):
    (tmp_path / "s.yaml").write_text(BASE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "tests" / "study"), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", JOBS_SCRIPT, str(tmp_path / "s.yaml"),
                               str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    started = out / "trainings.txt"
    deadline = time.time() + 300
    while not (started.exists() and len(started.read_text().splitlines()) == 2):
        assert time.time() < deadline and parent.poll() is None, "the workers did not start"
        time.sleep(0.1)
    pids = [int(line.split()[2]) for line in started.read_text().splitlines()]
    t0 = time.time()
    parent.send_signal(signal.SIGINT)
    text, _ = parent.communicate(timeout=120)
    assert parent.returncode != 0 and time.time() - t0 < 60, text[-2000:]
    assert not any(process_alive(pid) for pid in pids)
    with ResultsDB(out / "results.sqlite") as db:
        rows = [r for r in db.list_runs() if r["status"] != "pending"]
        assert sorted(r["status"] for r in rows) == ["interrupted", "interrupted"]
        assert all(r["owner"] is None for r in rows)
        assert db.integrity_ok()
