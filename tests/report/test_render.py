"""Rendering: the CSV, the self-contained HTML, column alignment and the terminal report."""

from __future__ import annotations

import csv
import re

import pytest

from loralab.report import collect, render
from report_studies import PPL


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


def test_run_notes_are_in_the_report(built):
    """What training recorded about a run (an untied lm_head) reaches the report."""
    md = (built / "report.md").read_text()
    assert "lm_head untied from the input embeddings" in md
    assert "lm_head untied from the input embeddings" in (built / "report.html").read_text()


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
    text = render.terminal_report(collect.load(qbuilt)[0])
    assert "Deployment: quality, size on disk and latency" in text


def test_number_columns_right_text_columns_left(built):
    md = (built / "report.md").read_text()
    runs = md.split("### Runs")[1].splitlines()
    assert runs[3] == "|---|---:|---|---|---|---|"  # strategy, seed, status, error, notes, dir
    cost = md.split("### Cost per strategy")[1].splitlines()
    assert cost[3] == "|---|---|" + "---:|" * 7  # strategy and method are text
    page = (built / "report.html").read_text()
    assert '<td class="t">finished</td>' in page and '<td class="t">untuned</td>' in page


def test_csv_precision_column_is_what_each_run_computed_in():
    """env.precision (auto resolved) where the run recorded it; the train config's precision
    for runs from before auto; empty when neither says."""
    def row(run_id: str, env: dict, train: dict | None) -> dict:
        return {"study": "s", "strategy": "lora", "seed": 0, "status": "finished",
                "run_id": run_id, "config": {"study": {"method": "lora"}, "train": train},
                "env": env, "metrics": {}, "costs": {}}

    rows = [row("auto", {"precision": "bf16"}, {"precision": "auto"}),
            row("old", {}, {"precision": "fp32"}), row("none", {}, None)]
    data = collect.StudyData(name="s", config={}, rows=rows, strategies=[], eval_sets=[],
                            metrics={})
    header, out = render.csv_rows(data)
    assert header[:7] == ["study", "strategy", "method", "seed", "status", "run_id", "precision"]
    assert [r["precision"] for r in out] == ["bf16", "fp32", ""]
