"""The report tables, read back from report.md: bold best, mean ± std, published rows, costs,
quantization and deployment."""

from __future__ import annotations

import statistics

from loralab.report import collect, tables


def test_quality_table_mean_std_and_bold(built):
    md = (built / "report.md").read_text()
    full = statistics.fmean([20.0, 22.0]), statistics.stdev([20.0, 22.0])
    lora = statistics.fmean([19.0, 20.0]), statistics.stdev([19.0, 20.0])
    wl = md.split("### Quality on wiki-leads")[1].split("###")[0]
    # lower perplexity is better: lora-1 is bold on wiki-leads, full is not
    assert f"**{tables.fmt_value(lora[0])} ± {tables.fmt_value(lora[1])}**" in wl
    assert f"| {tables.fmt_value(full[0])} ± {tables.fmt_value(full[1])} |" in wl
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


def test_untuned_row_has_no_training_costs(built):
    """The untuned model trains nothing: its train time, tokens/s, peak memory and adapter size
    are "not trained", not a sampled number; the trainable-parameter count (0) stays."""
    md = (built / "report.md").read_text()
    cost = md.split("### Cost per strategy")[1].split("##")[0]
    row = next(line for line in cost.splitlines() if line.startswith("| untuned |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["untuned", "none", "0", "0%"]
    # its data preparation is real (the eval sets are tokenised), its training costs are not
    assert cells[4:] == [tables.NOT_TRAINED, "0.5"] + [tables.NOT_TRAINED] * 3
    assert "not trained" in cost
    data = collect.load(built)[0]
    assert "## Quantization" not in md and tables.quant_tables(data) == []


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
    rows = {r[0]: dict(zip(t["header"], r, strict=True)) for k, r in t.items() if k != "header"}
    assert set(rows) == {"ptq", "qat", "qlora-nf4"}  # float lora and untuned have no section
    ptq = rows["ptq"]
    assert ptq["method"] == "lora-ptq" and ptq["scheme"] == "int8"
    assert ptq["float MB (fp32 weights)"] == "4"
    mb = [2.0, 2.000001]
    assert ptq["quantized MB (disk)"] == tables.fmt_stat(collect.Stat(mb))
    assert ptq["latency merged (ms)"] == f"20.5 ± {tables.fmt_value(statistics.stdev([20, 21]))}"
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
    f1 = lambda k: tables.fmt_stat(collect.Stat([0.5 + 0.01 * k, 0.502 + 0.01 * k]))  # noqa
    assert ptq[3] == f1(2) and qat[3] == f1(3) and qat[5].startswith("3 ±")
    assert plain[3][5] == "–"  # QLoRA served unmerged: no merged model file of its own
    # best per column in bold: highest f1 (the float row), smallest size, lowest latency
    table = tables.deploy_table(collect.load(qbuilt)[0])
    assert (0, 3) in table.bold and (0, 6) in table.bold and (1, 5) in table.bold
    assert (2, 3) not in table.bold and (0, 5) not in table.bold
    assert body[0][3] == "**0.55**"


def _row(strategy: str, method: str, peft: dict | None = None) -> dict:
    study = {"method": method} | ({"peft": peft} if peft is not None else {})
    return {"study": "s", "strategy": strategy, "seed": 0, "status": "finished",
            "run_id": f"s/{strategy}/seed0", "config": {"study": study, "train": None},
            "metrics": {"val": {"loss": 1.0}}, "costs": {"trainable_params": 10}}


def test_each_row_is_marked_with_its_implementation():
    """loralab's methods say "loralab", method peft "PEFT <type>" (default LoRA; PEFT's own
    spelling of the type), the untuned row "–"; the cost table gets the column only when a
    study has a PEFT row, so other studies keep their table; the CSV always has it."""
    from loralab.report import render

    assert collect.implementation("lora") == "loralab"
    assert collect.implementation("qlora") == "loralab"
    assert collect.implementation("none") == "–" and collect.implementation("gone") == "–"
    assert collect.implementation("peft") == "PEFT LoRA"
    assert collect.implementation("peft", {"type": "ia3"}) == "PEFT IA3"
    assert collect.implementation("peft", {"type": "VeraConfig"}) == "PEFT VeRA"
    rows = [_row("untuned", "none"), _row("ours", "lora"), _row("theirs", "peft"),
            _row("ia3", "peft", {"type": "IA3"})]
    data = collect.collect(rows, "s")
    cost = tables.cost_table(data)
    assert cost.header[:3] == ["strategy", "method", "implementation"]
    assert [r[2] for r in cost.rows] == ["–", "loralab", "PEFT LoRA", "PEFT IA3"]
    assert "PEFT <type>" in cost.note
    lines = render.text_table(cost).splitlines()
    assert next(line for line in lines if line.startswith("ours")).split()[:3] == [
        "ours", "lora", "loralab"]
    assert "PEFT IA3" in next(line for line in lines if line.startswith("ia3"))
    header, out = render.csv_rows(data)
    assert header[7] == "implementation"
    assert [r["implementation"] for r in out] == ["–", "loralab", "PEFT LoRA", "PEFT IA3"]
    plain = tables.cost_table(collect.collect(rows[:2], "s"))
    assert "implementation" not in plain.header and "PEFT" not in plain.note
