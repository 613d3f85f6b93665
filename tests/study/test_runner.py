"""Running a study (loralab.study.runner): resumable bookkeeping with a recorded-style run
function, so no training is needed; the slow test trains for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from loralab import study as st
from loralab.errors import UserError
from loralab.results.database import ResultsDB
from loralab.study import runner
from study_helpers import BASE, TINY_REAL, fake_run_fn


def test_run_study_skips_finished_and_resumes(tmp_path):
    s = st.parse_study(BASE)
    calls: list = []
    st.run_study(s, tmp_path, run_fn=fake_run_fn(calls), progress=lambda m: None)
    assert calls == [("untuned", 0, False), ("head", 0, False), ("lora-r1", 0, False)]

    # everything finished: nothing runs again
    calls.clear()
    st.run_study(s, tmp_path, run_fn=fake_run_fn(calls), progress=lambda m: None)
    assert calls == []

    # a run killed mid-way with checkpoints: its row says running; it resumes with resume=True
    with ResultsDB(tmp_path / "results.sqlite") as db:
        db.set_status("t/head/seed0", "running")
    run_dir = tmp_path / "runs" / "head-seed0"
    (run_dir / "record.json").unlink()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    # a run whose record.json finished but the DB never heard: ingested, not retrained
    with ResultsDB(tmp_path / "results.sqlite") as db:
        db.set_status("t/lora-r1/seed0", "interrupted")
    st.run_study(s, tmp_path, run_fn=fake_run_fn(calls), progress=lambda m: None)
    assert calls == [("head", 0, True)]
    with ResultsDB(tmp_path / "results.sqlite") as db:
        assert {r["status"] for r in db.list_runs()} == {"finished"}
        assert db.get("t/lora-r1/seed0")["metrics"]["rt-snippets"]["f1"] == 0.5


def test_changed_config_reruns_and_keeps_the_old_dir(tmp_path):
    calls: list = []
    st.run_study(st.parse_study(BASE), tmp_path, run_fn=fake_run_fn(calls),
                 progress=lambda m: None)
    calls.clear()
    changed = st.parse_study(BASE.replace("rank: 1, alpha: 2", "rank: 2, alpha: 2"))
    st.run_study(changed, tmp_path, run_fn=fake_run_fn(calls), progress=lambda m: None)
    assert calls == [("lora-r1", 0, False)]
    assert list((tmp_path / "runs").glob("lora-r1-seed0.old-*"))


def test_failed_run_is_recorded_and_study_continues(tmp_path):
    calls: list = []
    ok = fake_run_fn(calls)

    def flaky(config, resume):
        if config["strategy"] == "head":
            raise RuntimeError("boom")
        return ok(config, resume)

    rows = st.run_study(st.parse_study(BASE), tmp_path, run_fn=flaky, progress=lambda m: None)
    status = {r["strategy"]: (r["status"], r["error"]) for r in rows}
    assert status["head"] == ("failed", "RuntimeError: boom")
    assert status["lora-r1"][0] == "finished"
    # the next compare retries only the failed run
    calls.clear()
    st.run_study(st.parse_study(BASE), tmp_path, run_fn=ok, progress=lambda m: None)
    assert calls == [("head", 0, False)]


def test_run_fn_seeds_before_loading_the_model(monkeypatch, tmp_path):
    """A new head drawn at load time depends on the run's seed only, not on what earlier runs in
    the same process drew from the global RNG (the study loads the model before train())."""
    import torch

    import loralab.models.loading
    import loralab.training.loop

    drawn = []

    def fake_load(model, task, num_labels=None):
        drawn.append(torch.rand(3))  # stands for a classifier initialised from the global RNG
        return type("Loaded", (), {"model": None, "tokenizer": None})()

    monkeypatch.setattr(loralab.models.loading, "load_model", fake_load)
    monkeypatch.setattr(runner, "build_task_data", lambda config, tokenizer: None)
    monkeypatch.setattr(loralab.training.loop, "train", lambda tc, **kw: {"status": "finished",
                                                                   "metrics": {}, "costs": {}})
    config = st.run_matrix(st.parse_study(BASE), tmp_path)[1].config
    st.default_run_fn(config, False)
    torch.rand(100)  # an earlier run used the global RNG
    st.default_run_fn(config, False)
    assert torch.equal(drawn[0], drawn[1])


@pytest.mark.slow
def test_compare_end_to_end_tiny_real_training(tmp_path):
    """`loralab compare` on a tiny real study: trains, writes the DB and the report, skips
    everything on a second call, and `merge` writes a model equal to base + adapter."""
    import torch

    from loralab.cli.main import main

    pytest.importorskip("loralab.training.loop")
    try:
        from loralab.models.loading import load_model

        load_model("minilm-l6", "classify")
    except UserError as exc:
        pytest.skip(f"bundled minilm-l6 not installed: {exc}")
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_REAL)
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    root = out / "tiny-real"
    with ResultsDB(root / "results.sqlite") as db:
        rows = db.list_runs()
    assert sorted(r["strategy"] for r in rows) == ["head", "lora-r2", "untuned"]
    assert all(r["status"] == "finished" for r in rows)
    by = {r["strategy"]: r for r in rows}
    for r in rows:
        assert set(r["metrics"]) >= {"rt-snippets"}
        assert 0.0 <= r["metrics"]["rt-snippets"]["f1"] <= 1.0
    assert by["untuned"]["costs"]["trainable_params"] == 0
    assert 0 < by["head"]["costs"]["trainable_params"] < by["lora-r2"]["costs"]["trainable_params"]
    assert by["lora-r2"]["curves"]["train_loss"]
    for name in ("report.md", "report.html", "results.csv"):
        assert (root / name).exists()
    md = (root / "report.md").read_text()
    assert "Quality on rt-snippets" in md and "| lora-r2 | lora |" in md

    # a second compare trains nothing
    calls: list = []
    st.run_study(st.load_study(path), root, run_fn=fake_run_fn(calls), progress=lambda m: None)
    assert calls == []

    # merge: a plain transformers model with the same outputs as base + adapter
    run_dir = root / "runs" / "lora-r2-seed0"
    assert main(["merge", "--run", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    model, tok, _ = st.load_run_model(run_dir)
    enc = tok(["a gripping, beautifully made film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, model(**enc).logits, atol=1e-4,
                                   rtol=1e-4)
    assert main(["generate", "--run", str(run_dir), "--prompt", "dull"]) == 0


def test_run_fn_hands_train_its_costs_and_generation_hook(monkeypatch, tmp_path):
    """default_run_fn never writes record.json: train() gets the loading and data seconds as
    `extra_costs` and the generation evaluation as `after_evaluation`, and writes the record
    once. The hook scores the generating eval sets only, with the model train() hands it."""
    import loralab.models.loading
    import loralab.training.loop
    from loralab.training.record import ExtraResults

    monkeypatch.setattr(loralab.models.loading, "load_model", lambda *a, **k: type(
        "Loaded", (), {"model": "M", "tokenizer": "T"})())
    monkeypatch.setattr(runner, "build_task_data", lambda config, tokenizer: "DATA")
    seen: dict = {}

    def fake_train(tc, **kw):
        seen.update(kw)
        return {"status": "finished", "metrics": {}, "costs": {}}

    calls: list = []

    def fake_scores(model, tokenizer, task_data, ev, config, timings):
        calls.append((model, tokenizer, task_data, ev["name"]))
        timings["decode_seconds"] = timings.get("decode_seconds", 0.0) + 0.5
        return {"bleu": 12.5, "generated": 4.0}

    monkeypatch.setattr(loralab.training.loop, "train", fake_train)
    monkeypatch.setattr(runner, "generation_scores", fake_scores)
    config = st.run_matrix(st.parse_study(BASE), tmp_path)[2].config  # lora-r1: not quantized
    config["eval_sets"] = [{"name": "gen", "generate": {}}, {"name": "plain"}]
    Path(config["out"]).mkdir(parents=True)
    st.default_run_fn(config, False)
    assert set(seen["extra_costs"]) == {"load_seconds", "data_seconds", "data_from_cache"}
    extra = seen["after_evaluation"]("M", "T", {"metrics": {}})
    assert isinstance(extra, ExtraResults)
    assert calls == [("M", "T", "DATA", "gen")]
    assert extra.metrics == {"gen": {"bleu": 12.5, "generated": 4.0}}
    assert set(extra.costs) == {"generation_seconds", "decode_seconds"}
    assert extra.costs["decode_seconds"] == 0.5
    assert not (Path(config["out"]) / "record.json").exists()
    config["eval_sets"] = [{"name": "plain"}]  # nothing to generate: no hook
    st.default_run_fn(config, False)
    assert seen["after_evaluation"] is None


def test_run_study_messages_of_one_process_and_its_checks(tmp_path):
    """One process alone says what it always said; bad --jobs / --executor are one line."""
    s = st.parse_study(BASE)
    said: list = []
    st.run_study(s, tmp_path, run_fn=fake_run_fn([]), progress=said.append)
    assert said[0].startswith("study 't': 3 runs (3 strategies x 1 seeds), 0 finished, 3 to run")
    assert said[1:7:2] == [f"[{i}/3] {name} seed 0: training ({method}{extra}) ..."
                           for i, name, method, extra in (
                               (1, "untuned", "none", ", lr=0.001, max_steps=2"),
                               (2, "head", "head", ", lr=0.001, max_steps=2"),
                               (3, "lora-r1", "lora",
                                ", preset=qv, rank=1, alpha=2.0, lr=0.001, max_steps=2"))]
    assert said[2].startswith("[1/3] untuned seed 0: finished in 0 s: rt-snippets f1 0.5")
    assert said[-1].startswith("study 't' done in")
    with pytest.raises(UserError, match="--jobs must be at least 1, got 0"):
        st.run_study(s, tmp_path, jobs=0)
    with pytest.raises(UserError, match="--jobs is for the local executor"):
        st.run_study(s, tmp_path, jobs=2, executor="ray")
    with pytest.raises(UserError, match="unknown executor 'slurm'"):
        st.run_study(s, tmp_path, executor="slurm")
