"""`loralab eval`: a model on a dataset, with evaluation progress."""

from __future__ import annotations

import json

import pytest

from loralab.cli.main import main


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random LLaMA (tied head, as SmolLM2) with the bundled GPT-2 tokenizer, and a small
    text corpus for one training step."""
    from conftest import save_tiny_llama_inputs

    return save_tiny_llama_inputs(tmp_path_factory.mktemp("tiny-targets"), 32,
                                  "the river city runs past old bridge town boats water".split())


def test_loralab_eval_shows_evaluation_progress(tiny_llama_dir, capsys):
    assert main(["eval", "--model", str(tiny_llama_dir / "llama"), "--task", "lm",
                 "--data", str(tiny_llama_dir / "text.txt"), "--split", "test",
                 "--seq-len", "16", "--batch-size", "8", "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("test: ")
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("evaluation, test: ") and " batches in " in last
    done, total = last.split(": ", 1)[1].split()[0].split("/")
    assert done == total and int(total) > 0


def test_eval_max_examples_bounds_every_split(tiny_llama_dir, capsys):
    argv = ["eval", "--model", str(tiny_llama_dir / "llama"), "--task", "lm",
            "--data", str(tiny_llama_dir / "text.txt"), "--split", "test", "--seq-len", "8",
            "--precision", "fp32", "--json"]

    def targets(*extra: str) -> int:
        assert main([*argv, *extra]) == 0
        return json.loads(capsys.readouterr().out)["test"]["targets"]

    everything = targets()
    assert everything > 3 * 7 and targets("--eval-max-examples", "0") == everything
    assert targets("--eval-max-examples", "3") == 3 * 7  # 3 blocks of 8 tokens: 7 predicted
    assert main([*argv, "--eval-max-examples", "-1"]) == 2
    assert "eval_max_examples must be >= 0" in capsys.readouterr().err
