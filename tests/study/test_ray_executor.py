"""Running a study on Ray (loralab.study.ray_executor): the resource request and the cluster's
capacity from its nodes, the environment passed to tasks, the one-line error without Ray, and
a real local Ray instance training a tiny study to the same metrics as the sequential run."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from loralab import study as st
from loralab.errors import UserError
from loralab.results.database import ResultsDB
from loralab.study import ray_executor as rx
from study_helpers import BASE, TINY_REAL


def test_without_ray_the_executor_is_a_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError) as err:
        rx.run_on_ray(st.parse_study(BASE), tmp_path, progress=lambda m: None)
    assert str(err.value) == "--executor ray needs Ray: pip install 'loralab[ray]'"
    assert not (tmp_path / "results.sqlite").exists()  # nothing written before the error


def test_compare_executor_ray_without_ray_exits_2_with_one_line(monkeypatch, tmp_path, capsys):
    from loralab.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    assert main(["compare", str(path), "--executor", "ray", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "loralab: error: --executor ray needs Ray: pip install 'loralab[ray]'"


def test_request_is_one_gpu_per_run_else_a_cpu_share():
    gpus = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 16.0}]
    assert rx.run_request(gpus, None) == rx.Request(gpus=1, cpus=1)
    assert rx.capacity(gpus, rx.run_request(gpus, None)) == 3  # the GPUs, not the 28 CPUs
    assert rx.capacity(gpus, rx.run_request(gpus, 6)) == 1  # only the 8-CPU node fits 6
    cpus = [{"CPU": 8.0}, {"CPU": 2.0}]
    assert rx.run_request(cpus, None) == rx.Request(gpus=0, cpus=rx.DEFAULT_CPUS_PER_RUN)
    assert rx.capacity(cpus, rx.Request(gpus=0, cpus=4)) == 2  # 8 // 4 + 2 // 4
    assert rx.run_request([{"CPU": 2.0}], None).cpus == 2  # capped at the largest node
    assert rx.capacity([{"CPU": 2.0}], rx.Request(gpus=0, cpus=1)) == 2
    with pytest.raises(UserError, match="no Ray node has 16 CPUs"):
        rx.run_request(cpus, 16)
    with pytest.raises(UserError, match="at least 1 CPU"):
        rx.run_request(cpus, 0)
    assert rx.Request(gpus=1, cpus=2).options()["num_gpus"] == 1


def test_tasks_get_the_offline_cache_and_tracker_settings():
    environ = {"HF_HUB_OFFLINE": "1", "LORALAB_CACHE": "/c", "WANDB_MODE": "offline",
               "PATH": "/bin", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0"}
    assert rx.task_env(environ) == {"HF_HUB_OFFLINE": "1", "LORALAB_CACHE": "/c",
                                    "WANDB_MODE": "offline"}


SMALL = TINY_REAL.replace("max_examples: 32", "max_examples: 16").replace(
    "eval_max_examples: 16", "eval_max_examples: 8")
"""The tiny real study with less evaluation: 2 steps (a checkpoint after each), 16 + 8
examples evaluated."""


def _metrics(rows: list[dict]) -> dict[str, dict]:
    return {r["strategy"]: r["metrics"] for r in rows}


@pytest.mark.slow
def test_ray_study_gives_the_sequential_metrics_each_run_once(tmp_path, monkeypatch):
    """A local Ray instance (two 1-CPU runs at a time) trains the tiny study: every run once
    (one task attempt each, no directory set aside), every row finished, each run with its
    torch threads set to its CPU share, and the metrics of the same study run sequentially.
    The lora run's worker is killed (SIGKILL) after step 1's checkpoint: Ray starts the task
    again, which resumes from that checkpoint and ends with the same metrics."""
    pytest.importorskip("ray")
    try:
        from loralab.models.loading import load_model

        load_model("minilm-l6", "classify")
    except UserError as exc:
        pytest.skip(f"bundled minilm-l6 not installed: {exc}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    study = st.parse_study(SMALL)
    sequential = st.run_study(study, tmp_path / "seq", progress=lambda m: None)

    def counted(config: dict, resume: bool) -> dict:  # a local function: pickled by value
        import torch

        from loralab.study.runner import default_run_fn

        path = os.path.join(config["out"], "attempts.jsonl")
        first = not os.path.exists(path)
        mark = {"pid": os.getpid(), "threads": torch.get_num_threads(), "resume": resume}
        with open(path, "a") as f:
            f.write(json.dumps(mark) + "\n")
        if first and config["strategy"] == "lora-r2":  # this worker dies after step 1
            os.environ["LORALAB_FAULT_KILL_AT_STEP"] = "1"
        return default_run_fn(config, resume)

    said: list[str] = []
    out = tmp_path / "ray"
    rows = rx.run_on_ray(study, out, run_fn=counted, progress=said.append, cpus_per_run=1)
    assert "up to 2 run(s) at once, each with 0 GPU and 1 CPU(s)" in "\n".join(said)
    assert sorted(r["strategy"] for r in rows) == ["head", "lora-r2", "untuned"]
    assert {r["status"] for r in rows} == {"finished"}
    assert all(r["owner"] is None for r in rows)  # every lease released
    for name in ("untuned", "head", "lora-r2"):
        lines = (out / "runs" / f"{name}-seed0" / "attempts.jsonl").read_text().splitlines()
        marks = [json.loads(x) for x in lines]
        assert [m["resume"] for m in marks] == ([False, True] if name == "lora-r2" else [False])
        assert {m["threads"] for m in marks} == {1}
        assert os.getpid() not in {m["pid"] for m in marks}
    lora = next(r for r in rows if r["strategy"] == "lora-r2")
    assert any("resumed from step 1" in note for note in lora["notes"])
    assert not list((out / "runs").glob("*.old-*"))
    seq, ray = _metrics(sequential), _metrics(rows)
    assert seq.keys() == ray.keys()
    for name, sets in seq.items():
        assert sets.keys() == ray[name].keys()
        for set_name, values in sets.items():
            for key, value in values.items():
                assert math.isclose(ray[name][set_name][key], value, rel_tol=1e-6,
                                    abs_tol=1e-9), (name, set_name, key)

    # a second call finds everything finished: no Ray instance, no task
    said.clear()
    again = rx.run_on_ray(study, out, run_fn=counted, progress=said.append, cpus_per_run=1)
    assert len(said) == 1 and "3 finished, 0 to run" in said[0]
    assert [r["updated_at"] for r in again] == [r["updated_at"] for r in rows]
    with ResultsDB(out / "results.sqlite") as db:
        assert db.integrity_ok()
