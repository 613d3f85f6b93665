"""Generation evaluation of a study (loralab.study.generation): batched decoding equals one
prompt at a time, and the prompts of held-out blocks."""

from __future__ import annotations

import pytest

from loralab import study as st
from study_helpers import _word_tokenizer


def _one_at_a_time(model, prompt_ids: list[int], gen: dict, eos: int) -> list[int]:
    """The peer: HF generate on a single unpadded prompt, new tokens cut after the first EOS."""
    import torch

    out = model.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False,
                         num_beams=gen.get("num_beams", 1),
                         length_penalty=gen.get("length_penalty", 1.0),
                         no_repeat_ngram_size=gen.get("no_repeat_ngram_size", 0),
                         max_new_tokens=gen["max_new_tokens"], eos_token_id=eos,
                         pad_token_id=eos, early_stopping=gen.get("num_beams", 1) > 1 or None)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eos) + 1] if eos in new else new


@pytest.mark.parametrize("gen", [
    {"max_new_tokens": 12},                                           # the study default: greedy
    {"max_new_tokens": 12, "num_beams": 4, "length_penalty": 0.8, "no_repeat_ngram_size": 2},
])
def test_study_generation_equals_one_prompt_at_a_time(gen):
    """The study's generation path (batched, left-padded) decodes the same texts as HF generate
    fed one unpadded prompt at a time, with the study's options; text and id prompts mix."""
    from conftest import tiny_gpt2

    model, tok = tiny_gpt2(), _word_tokenizer()
    eos = tok.eos_token_id
    prompts: list = ["w5 w9 w33 w2", "w17", [40, 41, 42, 43, 44, 45, 46], "w99 w3 w3",
                     [7, 8], "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"]
    got = st.generate_hypotheses(model, tok, prompts, "lm", gen, batch_size=4)
    ids = [p if isinstance(p, list) else tok(p, add_special_tokens=False)["input_ids"]
           for p in prompts]
    want = [tok.decode(_one_at_a_time(model, p, gen, eos), skip_special_tokens=True).strip()
            for p in ids]
    assert got == want
    assert any(got) and len(set(map(len, ids))) > 2  # non-trivial: outputs, uneven lengths


def test_generation_prompts_from_held_out_blocks():
    """lm eval sets: the first prompt_tokens ids of each block are the prompt (as ids), the
    rest of the block, decoded, the reference; blocks too short to continue are skipped."""
    from types import SimpleNamespace

    tok = _word_tokenizer()
    rows = [list(range(1, 41)), list(range(50, 60)), list(range(60, 100))]
    td = SimpleNamespace(refs={}, splits={"held": {"input_ids": rows}})
    ev = {"name": "held", "generate": {"prompt_tokens": 8, "max_examples": 3}}
    pairs = st.generation_prompts(tok, td, ev, {"task": "lm"})
    assert [p for p, _ in pairs] == [rows[0][:8], rows[2][:8]]
    assert pairs[0][1] == [tok.decode(rows[0][8:])]
    cfg = st.decode_config({"max_new_tokens": 5, "num_beams": 3})
    assert (cfg.num_beams, cfg.length_penalty, cfg.no_repeat_ngram_size, cfg.max_new_tokens) \
        == (3, 1.0, 0, 5)
