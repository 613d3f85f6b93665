"""Writing the report from the database alone, failed runs, and the `report` / `runs` commands."""

from __future__ import annotations

from loralab.report import collect, render, write
from loralab.results.database import ResultsDB
from loralab.study.runner import run_study
from loralab.study.spec import parse_study
from report_studies import STUDY, recorded_run


def test_report_rebuilds_from_db_alone(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(built / "results.sqlite", copy / "results.sqlite")
    write.write_report(copy)  # no run directories, no study file
    assert (copy / "report.md").read_text().split("_Generated")[0] == \
        (built / "report.md").read_text().split("_Generated")[0]
    tail = lambda p: p.read_text().split("## Quality")[1].split("## Runs")[0]  # noqa: E731
    assert tail(copy / "report.md") == tail(built / "report.md")


def test_failed_runs_are_listed_not_aggregated(tmp_path):
    s = parse_study(STUDY)

    def flaky(config, resume):
        if config["strategy"] == "full" and config["seed"] == 1:
            raise RuntimeError("out of memory")
        return recorded_run(config, resume)

    run_study(s, tmp_path, run_fn=flaky, progress=lambda m: None)
    write.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| full | 1 | failed | RuntimeError: out of memory |" in md
    wl = md.split("### Quality on wiki-leads")[1].split("###")[0]
    assert "| full | 1 | **3** | 20 |" in wl  # one finished seed: no ± and n = 1
    text = render.terminal_report(collect.load(tmp_path)[0])
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
