"""Study files: strict parsing, the run matrix, and resumable bookkeeping (with a recorded-style
run function, so no training is needed; the slow test at the end trains for real)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.study import runner as st
from loralab.errors import UserError
from loralab.results.database import ResultsDB

BASE = """\
name: t
model: minilm-l6
task: classify
data: rt-snippets
eval: [rt-snippets]
budget: {max_steps: 2, batch_size: 4, seq_len: 32, lr: 1.0e-3}
seeds: 1
strategies:
  - {name: head, method: head}
  - {name: lora-r1, method: lora, preset: qv, rank: 1, alpha: 2}
"""


def fake_run_fn(calls: list):
    """A stand-in for train.train that writes a record like it and logs how it was called."""
    def run(config: dict, resume: bool) -> dict:
        calls.append((config["strategy"], config["seed"], resume))
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        record = {"run_id": config["strategy"], "status": "finished", "config": config,
                  "metrics": {e["name"]: {"loss": 1.0 + config["seed"], "f1": 0.5}
                              for e in config["eval_sets"]},
                  "costs": {"trainable_params": 10, "total_params": 100},
                  "curves": {}, "artifacts": {}, "env": {}, "notes": []}
        (out / "record.json").write_text(json.dumps(record))
        return record
    return run


def test_parse_adds_untuned_row_and_shares_the_seed():
    s = st.parse_study(BASE)
    assert [x.name for x in s.strategies] == ["untuned", "head", "lora-r1"]
    assert s.strategies[0].method == "none"
    specs = st.run_matrix(s, Path("/tmp/x"))
    # same data, same order: every strategy of a seed gets that seed and the same budget
    assert {(sp.config["seed"], sp.config["data"], sp.config["batch_size"]) for sp in specs} \
        == {(0, "rt-snippets", 4)}
    assert specs[1].config["lr"] == 1.0e-3 and specs[2].config["rank"] == 1


def test_strategy_lr_overrides_budget_and_seeds_flag():
    s = st.parse_study(BASE.replace("{name: head, method: head}",
                                    "{name: head, method: head, lr: 0.01}"))
    s = st.with_seeds(s, 3)
    specs = st.run_matrix(s, Path("/tmp/x"))
    assert len(specs) == 9
    assert {sp.config["lr"] for sp in specs if sp.strategy == "head"} == {0.01}
    assert {sp.config["lr"] for sp in specs if sp.strategy == "lora-r1"} == {1.0e-3}
    assert sorted({sp.seed for sp in specs}) == [0, 1, 2]


@pytest.mark.parametrize("text, needle", [
    (BASE.replace("seeds: 1", "seeds: 1\nfoo: 3"), "unknown field 'foo' in the study"),
    (BASE.replace("rank: 1", "rnak: 1"), "unknown field 'rnak' in a strategy; valid fields:"),
    (BASE.replace("seq_len: 32", "seq_len: 32, sequence: 4"), "unknown field 'sequence' in budget"),
    (BASE.replace("method: head}", "method: heads}"), "unknown method 'heads'"),
    (BASE.replace("preset: qv", "preset: qkv"), "unknown preset 'qkv'"),
    (BASE.replace("rank: 1", "rank: 0"), "'rank' must be an integer >= 1"),
    (BASE.replace("task: classify", "task: regress"), "unknown task 'regress'"),
    (BASE.replace("{name: head, method: head}", "{name: head, method: head, rank: 4}"),
     "'rank' only applies to LoRA methods"),
    (BASE.replace("name: lora-r1", "name: head"), "appears twice"),
    (BASE.replace("model: minilm-l6\n", ""), "missing field 'model'"),
    (BASE.replace("max_steps: 2", "max_steps: 2, epochs: 1"), "both 'epochs' and 'max_steps'"),
])
def test_validation_errors_name_the_problem(text, needle):
    with pytest.raises(UserError) as info:
        st.parse_study(text, source="s.yaml")
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg and msg.startswith("s.yaml")


def test_unknown_field_error_has_the_line():
    text = BASE.replace("rank: 1", "rnak: 1")
    with pytest.raises(UserError, match=r"^s\.yaml:10: unknown field 'rnak'"):
        st.parse_study(text, source="s.yaml")


def test_yaml_syntax_error_has_the_line():
    text = BASE.replace("seeds: 1", "seeds: [1, 2")
    with pytest.raises(UserError, match=r"^s\.yaml:\d+: not valid YAML"):
        st.parse_study(text, source="s.yaml")


def test_cli_bad_study_exits_2_with_one_line_no_traceback(tmp_path):
    """A real process: exit code 2, one line on stderr naming the file, no traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\nmodel: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "loralab", "compare", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "not valid YAML" in err and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needle", [
    (["compare", "{bad}"], "unknown field 'bogus_field' in the study; valid fields: name,"),
    (["compare", "{missing}"], "study file not found"),
    (["generate", "--run", "{missing}"], "run directory not found"),
    (["merge", "--run", "{missing}", "--out", "{missing}-merged"], "run directory not found"),
    (["report", "{missing}"], "no results database"),
    (["runs", "{missing}"], "no results database"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    from loralab.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "bogus_field: 1\n")
    argv = [a.format(bad=bad, missing=tmp_path / "nope") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_bundled_studies_parse():
    bundled = st.bundled_studies()
    assert "default" in bundled
    for name, path in bundled.items():
        s = st.load_study(path)
        assert any(x.method == "none" for x in s.strategies), name
    pytest.importorskip("loralab.training.loop")
    for path in bundled.values():  # every setting is a TrainConfig field
        st.check_configs(st.load_study(path), Path("/tmp/unused"))
    repo_copy = Path(__file__).resolve().parents[2] / "studies" / "default.yaml"
    assert repo_copy.read_text() == bundled["default"].read_text()
    assert st.resolve_study_path(None) == bundled["default"]


def test_default_study_shape():
    s = st.load_study(st.resolve_study_path(None))
    assert s.model == "smollm2-135m" and s.data == "wiki-leads"
    assert [x.method for x in s.strategies] == ["none", "full"] + ["lora"] * 4
    assert [x.preset for x in s.strategies[2:]] == ["attn", "attn-proj", "attn-proj-ffn", "all"]
    assert [e.data for e in s.eval] == ["wiki-leads", "wiki-lambada"]


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


def test_unknown_train_setting_fails_before_training(tmp_path):
    pytest.importorskip("loralab.training.loop")
    s = st.parse_study(BASE.replace("{name: head, method: head}",
                                    "{name: head, method: head, options: {not_a_field: 1}}"))
    with pytest.raises(UserError, match="not_a_field"):
        st.run_study(s, tmp_path, progress=lambda m: None)


TINY_REAL = """\
name: tiny-real
model: minilm-l6
task: classify
num_labels: 2
data: {name: rt-snippets, fraction: 0.02}
eval: [{name: rt-snippets, data: rt-snippets, max_examples: 32}]
budget: {max_steps: 2, batch_size: 8, seq_len: 32, lr: 1.0e-3, eval_every: 1, eval_batches: 1,
         eval_max_examples: 16}
strategies:
  - {name: head, method: head}
  - {name: lora-r2, method: lora, preset: qv, rank: 2, alpha: 4}
"""


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


# ----------------------------------------------------------------------------- generation
def _word_tokenizer(vocab_size: int = 128):
    """A real (fast) word-level tokenizer over words w0..w126 with EOS = 127, built in memory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<eos>"] = vocab_size - 1
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")


def _one_at_a_time(model, prompt_ids: list[int], gen: dict, eos: int) -> list[int]:
    """The peer: HF generate on a single unpadded prompt, new tokens cut after the first EOS."""
    import torch

    out = model.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False,
                         num_beams=gen.get("num_beams", 1),
                         length_penalty=gen.get("length_penalty", 1.0),
                         no_repeat_ngram_size=gen.get("no_repeat_ngram_size", 0),
                         max_new_tokens=gen["max_new_tokens"], eos_token_id=eos,
                         pad_token_id=eos, early_stopping=gen.get("num_beams", 1) > 1 or None)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eos) + 1] if eos in new else new


@pytest.mark.parametrize("gen", [
    {"max_new_tokens": 12},                                           # the study default: greedy
    {"max_new_tokens": 12, "num_beams": 4, "length_penalty": 0.8, "no_repeat_ngram_size": 2},
])
def test_study_generation_equals_one_prompt_at_a_time(gen):
    """The study's generation path (batched, left-padded) decodes the same texts as HF generate
    fed one unpadded prompt at a time, with the study's options; text and id prompts mix."""
    from conftest import tiny_gpt2

    model, tok = tiny_gpt2(), _word_tokenizer()
    eos = tok.eos_token_id
    prompts: list = ["w5 w9 w33 w2", "w17", [40, 41, 42, 43, 44, 45, 46], "w99 w3 w3",
                     [7, 8], "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"]
    got = st.generate_hypotheses(model, tok, prompts, "lm", gen, batch_size=4)
    ids = [p if isinstance(p, list) else tok(p, add_special_tokens=False)["input_ids"]
           for p in prompts]
    want = [tok.decode(_one_at_a_time(model, p, gen, eos), skip_special_tokens=True).strip()
            for p in ids]
    assert got == want
    assert any(got) and len(set(map(len, ids))) > 2  # non-trivial: outputs, uneven lengths


def test_generation_prompts_from_held_out_blocks():
    """lm eval sets: the first prompt_tokens ids of each block are the prompt (as ids), the
    rest of the block, decoded, the reference; blocks too short to continue are skipped."""
    from types import SimpleNamespace

    tok = _word_tokenizer()
    rows = [list(range(1, 41)), list(range(50, 60)), list(range(60, 100))]
    td = SimpleNamespace(refs={}, splits={"held": {"input_ids": rows}})
    ev = {"name": "held", "generate": {"prompt_tokens": 8, "max_examples": 3}}
    pairs = st.generation_prompts(tok, td, ev, {"task": "lm"})
    assert [p for p, _ in pairs] == [rows[0][:8], rows[2][:8]]
    assert pairs[0][1] == [tok.decode(rows[0][8:])]
    cfg = st.decode_config({"max_new_tokens": 5, "num_beams": 3})
    assert (cfg.num_beams, cfg.length_penalty, cfg.no_repeat_ngram_size, cfg.max_new_tokens) \
        == (3, 1.0, 0, 5)


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
    monkeypatch.setattr(st, "build_task_data", lambda config, tokenizer: None)
    monkeypatch.setattr(loralab.training.loop, "train", lambda tc, **kw: {"status": "finished",
                                                                   "metrics": {}, "costs": {}})
    config = st.run_matrix(st.parse_study(BASE), tmp_path)[1].config
    st.default_run_fn(config, False)
    torch.rand(100)  # an earlier run used the global RNG
    st.default_run_fn(config, False)
    assert torch.equal(drawn[0], drawn[1])


def test_auto_precision_keeps_study_hashes_where_bf16_is_emulated_and_pins_bf16_where_native():
    """A study that names no precision runs at auto. Without native bf16 (this AVX2 machine)
    auto is fp32, which is what such a config meant before auto existed: the run configs, and
    so their hashes and finished runs, stay exactly as they were. With native bf16 the runs
    compute in bf16, a different computation: `precision: bf16` enters the config and the hash.
    An explicit precision is kept as written."""
    study = st.load_study(st.resolve_study_path("default"))
    strategies = {s.name: s for s in study.strategies}
    out = Path("/tmp/x")
    emulated = st.run_matrix(study, out, native_bf16=False)
    native = st.run_matrix(study, out, native_bf16=True)
    for spec, pinned in zip(emulated, native, strict=True):
        before = st.run_config(study, strategies[spec.strategy], spec.seed, spec.run_dir)
        assert "precision" not in before and spec.config == before
        assert spec.config_hash == st.config_hash(before)
        assert pinned.config == {**before, "precision": "bf16"}
        assert pinned.config_hash != spec.config_hash
    for written, expected in (("fp32", ("fp32", "fp32")), ("bf16", ("bf16", "bf16")),
                              ("auto", ("fp32", "bf16"))):
        s = st.parse_study(BASE.replace("lr: 1.0e-3}", f"lr: 1.0e-3, precision: {written}}}"))
        got = tuple({sp.config["precision"] for sp in st.run_matrix(s, out, native_bf16=n)}
                    for n in (False, True))
        assert got == ({expected[0]}, {expected[1]})


def test_study_precision_must_be_auto_fp32_or_bf16():
    with pytest.raises(UserError, match=r"<study>:6: unknown precision 'fp16' in budget; use "
                                        "auto, fp32, bf16"):
        st.parse_study(BASE.replace("lr: 1.0e-3}", "lr: 1.0e-3, precision: fp16}"))


# ----------------------------------------------------------------------------- reloading a run
# `load_run_model` (`loralab eval/generate/merge --run`) must rebuild exactly the model whose
# metrics the run recorded, for every method (issue 19): W + s B A for lora, Q(W) + s B A for
# qlora, the merged quantized Q(W + s B A) for qat-lora and lora-ptq, ...


@pytest.fixture(scope="module")
def tiny_lm_run_inputs(tmp_path_factory):
    """A tiny random LLaMA (tied head) with the bundled GPT-2 tokenizer, saved as a model
    directory, and a small .txt corpus (split 90/5/5 by loralab.data.tasks): the case script's setup."""
    from conftest import save_tiny_llama_inputs

    return save_tiny_llama_inputs(tmp_path_factory.mktemp("tiny-lm"), 64,
                                  ("the river city centre runs past near old bridge town "
                                   "market boats birds water").split())


def _train_tiny(inputs: Path, out: Path, method: str, quant: str | None = None, **kw) -> dict:
    from loralab.training.config import make_config
    from loralab.training.loop import train

    values = {"model": str(inputs / "llama"), "task": "lm", "data": str(inputs / "text.txt"),
              "method": method, "preset": "attn-proj-ffn", "rank": 4, "max_steps": 6,
              "batch_size": 8, "seq_len": 32, "lr": 1e-2, "out": str(out), "compile": "off",
              **kw}
    if quant is not None:
        values["quant"] = quant
    return train(make_config(values))


@pytest.mark.slow
def test_qlora_run_reloads_on_its_quantized_base(tiny_lm_run_inputs, tmp_path, capsys):
    """The case qlora_reeval: re-evaluating a qlora run used the float base W + s B A instead
    of the quantized Q(W) + s B A it trained and recorded (10.595728 vs 10.596695 nats)."""
    import torch

    from loralab import load_adapter
    from loralab.cli.main import main
    from loralab.data.tasks import load_task_data
    from loralab.models.loading import load_model
    from loralab.quant.core import is_quantized_tensor, prepare_method
    from loralab.training.evaluate import evaluate
    from loralab.training.saved import evaluate_saved
    from loralab.training.config import make_config

    inputs, run = tiny_lm_run_inputs, tmp_path / "run"
    rec = _train_tiny(inputs, run, "qlora", "nf4")
    recorded = rec["metrics"]["validation"]["loss"]
    cfg = make_config(rec["config"])
    loaded = load_model(cfg.model, "lm")  # Q(W) + adapter rebuilt by hand
    prepare_method(loaded.model, "qlora", "nf4")
    load_adapter(loaded.model, run / "adapter")
    data = load_task_data(cfg.data, "lm", loaded.tokenizer, seq_len=cfg.seq_len, seed=cfg.seed)
    by_hand = evaluate(loaded.model.eval(), data.splits["validation"], data.collate_fn,
                       cfg)["loss"]
    again = evaluate_saved(run_dir=run, splits=("validation",))["validation"]["loss"]
    # the same quantized weights, adapter and batches through the same kernels: equal up to
    # the order of the per-batch loss sums (none here), so 1e-6 relative is tight (the float
    # base was off by 1e-4 relative, the quantization error of this tiny random model)
    assert by_hand == pytest.approx(recorded, rel=1e-6, abs=0)
    assert again == pytest.approx(recorded, rel=1e-6, abs=0)
    net, _, _ = st.load_run_model(run)
    adapted = [m for m in net.modules() if hasattr(m, "lora_A")]
    assert adapted and all(is_quantized_tensor(m.base.weight) for m in adapted)

    # merge --run writes the float form of Q(W) + s B A: dequant(Q(W)) + s B A, and says so
    assert main(["merge", "--run", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "dequant(Q(W)) + s B A" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(is_quantized_tensor(p) for p in merged.parameters())
    batch = data.collate_fn([data.splits["validation"][i] for i in range(4)])
    with torch.no_grad():  # one fp32 sum W' = deq(Q(W)) + s B A instead of two matmuls
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits,
                                   net(input_ids=batch["input_ids"]).logits,
                                   rtol=1e-4, atol=1e-4)

    # an old run that does not record its scheme: a one-line error, not the wrong model
    record = json.loads((run / "record.json").read_text())
    record["config"].pop("quant")
    record.pop("quant")
    (run / "record.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="records no quantization scheme.*re-run it"):
        st.load_run_model(run)


METHODS = [("none", None), ("full", None), ("head", None), ("lora", None), ("lora-head", None),
           ("qat-lora", "int4"), ("qlora", "int8"), ("lora-ptq", "nf4")]


@pytest.mark.slow
@pytest.mark.parametrize("method,scheme", METHODS, ids=[m for m, _ in METHODS])
def test_reevaluating_a_run_reproduces_its_recorded_metrics(tiny_lm_run_inputs, tmp_path,
                                                            method, scheme):
    """`loralab eval RUN` (train.evaluate_saved -> load_run_model) re-evaluates exactly the
    model whose metrics each method records."""
    from loralab.training.saved import evaluate_saved

    rec = _train_tiny(tiny_lm_run_inputs, tmp_path / "run", method, scheme, max_steps=3)
    again = evaluate_saved(run_dir=tmp_path / "run")
    assert set(again) == {"validation", "test"}
    for split, metrics in again.items():
        recorded = rec["metrics"][split]
        assert set(metrics) == set(recorded)
        for key, value in metrics.items():
            # the same weights through the same evaluation code on the same batches
            assert value == pytest.approx(recorded[key], rel=1e-6, abs=1e-9), (split, key)
