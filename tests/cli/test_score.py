"""`loralab score` and decoding: plain progress lines off a terminal."""

from __future__ import annotations


def test_decoding_and_scoring_show_plain_progress_lines_off_a_terminal(capsys):
    from conftest import tiny_gpt2
    from loralab.scoring.decode import DecodeConfig, generate_ids
    from loralab.scoring.e2e import score_e2e

    prompts = [[1, 2, 3]] * 5
    generate_ids(tiny_gpt2(), prompts, config=DecodeConfig(num_beams=1, max_new_tokens=2),
                 batch_size=2, progress="decoding, test")
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("decoding, test: 5/5 prompts in ")
    assert any(line.startswith("decoding, test: 2/5 prompts,") for line in err)
    generate_ids(tiny_gpt2(), prompts, config=DecodeConfig(num_beams=1, max_new_tokens=2))
    assert capsys.readouterr().err == ""  # silent without a label
    score_e2e([["a cat sat"], ["a dog ran"]], ["a cat sat", "the dog"], java=False,
              progress="scoring")
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("scoring: 4/4 metric groups in ")
