"""The report, built from records in the database alone: tables, bold best, mean ± std, published
rows, CSV, plots, and a self-contained HTML file."""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import pytest

from loralab.report import report
from loralab.study import runner as study
from loralab.results.database import ResultsDB

STUDY = """\
name: rep
model: tiny
task: lm
data: wiki-leads
eval: [wiki-leads, {name: lambada, data: wiki-lambada}]
budget: {max_steps: 3, batch_size: 2, seq_len: 16, lr: 1.0e-3}
seeds: 2
strategies:
  - {name: full, method: full}
  - {name: lora-1, method: lora, preset: attn, rank: 4}
published:
  source: "A paper, Table 9"
  rows:
    - {name: LoRA (paper), params: 350000, metrics: {lambada: {perplexity: 9.5, BLEU: 0.7}}}
"""

# perplexity per (strategy, seed): lora-1 is best on wiki-leads, full on lambada
PPL = {("untuned", 0): (30.0, 40.0), ("untuned", 1): (30.0, 40.0),
       ("full", 0): (20.0, 25.0), ("full", 1): (22.0, 27.0),
       ("lora-1", 0): (19.0, 30.0), ("lora-1", 1): (20.0, 31.0)}
PARAMS = {"none": 0, "full": 1_000_000, "lora": 4_096}


def recorded_run(config: dict, resume: bool) -> dict:
    key = (config["strategy"], config["seed"])
    wl, lam = PPL[key]
    trainable = PARAMS[config["method"]]
    return {"run_id": "x", "status": "finished", "config": {"method": config["method"]},
            "metrics": {"wiki-leads": {"loss": 3.0, "perplexity": wl, "targets": 100},
                        "lambada": {"loss": 3.5, "perplexity": lam, "targets": 50},
                        "validation": {"loss": 3.1, "perplexity": 22.0, "targets": 10}},
            "costs": {"trainable_params": trainable, "total_params": 1_000_000,
                      "trainable_pct": trainable / 1e4, "artifact_bytes": trainable * 4,
                      "train_seconds": 2.0 + config["seed"], "tokens_per_second": 500.0,
                      "peak_memory_bytes": 2_000_000, "data_seconds": 0.5,
                      "load_seconds": 1.0},
            "curves": {"train_loss": [[1, 3.0], [2, 2.8], [3, 2.7]], "val_loss": [[3, 3.1]],
                       "lr": [[1, 1e-3]]},
            "artifacts": {"adapter": None, "model": None, "tensorboard": None},
            "env": {"torch": "2.13.0", "device": "cpu"},
            "notes": ["lm_head untied from the input embeddings so only the head trains"]
            if config["method"] == "full" else []}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rep")
    s = study.parse_study(STUDY)
    study.run_study(s, out, run_fn=recorded_run, progress=lambda m: None)
    report.write_report(out)
    return out


def test_files_and_plots(built):
    for name in ("report.md", "report.html", "results.csv"):
        assert (built / name).stat().st_size > 0
    plots = sorted(p.name for p in (built / "plots").glob("*.png"))
    assert plots == ["loss_curves.png", "pareto.png", "peak_memory.png", "train_time.png",
                     "trainable_params.png"]
    for p in (built / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_table_mean_std_and_bold(built):
    md = (built / "report.md").read_text()
    full = statistics.fmean([20.0, 22.0]), statistics.stdev([20.0, 22.0])
    lora = statistics.fmean([19.0, 20.0]), statistics.stdev([19.0, 20.0])
    wl = md.split("### Quality on wiki-leads")[1].split("###")[0]
    # lower perplexity is better: lora-1 is bold on wiki-leads, full is not
    assert f"**{report.fmt_value(lora[0])} ± {report.fmt_value(lora[1])}**" in wl
    assert f"| {report.fmt_value(full[0])} ± {report.fmt_value(full[1])} |" in wl
    lam = md.split("### Quality on lambada")[1].split("###")[0]
    assert "**26 ± 1.414**" in lam
    # bookkeeping counts are not quality columns; the train loop's validation split is not a
    # study eval set, so it gets no table (the CSV keeps it)
    assert "targets" not in wl and "Quality on validation" not in md


def test_published_rows_are_labelled_not_bold(built):
    md = (built / "report.md").read_text()
    lam = md.split("### Quality on lambada")[1].split("## Cost")[0]
    row = next(line for line in lam.splitlines() if "LoRA (paper)" in line)
    assert "(published)" in row and "*9.5*" in row and "**" not in row
    assert "not measured here" in lam and "A paper, Table 9" in lam
    # the published metric the runs do not measure still gets a column
    assert "BLEU" in lam.splitlines()[2]


def test_cost_table(built):
    md = (built / "report.md").read_text()
    cost = md.split("### Cost per strategy")[1]
    assert "| lora-1 | lora | 4,096 | 0.41% | 0.01638 | 0.5 | 2.5 ± 0.7071 |" in cost
    assert "| untuned | none | 0 |" in cost
    # the study's run time, split by phase, from the records alone
    note = next(line for line in cost.splitlines() if line.startswith("Run time of the whole"))
    assert "model loading" in note and "data preparation" in note and "training" in note


def test_csv_has_every_run_and_metric(built):
    rows = list(csv.DictReader((built / "results.csv").open()))
    assert len(rows) == 6
    got = {(r["strategy"], int(r["seed"])): float(r["wiki-leads/perplexity"]) for r in rows}
    assert got == {k: v[0] for k, v in PPL.items()}
    assert all(r["validation/loss"] == "3.1" for r in rows)


def test_html_is_self_contained(built):
    page = (built / "report.html").read_text()
    imgs = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    assert len(imgs) == 5 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<script" not in page and "<link" not in page
    assert page.count("<table>") == 4  # two quality tables, cost, runs


def test_report_rebuilds_from_db_alone(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(built / "results.sqlite", copy / "results.sqlite")
    report.write_report(copy)  # no run directories, no study file
    assert (copy / "report.md").read_text().split("_Generated")[0] == \
        (built / "report.md").read_text().split("_Generated")[0]
    tail = lambda p: p.read_text().split("## Quality")[1].split("## Runs")[0]  # noqa: E731
    assert tail(copy / "report.md") == tail(built / "report.md")


def test_pareto_front():
    pts = [(0, 30.0), (10, 20.0), (100, 25.0), (1000, 19.0)]
    assert report.pareto_front(pts, lower_better=True) == [(0, 30.0), (10, 20.0), (1000, 19.0)]
    acc = [(0, 0.5), (10, 0.8), (100, 0.7), (1000, 0.9)]
    assert report.pareto_front(acc, lower_better=False) == [(0, 0.5), (10, 0.8), (1000, 0.9)]


def test_metric_direction():
    assert report.lower_is_better("perplexity") and report.lower_is_better("loss")
    assert report.lower_is_better("TER") and report.lower_is_better("val_loss")
    for m in ("BLEU", "f1", "accuracy", "METEOR", "chrF", "ROUGE_L", "CIDEr", "precision"):
        assert not report.lower_is_better(m), m


def test_failed_runs_are_listed_not_aggregated(tmp_path):
    s = study.parse_study(STUDY)

    def flaky(config, resume):
        if config["strategy"] == "full" and config["seed"] == 1:
            raise RuntimeError("out of memory")
        return recorded_run(config, resume)

    study.run_study(s, tmp_path, run_fn=flaky, progress=lambda m: None)
    report.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| full | 1 | failed | RuntimeError: out of memory |" in md
    wl = md.split("### Quality on wiki-leads")[1].split("###")[0]
    assert "| full | 1 | **3** | 20 |" in wl  # one finished seed: no ± and n = 1
    text = report.terminal_report(report.load(tmp_path)[0])
    assert "Unfinished runs" in text and "out of memory" in text


def test_cli_report_and_runs(built, capsys):
    from loralab.cli.main import main

    assert main(["report", str(built)]) == 0
    out = capsys.readouterr().out
    assert "Quality on wiki-leads" in out and "Cost per strategy" in out
    assert main(["runs", str(built), "--strategy", "full"]) == 0
    out = capsys.readouterr().out
    assert "rep/full/seed0" in out and "rep/lora-1" not in out
    with ResultsDB(built / "results.sqlite") as db:
        assert len(db.list_runs()) == 6


def test_run_notes_are_in_the_report(built):
    """What training recorded about a run (an untied lm_head) reaches the report."""
    md = (built / "report.md").read_text()
    assert "lm_head untied from the input embeddings" in md
    assert "lm_head untied from the input embeddings" in (built / "report.html").read_text()


def test_untuned_row_has_no_training_costs(built):
    """The untuned model trains nothing: its train time, tokens/s, peak memory and adapter size
    are "not trained", not a sampled number; the trainable-parameter count (0) stays."""
    md = (built / "report.md").read_text()
    cost = md.split("### Cost per strategy")[1].split("##")[0]
    row = next(line for line in cost.splitlines() if line.startswith("| untuned |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["untuned", "none", "0", "0%"]
    # its data preparation is real (the eval sets are tokenised), its training costs are not
    assert cells[4:] == [report.NOT_TRAINED, "0.5"] + [report.NOT_TRAINED] * 3
    assert "not trained" in cost
    data = report.load(built)[0]
    assert "## Quantization" not in md and report.quant_tables(data) == []


# ----------------------------------------------------------------------------- quantization
QSTUDY = """\
name: q
model: tiny
task: classify
data: rt-snippets
eval: [rt-snippets]
budget: {max_steps: 3, batch_size: 2, seq_len: 16, lr: 1.0e-3}
seeds: 2
strategies:
  - {name: lora, method: lora, rank: 4}
  - {name: ptq, method: lora-ptq, rank: 4, options: {quant: int8}}
  - {name: qat, method: qat-lora, rank: 4, options: {quant: int8}}
  - {name: qlora-nf4, method: qlora, rank: 4, options: {quant: nf4}}
"""


def quant_record(config: dict, resume: bool) -> dict:
    """A run record with the "quant" section train.py/quant.finish_run writes, numbers made up
    per (strategy, seed) so every cell is traceable to one field."""
    method, seed = config["method"], config["seed"]
    k = {"none": 0, "lora": 1, "lora-ptq": 2, "qat-lora": 3, "qlora": 4}[method]
    rec = recorded_run({**config, "method": "lora", "strategy": "lora-1"}, resume)
    rec["metrics"] = {"rt-snippets": {"loss": 0.5, "accuracy": 0.6 + 0.01 * k + 0.001 * seed,
                                      "f1": 0.5 + 0.01 * k + 0.002 * seed, "targets": 8}}
    if method in ("lora-ptq", "qat-lora", "qlora"):
        m = lambda d: {"rt-snippets": {"accuracy": 0.6 + d, "f1": 0.5 + d}}  # noqa: E731
        rec["quant"] = {
            "scheme": "nf4" if method == "qlora" else "int8", "scheme_note": "x",
            "float_weight_bytes": 4_000_000, "quantized_model_bytes": 1_000_000 * k + seed,
            "merged_model_bytes": 1_000_000 * k, "quantized_model": "/x/model.pt",
            "latency": {"merged": {"median_ms": 10.0 * k + seed, "min_ms": 1, "max_ms": 99},
                        "unmerged": {"median_ms": 11.0 * k, "min_ms": 1, "max_ms": 99}},
            "merge_logit_drift": {"max_abs": 0.001 * k, "mean_abs": 0.0001, "rel_mean_abs": 0.1,
                                  "mean_kl": 1e-6 * k, "top1_agreement": 1.0 - 0.01 * seed},
            "merge_metric_drift": {"rt-snippets": {"accuracy": -0.004 * k, "f1": 0.002 * k}},
            "unmerged_metrics": m(0.02), "merged_metrics": m(0.03),
        }
        if method == "lora-ptq":
            rec["quant"]["adapter_metrics"] = m(0.05)
            rec["quant"]["float_model_bytes"] = 4_100_000
            rec["quant"]["latency"]["float"] = {"median_ms": 5.0 + seed, "min_ms": 1,
                                                "max_ms": 99}
    return rec


@pytest.fixture(scope="module")
def qbuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q")
    study.run_study(study.parse_study(QSTUDY), out, run_fn=quant_record, progress=lambda m: None)
    report.write_report(out)
    return out


def _md_rows(md: str, title: str) -> dict[str, list[str]]:
    part = md.split(f"### {title}")[1].split("###")[0].split("\n## ")[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("|")]
    return {"header": [c.strip() for c in lines[0].strip("|").split("|")],
            **{f"{i}": [c.strip() for c in ln.strip("|").split("|")]
               for i, ln in enumerate(lines[2:])}}


def test_quant_table_sizes_latency_and_drift(qbuilt):
    md = (qbuilt / "report.md").read_text()
    assert "## Quantization" in md
    t = _md_rows(md, "Quantization: size, latency and merge drift")
    rows = {r[0]: dict(zip(t["header"], r)) for k, r in t.items() if k != "header"}
    assert set(rows) == {"ptq", "qat", "qlora-nf4"}  # float lora and untuned have no section
    ptq = rows["ptq"]
    assert ptq["method"] == "lora-ptq" and ptq["scheme"] == "int8"
    assert ptq["float MB (fp32 weights)"] == "4"
    mb = [2.0, 2.000001]
    assert ptq["quantized MB (disk)"] == report.fmt_stat(report.Stat(mb))
    assert ptq["latency merged (ms)"] == f"20.5 ± {report.fmt_value(statistics.stdev([20, 21]))}"
    assert ptq["latency unmerged (ms)"] == "22"
    assert ptq["logit drift (max abs)"] == "0.002"
    assert ptq["Δ f1 merged−unmerged (rt-snippets)"] == "0.004"
    assert ptq["Δ accuracy merged−unmerged (rt-snippets)"] == "-0.008"
    assert rows["qlora-nf4"]["scheme"] == "nf4"


def test_deploy_table_puts_float_ptq_qat_side_by_side(qbuilt):
    md = (qbuilt / "report.md").read_text()
    t = _md_rows(md, "Deployment: quality, size on disk and latency")
    assert t["header"] == ["deployed model", "strategy", "scheme", "f1 (rt-snippets)",
                           "accuracy (rt-snippets)", "model MB (disk)", "latency (ms)"]
    body = [r for k, r in t.items() if k != "header"]
    labels = [r[0].strip("*") for r in body]
    assert labels == ["float + LoRA (merged, fp32)", "PTQ of float + LoRA (merged)",
                      "QAT-LoRA (merged, converted)", "QLoRA (quantized base + float adapter)",
                      "QLoRA merged into the quantized base"]
    plain = [[c.strip("*") for c in r] for r in body]
    flt, ptq, qat = plain[0], plain[1], plain[2]
    # the float row: the lora-ptq run's float adapter metrics, fp32 model size, float latency
    assert flt[3] == "0.55" and flt[5] == "4.1" and flt[6].startswith("5.5 ±")
    # PTQ and QAT: the runs' own (merged, quantized) metrics, their quantized size and latency
    f1 = lambda k: report.fmt_stat(report.Stat([0.5 + 0.01 * k, 0.502 + 0.01 * k]))  # noqa
    assert ptq[3] == f1(2) and qat[3] == f1(3) and qat[5].startswith("3 ±")
    assert plain[3][5] == "–"  # QLoRA served unmerged: no merged model file of its own
    # best per column in bold: highest f1 (the float row), smallest size, lowest latency
    table = report.deploy_table(report.load(qbuilt)[0])
    assert (0, 3) in table.bold and (0, 6) in table.bold and (1, 5) in table.bold
    assert (2, 3) not in table.bold and (0, 5) not in table.bold
    assert body[0][3] == "**0.55**"


def test_quant_in_csv_and_html(qbuilt):
    rows = list(csv.DictReader((qbuilt / "results.csv").open()))
    by = {(r["strategy"], int(r["seed"])): r for r in rows}
    assert by[("ptq", 1)]["quant/scheme"] == "int8"
    assert int(by[("ptq", 1)]["quant/quantized_model_bytes"]) == 2_000_001
    assert float(by[("qat", 0)]["quant/latency/merged/median_ms"]) == 30.0
    assert float(by[("ptq", 0)]["quant/latency/float/median_ms"]) == 5.0
    assert float(by[("qat", 0)]["quant/merge_metric_drift/rt-snippets/f1"]) == pytest.approx(0.006)
    assert float(by[("ptq", 0)]["quant/float_model_bytes"]) == 4_100_000
    assert by[("lora", 0)]["quant/scheme"] == "" and "quant/quantized_model" not in rows[0]
    page = (qbuilt / "report.html").read_text()
    assert "<h2>Quantization</h2>" in page and "Deployment: quality, size on disk" in page
    assert page.count("<table>") == 5  # quality, cost, deployment, quantization, runs
    text = report.terminal_report(report.load(qbuilt)[0])
    assert "Deployment: quality, size on disk and latency" in text


def test_number_columns_right_text_columns_left(built):
    md = (built / "report.md").read_text()
    runs = md.split("### Runs")[1].splitlines()
    assert runs[3] == "|---|---:|---|---|---|---|"  # strategy, seed, status, error, notes, dir
    cost = md.split("### Cost per strategy")[1].splitlines()
    assert cost[3] == "|---|---|" + "---:|" * 7  # strategy and method are text
    page = (built / "report.html").read_text()
    assert '<td class="t">finished</td>' in page and '<td class="t">untuned</td>' in page


def test_primary_metric_follows_the_task():
    """The Pareto view shows BLEU for data-to-text studies, perplexity for LM ones."""
    metrics = {"e2e": ["loss", "perplexity", "BLEU", "NIST", "TER"]}
    gen = report.StudyData("g", {"task": "generate"}, [], [], ["e2e"], metrics)
    lm = report.StudyData("l", {"task": "lm"}, [], [], ["e2e"], metrics)
    assert report._primary_metric(gen, "e2e") == "BLEU"
    assert report._primary_metric(lm, "e2e") == "perplexity"


def test_csv_precision_column_is_what_each_run_computed_in():
    """env.precision (auto resolved) where the run recorded it; the train config's precision
    for runs from before auto; empty when neither says."""
    def row(run_id: str, env: dict, train: dict | None) -> dict:
        return {"study": "s", "strategy": "lora", "seed": 0, "status": "finished",
                "run_id": run_id, "config": {"study": {"method": "lora"}, "train": train},
                "env": env, "metrics": {}, "costs": {}}

    rows = [row("auto", {"precision": "bf16"}, {"precision": "auto"}),
            row("old", {}, {"precision": "fp32"}), row("none", {}, None)]
    data = report.StudyData(name="s", config={}, rows=rows, strategies=[], eval_sets=[],
                            metrics={})
    header, out = report.csv_rows(data)
    assert header[:7] == ["study", "strategy", "method", "seed", "status", "run_id", "precision"]
    assert [r["precision"] for r in out] == ["bf16", "fp32", ""]
