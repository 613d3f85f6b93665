"""`loralab data`: the dataset summary."""

from __future__ import annotations

from loralab.cli import main as cli


def test_cli_data_prints_summary(capsys):
    assert cli.main(["data", "rt-snippets", "--tokenizer", "minilm-l6", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "positive=" in out and "sample" in out
    assert cli.main(["data", "wiki-lambada", "--option", "splits=validation,test"]) == 0
    out = capsys.readouterr().out
    assert "target (last word" in out and "with loss" in out
    assert cli.main(["data", "nonexistent-set"]) == 2
