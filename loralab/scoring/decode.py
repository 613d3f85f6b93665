"""Batched greedy and beam-search decoding, stopping at EOS.

`PAPER_BEAM` is the LoRA paper's E2E setting (beam 10, length penalty 0.8, no repeated 4-gram,
at most 64 new tokens); `GREEDY` is argmax decoding. Decoder-only models are fed left-padded
batches (the prompt's last token sits at the end of every row, so the next token is predicted
from the same place for all rows; the attention mask hides the padding and transformers derives
positions from it), which makes a batch decode the same tokens as one prompt at a time (tested).
Decoding itself is transformers' `generate`, with sampling off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loralab.progress import Progress


@dataclass(frozen=True)
class DecodeConfig:
    """Deterministic decoding settings; num_beams=1 is greedy."""

    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"bad decoding settings: {self}")


PAPER_BEAM = DecodeConfig()
GREEDY = DecodeConfig(num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0)


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], *, config: DecodeConfig = PAPER_BEAM,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 batch_size: int = 8, progress: str | None = None) -> list[list[int]]:
    """New token ids for each prompt (prompt not included), cut after the first EOS (kept).

    Prompts are decoded `batch_size` at a time: left-padded for decoder-only models, right-padded
    for encoder-decoders (whose encoder sees the mask and whose decoder starts fresh).
    `progress`: a label under which decoded prompts and elapsed time are shown on stderr
    (`loralab.progress`: a bar on a terminal, plain lines otherwise); None = silent.
    """
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    pad = pad_token_id if pad_token_id is not None else (
        model.config.pad_token_id if model.config.pad_token_id is not None else eos)
    if pad is None:
        raise ValueError("need a pad or EOS token id to batch prompts")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    shown = Progress(progress or "", len(prompts), "prompt", "prompts",
                     enabled=progress is not None)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start:start + batch_size]]
            if any(not p for p in chunk):
                raise ValueError("every prompt needs at least one token")
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(chunk):
                if encoder_decoder:
                    ids[row, :len(p)] = torch.tensor(p)
                    mask[row, :len(p)] = 1
                else:
                    ids[row, width - len(p):] = torch.tensor(p)
                    mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 do_sample=False, num_beams=config.num_beams,
                                 length_penalty=config.length_penalty,
                                 no_repeat_ngram_size=config.no_repeat_ngram_size,
                                 max_new_tokens=config.max_new_tokens,
                                 early_stopping=config.num_beams > 1 or None,
                                 eos_token_id=eos, pad_token_id=pad)
            new = out if encoder_decoder else out[:, width:]
            for row in new.tolist():
                if encoder_decoder and row and row[0] == model.config.decoder_start_token_id:
                    row = row[1:]
                if eos is not None and eos in row:
                    row = row[:row.index(eos) + 1]
                outputs.append(row)
            shown.update(len(new))
    finally:
        model.train(was_training)
    shown.close()
    return outputs


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt the way `loralab.data.tokenise` tokenises training text: no special
    tokens, except a BOS first when the tokenizer normally adds one (Gemma: yes; GPT-2,
    SmolLM2: no). An empty prompt becomes [BOS] (or [EOS]) so there is something to continue."""
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        ids = [[bos] + x for x in ids]
    start = bos if bos is not None else tokenizer.eos_token_id
    return [x or [start] for x in ids]


def generate_texts(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                   config: DecodeConfig = PAPER_BEAM, batch_size: int = 8,
                   progress: str | None = None) -> list[str]:
    """Decode each prompt and return the continuation text (special tokens dropped, stripped).

    A prompt is a string (tokenised by `encode_prompts`) or a list of token ids (used as is:
    e.g. the first tokens of a held-out block, with no decode/re-encode round trip).
    `progress`: a label to show decoding progress under (`generate_ids`)."""
    texts = [p for p in prompts if isinstance(p, str)]
    it = iter(encode_prompts(tokenizer, texts) if texts else [])
    encoded = [next(it) if isinstance(p, str) else list(p) for p in prompts]
    ids = generate_ids(model, encoded, config=config, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
                       progress=progress)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
