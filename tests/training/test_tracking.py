"""Experiment tracking (loralab.training.tracking): TensorBoard by default, W&B offline and a
local MLflow store read back with each library's own reader, tracking settings outside the config
hash, and generations.jsonl rescored by `loralab score --generations`."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from conftest import tiny_gpt2
from loralab import study as st
from loralab.errors import UserError
from loralab.study import runner as study_runner
from loralab.training import tracking
from loralab.training.config import TrainConfig, make_config
from study_helpers import BASE, fake_run_fn
from test_train import Loaded, lm_data, train


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No tracker may reach a network: W&B offline with its files in tmp, MLflow local."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def wandb_records(path: str):
    """The records of a W&B transaction log (RUN/wandb/offline-run-*/run-ID.wandb), parsed with
    W&B's own protobuf schema. The file is a LevelDB-style log: a 7-byte header (':W&B', a
    2-byte magic, a version byte), then 32 KiB blocks of chunks, each a 7-byte header (masked
    CRC32C, little-endian length, type 1 full / 2 first / 3 middle / 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def finished_wandb_log(run_dir: Path, run_id: str, timeout: float = 60.0) -> list:
    """The records of the run's offline transaction log once W&B's service process has written
    its exit record: `run.finish()` returns before that process has flushed the file."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
        records = list(wandb_records(found[0])) if len(found) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"no finished W&B log for {run_id} in {run_dir}"
        time.sleep(0.2)


def _key(item) -> str:
    """A W&B history/summary item's name: 'a/b' is stored as the nested key ['a', 'b']."""
    return item.key or "/".join(item.nested_key)


def tracked_run(tmp_path: Path, report_to: str, **kw) -> dict:
    config = TrainConfig(model="tiny", task="lm", method="lora", out=str(tmp_path / "run"),
                         max_steps=3, batch_size=4, lr=1e-2, precision="fp32",
                         report_to=report_to, **kw)
    return train(config, loaded=Loaded(tiny_gpt2()), task_data=lm_data(n=16))


# --- choosing trackers ------------------------------------------------------------------------

def test_report_to_defaults_to_tensorboard_and_parses_lists():
    assert TrainConfig().report_to == ("tensorboard",)
    assert make_config(report_to="tensorboard,wandb,mlflow").report_to == (
        "tensorboard", "wandb", "mlflow")
    assert make_config(report_to=["mlflow", "mlflow"]).report_to == ("mlflow",)
    assert make_config(report_to="none").report_to == ()
    assert make_config(report_to="wandb").to_dict()["report_to"] == ["wandb"]
    with pytest.raises(UserError, match="unknown tracker 'comet'.*tensorboard, wandb, mlflow"):
        make_config(report_to="tensorboard,comet")


def test_wandb_runs_offline_without_a_key(tmp_path):
    empty = tmp_path / "netrc"
    empty.write_text("")
    assert tracking.wandb_mode({}, str(empty)) == "offline"
    assert tracking.wandb_mode({"WANDB_API_KEY": "k" * 40}, str(empty)) == "online"
    assert tracking.wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}) == "disabled"
    logged_in = tmp_path / "netrc2"
    logged_in.write_text(f"machine {tracking.WANDB_HOST}\n  login user\n  password {'k' * 40}\n")
    logged_in.chmod(0o600)
    assert tracking.wandb_mode({}, str(logged_in)) == "online"


def test_mlflow_store_is_local_sqlite_unless_the_uri_is_set(tmp_path):
    assert tracking.mlflow_uri(tmp_path, {}) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.mlflow_uri(tmp_path, {"MLFLOW_TRACKING_URI": "http://x:5000"}) \
        == "http://x:5000"


def test_missing_tracking_package_is_a_one_line_user_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.split(".")[0] == "mlflow":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    monkeypatch.setattr("importlib.import_module", lambda name: no_mlflow(name))
    with pytest.raises(UserError, match=r"pip install 'loralab\[tracking\]'") as err:
        tracking.MlflowTracker("r", Path("/nonexistent"), "", {})
    assert "\n" not in str(err.value)


# --- tracking settings never re-train finished runs ---------------------------------------------

def test_tracking_settings_stay_out_of_the_config_hash(tmp_path):
    calls: list = []
    st.run_study(st.parse_study(BASE), tmp_path, run_fn=fake_run_fn(calls),
                 progress=lambda m: None)
    assert len(calls) == 3
    calls.clear()
    tracked = st.parse_study(BASE + "report_to: [tensorboard, wandb, mlflow]\n")
    assert tracked.report_to == ("tensorboard", "wandb", "mlflow")
    specs = st.run_matrix(tracked, tmp_path)
    assert specs[0].config["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert specs[0].config["tracking_group"] == "t"
    assert specs[0].config["tracking_dir"] == str(tmp_path)
    assert [s.config_hash for s in specs] == [s.config_hash for s in
                                              st.run_matrix(st.parse_study(BASE), tmp_path)]
    st.run_study(tracked, tmp_path, run_fn=fake_run_fn(calls), progress=lambda m: None)
    assert calls == []  # every run finished earlier: none trains again
    # a computational change still re-trains
    st.run_study(st.parse_study(BASE.replace("lr: 1.0e-3", "lr: 2.0e-3")), tmp_path,
                 run_fn=fake_run_fn(calls), progress=lambda m: None)
    assert len(calls) == 3


def test_study_report_to_is_validated_with_its_line():
    with pytest.raises(UserError, match=r"<study>:\d+: .*unknown tracker 'neptune'"):
        st.parse_study(BASE + "report_to: neptune\n")


def test_cli_report_to_reaches_the_train_config_and_the_study(tmp_path, monkeypatch):
    from loralab.cli import main as cli

    seen: dict = {}
    monkeypatch.setattr("loralab.training.loop.train",
                        lambda config, resume=False: seen.setdefault("config", config) and {
                            "status": "failed"})
    assert cli.main(["train", "--model", "tiny", "--out", str(tmp_path / "r"),
                     "--report-to", "tensorboard,mlflow"]) == 1
    assert seen["config"].report_to == ("tensorboard", "mlflow")
    seen.clear()
    assert cli.main(["train", "--out", str(tmp_path / "r2"), "--wandb"]) == 1
    assert seen["config"].report_to == ("tensorboard", "wandb")
    assert cli.main(["train", "--out", str(tmp_path / "r3"), "--report-to", "comet"]) == 2

    study_file = tmp_path / "t.yaml"
    study_file.write_text(BASE)
    studies: list = []
    monkeypatch.setattr("loralab.study.run_study",
                        lambda spec, out_dir, **kw: studies.append((spec, out_dir)))
    monkeypatch.setattr("loralab.report.write.write_report", lambda *a, **k: (_ for _ in ()).throw(
        SystemExit(0)))
    with pytest.raises(SystemExit):
        cli.main(["compare", str(study_file), "--out", str(tmp_path / "o"),
                  "--report-to", "wandb"])
    assert studies[0][0].report_to == ("wandb",)


# --- the trackers, read back with their own readers -----------------------------------------------

@pytest.mark.slow
def test_one_run_reports_to_tensorboard_wandb_and_mlflow(offline_env):
    """A real run with all three trackers: MLflow's own client reads the params, the loss
    curve, the final metrics and the costs back from the local store; W&B's offline transaction
    log holds the group, the config, the same curve and the same final values."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp = offline_env
    rec = tracked_run(tmp, "tensorboard,wandb,mlflow", tracking_group="study-x")
    run_dir = tmp / "run"
    curve = rec["curves"]["train_loss"]
    final = tracking.final_values(rec["metrics"], rec["costs"])
    assert {"validation/loss", "costs/trainable_params", "costs/train_seconds",
            "costs/tokens_per_second", "costs/peak_memory_bytes"} <= set(final)

    # TensorBoard, the default, is still written
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [s for s, _ in curve]

    # MLflow: the local store under the run directory, read by a fresh MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study-x")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == rec["run_id"]
    assert run.data.tags["loralab.run_id"] == rec["run_id"]
    assert run.data.params["lr"] == "0.01" and run.data.params["method"] == "lora"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, v) for s, v in curve]  # float64 kept
    for key in ("validation/loss", "costs/trainable_params", "costs/tokens_per_second",
                "costs/peak_memory_bytes", "costs/train_seconds"):
        assert run.data.metrics[key] == final[key]

    # W&B: the offline run directory and its transaction log
    history, summary, header = [], {}, None
    for r in finished_wandb_log(run_dir, rec["run_id"]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            header = r.run
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert header.run_id == rec["run_id"] and header.run_group == "study-x"
    config = {i.key: json.loads(i.value_json) for i in header.config.update}
    assert config["method"] == "lora" and config["report_to"] == str(
        ["tensorboard", "wandb", "mlflow"])
    assert [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h] == \
        [(s, pytest.approx(v, rel=1e-12)) for s, v in curve]  # JSON text round trip
    for key in ("validation/loss", "costs/trainable_params", "costs/peak_memory_bytes"):
        assert summary[key] == pytest.approx(final[key], rel=1e-12)


# --- generations.jsonl and `loralab score --generations` ----------------------------------------

def test_generations_are_kept_and_rescored_by_the_cli(tmp_path, capsys):
    """A generation evaluation writes one line per source (prompt, references, hypothesis);
    `loralab score --generations` scores the file again to the same numbers."""
    from types import SimpleNamespace

    from conftest import tiny_gpt2
    from loralab.cli import main as cli
    from study_helpers import _word_tokenizer

    tok = _word_tokenizer()
    rows = [list(range(1 + i, 31 + i)) for i in range(6)]
    td = SimpleNamespace(refs={}, splits={"held": {"input_ids": rows}})
    ev = {"name": "held", "split": "test",
          "generate": {"prompt_tokens": 8, "max_new_tokens": 6, "java": False}}
    config = {"task": "lm", "out": str(tmp_path)}
    scores = st.generation_scores(tiny_gpt2(), tok, td, ev, config)
    lines = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    pairs = st.generation_prompts(tok, td, ev, config)
    assert len(lines) == len(pairs) == scores["generated"] == 6
    assert [x["prompt"] for x in lines] == [tok.decode(p) for p, _ in pairs]
    assert [x["references"] for x in lines] == [r for _, r in pairs]
    assert {x["eval_set"] for x in lines} == {"held"} and lines[0]["split"] == "test"
    assert all(x["hypothesis"].strip() for x in lines)

    assert cli.main(["score", "--generations", str(tmp_path / "generations.jsonl"),
                     "--json", "--no-java"]) == 0
    again = json.loads(capsys.readouterr().out)["held"]
    assert again == {k: v for k, v in scores.items() if k != "generated"}
    assert cli.main(["score", "--generations", str(tmp_path), "--no-java"]) == 0  # the run dir
    assert "held: 6 outputs" in capsys.readouterr().out
    assert cli.main(["score"]) == 2  # neither files nor --generations: a one-line error


def test_old_wandb_switch_still_reads():
    """Records and configs written before report_to hold `wandb: true/false`; they still load
    (`train --resume` rebuilds the config from the record)."""
    assert make_config({"wandb": False}).report_to == ("tensorboard",)
    assert make_config({"wandb": True}).report_to == ("tensorboard", "wandb")
    assert make_config({"wandb": "true", "report_to": "mlflow"}).report_to == ("mlflow", "wandb")
    assert make_config({"wandb": "off"}).report_to == ("tensorboard",)


def test_wandb_falls_back_to_offline_when_the_online_start_fails(offline_env, monkeypatch):
    """With a key but no network, the online start fails: the run goes on offline, and says
    how to upload it later. (wandb.init is wrapped so that no connection is ever attempted.)"""
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    real, modes = wandb.init, []

    def init(mode=None, **kwargs):
        modes.append(mode)
        if mode != "offline":
            raise wandb.errors.CommError("no network")
        return real(mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    (offline_env / "run").mkdir()
    tracker = tracking.WandbTracker("r-1", offline_env / "run", "g", {"lr": 0.1})
    tracker.log(1, {"train/loss": 2.5})
    tracker.finish({}, {"test/accuracy": 0.75}, True)
    assert modes == ["online", "offline"]
    assert "W&B offline (the online start failed: CommError)" in tracker.note
    history = [{_key(i): json.loads(i.value_json) for i in r.history.item}
               for r in finished_wandb_log(offline_env / "run", "r-1")
               if r.WhichOneof("record_type") == "history"]
    assert [h["train/loss"] for h in history] == [2.5]


@pytest.mark.slow
def test_compare_reports_a_study_to_one_mlflow_experiment(offline_env):
    """`compare --report-to tensorboard,mlflow` on a tiny real study: every trained run is an
    MLflow run of the experiment named after the study, in OUT/<study>/mlflow.db; a second
    compare with W&B added trains nothing."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from loralab.cli.main import main
    from loralab.models.loading import load_model
    from study_helpers import TINY_REAL

    try:
        load_model("minilm-l6", "classify")
    except UserError as exc:
        pytest.skip(f"bundled minilm-l6 not installed: {exc}")
    path = offline_env / "tiny.yaml"
    path.write_text(TINY_REAL)
    out = offline_env / "out"
    assert main(["compare", str(path), "--out", str(out), "--report-to", "tensorboard,mlflow"]) == 0
    root = out / "tiny-real"
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny-real").experiment_id])
    records = {json.loads((root / "runs" / f"{n}-seed0" / "record.json").read_text())["run_id"]
               for n in ("untuned", "head", "lora-r2")}
    assert {r.info.run_name for r in runs} == records
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all("costs/trainable_params" in r.data.metrics for r in runs)
    assert main(["compare", str(path), "--out", str(out), "--report-to", "wandb,mlflow"]) == 0
    assert not list(root.glob("runs/*/wandb"))  # nothing trained again, so nothing logged
    assert len(client.search_runs([runs[0].info.experiment_id])) == 3


# --- a study's generation scores, computed after train() closed the trackers -----------------

@pytest.mark.slow
def test_generation_scores_reach_the_trackers_after_the_run(offline_env):
    """A study scores generations (BLEU, ROUGE-L, ...) after `train` has closed its trackers;
    `report_final` re-opens the same runs from record.json's `tracking` and adds them: read back
    by MLflow's client (same MLflow run), W&B's offline log (same run id) and TensorBoard."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = tracked_run(offline_env, "tensorboard,wandb,mlflow", tracking_group="study-g")
    run_dir = offline_env / "run"
    saved = json.loads((run_dir / "record.json").read_text())
    assert set(saved["tracking"]) == {"tensorboard", "wandb", "mlflow"}
    assert saved["tracking"]["wandb"]["mode"] == "offline"
    finished_wandb_log(run_dir, rec["run_id"])  # the training run's W&B service is done
    # what default_run_fn passes: the generation eval set's scores and their costs
    late = tracking.final_values({"gen": {"bleu": 12.5, "rouge_l": 0.375, "chrf": 40.25,
                                          "generated": 6}},
                                 {"generation_seconds": 1.5, "decode_seconds": 1.25})
    assert tracking.report_final(saved, late) == []
    last = rec["curves"]["train_loss"][-1][0]

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("study-g").experiment_id])
    assert run.info.run_id == saved["tracking"]["mlflow"]["run_id"]
    assert run.info.status == "FINISHED"
    for key, value in late.items():  # exact: the floats go through SQLite's REAL (float64)
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] \
            == [(last, value)]
    assert "validation/loss" in run.data.metrics  # the training run's values are still there

    logs = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*"
                                / f"run-{rec['run_id']}.wandb")))
    assert len(logs) == 2  # the training run and its resumption, one W&B run id

    def summary_of(path: str) -> dict:
        import time

        deadline = time.monotonic() + 60
        while True:  # the service process flushes after finish() returns: wait for `exit`
            records = list(wandb_records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                break
            assert time.monotonic() < deadline, f"no finished W&B log at {path}"
            time.sleep(0.2)
        out = {}
        for r in records:
            if r.WhichOneof("record_type") == "run":
                assert r.run.run_id == rec["run_id"] and r.run.run_group == "study-g"
            if r.WhichOneof("record_type") == "summary":
                out.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        return out

    resumed = {}
    for path in logs:
        resumed.update(summary_of(path))
    for key, value in late.items():  # JSON text round trip of a float64
        assert resumed[key] == pytest.approx(value, rel=1e-12)

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    for key, value in late.items():  # TensorBoard stores scalars as float32
        assert [(e.step, e.value) for e in acc.Scalars(key)] == [
            (last, pytest.approx(value, rel=1e-7))]


def test_study_sends_generation_scores_to_the_run_trackers(monkeypatch, tmp_path):
    """`default_run_fn` hands train() an `after_evaluation` hook returning only what train()
    could not have measured itself: the generation scores of each generating eval set and the
    generation costs. train() merges them into the record before its one record.json write and
    before the trackers close, so the trackers' final values (`tracking.final_values`) and the
    record hold them next to the eval set's loss."""
    import loralab.models.loading
    import loralab.training.loop
    from loralab.training.record import Record

    monkeypatch.setattr(loralab.models.loading, "load_model", lambda *a, **k: type(
        "Loaded", (), {"model": None, "tokenizer": None})())
    monkeypatch.setattr(study_runner, "build_task_data", lambda config, tokenizer: None)
    sent: list = []

    def fake_train(tc, **kw):  # what train() does with the hook, on a finished record
        record = Record("r", "finished", {}, metrics={"gen": {"loss": 2.0}},
                        curves={"train_loss": [[2, 2.5]]})
        extra = kw["after_evaluation"](None, None, record.to_dict())
        sent.append(extra)
        record.add(extra)
        return record.to_dict()

    def fake_scores(model, tokenizer, task_data, ev, config, timings):
        timings["decode_seconds"] = 0.5
        return {"bleu": 12.5, "rouge_l": 0.25, "generated": 4}

    monkeypatch.setattr(loralab.training.loop, "train", fake_train)
    monkeypatch.setattr(study_runner, "generation_scores", fake_scores)
    config = st.run_matrix(st.parse_study(BASE), tmp_path)[1].config
    config["eval_sets"] = [{"name": "gen", "generate": {"max_new_tokens": 4}}]
    Path(config["out"]).mkdir(parents=True)
    record = st.default_run_fn(config, False)
    (extra,) = sent
    final = tracking.final_values(extra.metrics, extra.costs)
    assert set(final) == {"gen/bleu", "gen/rouge_l", "gen/generated",
                          "costs/generation_seconds", "costs/decode_seconds"}
    assert (final["gen/bleu"], final["costs/decode_seconds"]) == (12.5, 0.5)
    assert record["metrics"]["gen"] == {"loss": 2.0, "bleu": 12.5, "rouge_l": 0.25, "generated": 4}
    assert not (Path(config["out"]) / "record.json").exists()  # the study writes no record


def test_report_final_without_trackers_or_values_does_nothing():
    """Records written before `tracking` existed (or runs with report_to none) report nothing;
    a tracker's failure is a note, not an exception."""
    assert tracking.report_final({"metrics": {}}, {"gen/bleu": 1.0}) == []
    assert tracking.report_final({"tracking": {"mlflow": {}}}, {}) == []
    notes = tracking.report_final({"tracking": {"mlflow": {}}}, {"gen/bleu": 1.0})
    assert len(notes) == 1 and notes[0].startswith("final values not reported to mlflow: ")
