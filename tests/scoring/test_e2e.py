"""E2E metrics against the official scorer's published figures; inputs, CLI, rouge-score."""

from __future__ import annotations

import csv
import json

import pytest

from e2e_cases import needs_java
from loralab.cli.main import main
from loralab.errors import UserError
from loralab.scoring import coco, e2e

# --------------------------------------------------------------------------- official figures

@needs_java
@pytest.mark.slow  # ~20 s of CPU (the METEOR JVM)
def test_official_example_scores(e2e_dir, capsys):
    ex = e2e_dir / "example"
    expected = json.loads((ex / "expected.json").read_text())
    assert main(["score", str(ex / "devel-conc.txt"), str(ex / "baseline-output.txt"),
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # the official scorer prints 4 decimals; every figure is deterministic (pure Python
    # arithmetic, or the fixed METEOR 1.5 jar), so all five must agree to the last printed digit
    for key in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"):
        assert round(got[key], 4) == expected[key], (key, got[key], expected[key])
    for key in ("chrF", "TER", "sacreBLEU"):
        assert key in got


def test_missing_java_is_a_user_error(monkeypatch):
    monkeypatch.setattr(coco.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="Java not found"):
        e2e.score_e2e([["a b c"]], ["a b c"])
    scores = e2e.score_e2e([["the pub is cheap"]], ["the pub is cheap"], java=False)
    assert "METEOR" not in scores and scores["BLEU"] == pytest.approx(1.0)  # the rest works



def test_rouge_score_is_best_reference_mean():
    from rouge_score import rouge_scorer

    refs = [["the cat sat", "a dog ran far"], ["hello world"]]
    hyps = ["a cat ran", "hello there world"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    got = e2e.rouge_score_f(refs, hyps)
    for key in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(r, h)[key].fmeasure for r in rs)
                for rs, h in zip(refs, hyps, strict=False)]
        assert got[key] == pytest.approx(sum(best) / 2)


# --------------------------------------------------------------------------- inputs and CLI

def _write_csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def test_read_inputs_csv_text_and_errors(tmp_path):
    refs_csv = tmp_path / "refs.csv"
    _write_csv(refs_csv, ["mr", "ref"], [["m1", "r1a"], ["m1", "r1b"], ["m2", "r2a"],
                                         ["m1", "r1c"]])
    sys_csv = tmp_path / "sys.csv"
    _write_csv(sys_csv, ["mr", "output"], [["m2", "o2"], ["m1", "o1"]])
    refs, hyps = e2e.read_score_inputs(refs_csv, sys_csv)
    assert hyps == ["o2", "o1"] and refs == [["r2a"], ["r1a", "r1b", "r1c"]]  # matched by MR
    sys_txt = tmp_path / "sys.txt"
    sys_txt.write_text("o1\no2\no3\n")
    refs, hyps = e2e.read_score_inputs(refs_csv, sys_txt)  # consecutive MR groups, file order
    assert refs == [["r1a", "r1b"], ["r2a"], ["r1c"]] and hyps == ["o1", "o2", "o3"]
    refs_txt = tmp_path / "refs.txt"
    refs_txt.write_text("a\nb\n\n\nc\n\nd\ne\n")
    assert e2e.read_score_inputs(refs_txt, sys_txt)[0] == [["a", "b"], ["c"], ["d", "e"]]
    single = tmp_path / "single.txt"
    single.write_text("x\ny\nz\n")
    assert e2e.read_score_inputs(single, sys_txt)[0] == [["x"], ["y"], ["z"]]

    bad_cols = tmp_path / "bad.csv"
    _write_csv(bad_cols, ["meaning", "text"], [["m1", "o"]])
    with pytest.raises(UserError, match="column"):
        e2e.read_score_inputs(refs_csv, bad_cols)
    two = tmp_path / "two.txt"
    two.write_text("o1\no2\n")
    with pytest.raises(UserError, match="counts must match"):
        e2e.read_score_inputs(refs_txt, two)
    unknown = tmp_path / "unknown.csv"
    _write_csv(unknown, ["mr", "output"], [["m9", "o"]])
    with pytest.raises(UserError, match="no reference"):
        e2e.read_score_inputs(refs_csv, unknown)
    with pytest.raises(UserError, match="not found"):
        e2e.read_score_inputs(tmp_path / "nope.csv", sys_csv)


def test_cli_errors_exit_2(tmp_path, capsys):
    sys_txt = tmp_path / "sys.txt"
    sys_txt.write_text("o1\n")
    assert main(["score", str(tmp_path / "missing.txt"), str(sys_txt)]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_table_without_java(tmp_path, capsys):
    refs = tmp_path / "refs.txt"
    refs.write_text("the pub is cheap\na cheap pub\n\nthe cafe is near\n")
    sys_txt = tmp_path / "sys.txt"
    sys_txt.write_text("the pub is cheap\nthe cafe is far\n")
    assert main(["score", str(refs), str(sys_txt), "--no-java"]) == 0
    out = capsys.readouterr().out
    assert "BLEU" in out and "TER" in out and "METEOR" not in out
