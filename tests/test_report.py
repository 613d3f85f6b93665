"""The report, built from records in the database alone: tables, bold best, mean ± std, published
rows, CSV, plots, and a self-contained HTML file."""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import pytest

from loralab import report, study
from loralab.results import ResultsDB

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
                      "peak_memory_bytes": 2_000_000},
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
    assert "| lora-1 | lora | 4,096 | 0.41% | 0.01638 | 2.5 ± 0.7071 |" in cost
    assert "| untuned | none | 0 |" in cost


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
    from loralab.cli import main

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
