"""Tokenisation: BOS only where the tokenizer adds one."""

from __future__ import annotations


def test_bos_only_where_the_tokenizer_adds_one(gpt2, minilm):
    """Gemma-style tokenizers (BOS by default) get BOS before each document/prompt; GPT-2 and
    BERT-style ones do not. A GPT-2 tokenizer whose post-processor adds BOS stands in for
    Gemma's (the real one is optional and slow to load)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from loralab.data.tokenise import adds_bos, encode

    assert not adds_bos(gpt2) and not adds_bos(minilm)
    bos_tok = copy.deepcopy(gpt2)
    bos_tok.bos_token = "<|endoftext|>"
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 50256)])
    assert adds_bos(bos_tok)
    assert encode(bos_tok, ["Hello world"], bos=True) == [[50256, 15496, 995]]
    assert encode(gpt2, ["Hello world"], bos=True) == [[15496, 995]]
