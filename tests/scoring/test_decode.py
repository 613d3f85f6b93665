"""Decoding: greedy equals a naive argmax loop; batched equals one prompt at a time; EOS stops."""

from __future__ import annotations

import torch

from conftest import tiny_gpt2
from loralab.scoring.decode import GREEDY, PAPER_BEAM, DecodeConfig, generate_ids


def _naive_greedy(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    seq, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(token)
            new.append(token)
            if token == eos:
                break
    return new


PROMPTS = [[5, 9, 33, 2], [17], [40, 41, 42, 43, 44, 45, 46], [99, 3, 3]]


def test_paper_settings():
    assert (PAPER_BEAM.num_beams, PAPER_BEAM.length_penalty, PAPER_BEAM.no_repeat_ngram_size,
            PAPER_BEAM.max_new_tokens) == (10, 0.8, 4, 64)


def test_greedy_equals_naive_argmax_loop():
    model = tiny_gpt2()
    eos = model.config.eos_token_id
    config = DecodeConfig(num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0,
                          max_new_tokens=20)
    got = generate_ids(model, PROMPTS, config=config, batch_size=1)
    assert got == [_naive_greedy(model, p, 20, eos) for p in PROMPTS]


def test_batched_equals_one_at_a_time():
    model = tiny_gpt2()
    for config in (DecodeConfig(num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0,
                                max_new_tokens=16),
                   DecodeConfig(max_new_tokens=16)):  # beam 10, lp 0.8, no-repeat 4
        batched = generate_ids(model, PROMPTS, config=config, batch_size=4)
        single = [generate_ids(model, [p], config=config, batch_size=1)[0] for p in PROMPTS]
        assert batched == single
        assert all(len(row) <= 16 for row in batched)


def test_no_repeat_ngram_in_beam_output():
    model = tiny_gpt2()
    for row in generate_ids(model, PROMPTS, config=DecodeConfig(max_new_tokens=30)):
        grams = [tuple(row[i:i + 4]) for i in range(len(row) - 3)]
        assert len(grams) == len(set(grams))


def test_stops_at_eos():
    model = tiny_gpt2()
    free = _naive_greedy(model, PROMPTS[0], 12, eos=-1)
    eos = free[3]  # pretend the 4th generated token is EOS
    first = free.index(eos)
    got = generate_ids(model, [PROMPTS[0]], config=GREEDY, eos_token_id=eos, pad_token_id=0)
    assert got == [free[:first + 1]]
