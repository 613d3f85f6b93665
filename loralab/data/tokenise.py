"""Tokenisation for the three tasks: packing (lm), prompt + target with the loss on the target
only (generate, last-word passages), truncation (classify).

Text is encoded without special tokens, with a BOS first only where the tokenizer normally adds
one (Gemma yes; GPT-2 and SmolLM2 no), so training text starts the way the model was trained.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from loralab.errors import UserError


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id,
                   getattr(tokenizer, "add_bos_token", None))).encode())
    return h.hexdigest()


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, needed to separate documents and end "
                        "targets; use a decoder model's tokenizer (gpt2, smollm2-135m)")
    return int(tokenizer.eos_token_id)


def encode(tokenizer: Any, texts: list[str], *, bos: bool = False) -> list[list[int]]:
    """Token ids without special tokens; with `bos`, a BOS first if the tokenizer normally adds
    one (Gemma: yes; GPT-2, SmolLM2: no), so text starts the way the model was trained."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if bos and adds_bos(tokenizer):
        ids = [[tokenizer.bos_token_id] + x for x in ids]
    return ids


def adds_bos(tokenizer: Any) -> bool:
    first = tokenizer("a")["input_ids"][:1]
    return tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id]


def pack(docs: list[str], tokenizer: Any, seq_len: int) -> dict[str, Any]:
    """Documents -> one token stream ([BOS] doc EOS ...) -> blocks of seq_len, tail dropped."""
    eos = eos_id(tokenizer)
    stream: list[int] = []
    for ids in encode(tokenizer, docs, bos=True):
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // seq_len
    blocks = np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)  # (N, T)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks}


def prompt_target(prompts: list[str], targets: list[str], tokenizer: Any, seq_len: int,
                   *, eos: bool, keep_prompt_tail: bool) -> tuple[dict[str, list[Any]], int]:
    """Concatenate prompt and target ids with the loss on target ids only.

    Prompt and target are tokenised separately so the loss boundary is exact. Over-long rows:
    the prompt is cut on the left (`keep_prompt_tail`, last-word passages) or the row dropped
    (generation), and the target is cut on the right. Returns the columns and rows dropped.
    """
    eos_token = eos_id(tokenizer) if eos else None
    p_ids = encode(tokenizer, prompts, bos=True)
    t_ids = encode(tokenizer, targets)
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped = 0
    for p, t in zip(p_ids, t_ids, strict=True):
        t = t + ([eos_token] if eos_token is not None else [])
        if keep_prompt_tail:
            p = p[-(seq_len - len(t)):] if len(t) < seq_len else []
        if not p or len(p) >= seq_len:
            dropped += 1
            continue
        t = t[: seq_len - len(p)]
        out["input_ids"].append(p + t)
        out["attention_mask"].append([1] * (len(p) + len(t)))
        out["labels"].append([-100] * len(p) + t)
    return out, dropped


def generation_prompt(source: str) -> str:
    """The prompt for a source in the paper's `source = target<eos>` format."""
    return f"{source} ="


def tokenise_split(split: str, cols: dict[str, list[Any]], task: str, tokenizer: Any,
                    seq_len: int) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    if "context" in cols:  # last-word passages
        out, dropped = prompt_target(cols["context"], [" " + w for w in cols["target"]],
                                      tokenizer, seq_len, eos=False, keep_prompt_tail=True)
        out["context"], out["target"] = cols["context"], cols["target"]
        if dropped:
            raise UserError(f"seq_len {seq_len} is too short for the last-word passages")
        return out, notes
    if task == "lm":
        return pack(cols["text"], tokenizer, seq_len), notes
    if task == "classify":
        enc = tokenizer(cols["text"], truncation=True, max_length=seq_len)
        truncated = sum(len(x) >= seq_len for x in enc["input_ids"])
        if truncated:
            notes.append(f"{split}: {truncated} texts truncated to {seq_len} tokens")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": cols["label"]}, notes
    prompts = [generation_prompt(s) for s in cols["source"]]
    out, dropped = prompt_target(prompts, [" " + t for t in cols["target"]], tokenizer,
                                  seq_len, eos=True, keep_prompt_tail=False)
    if dropped:
        notes.append(f"{split}: {dropped} pairs dropped (prompt longer than seq_len {seq_len})")
    return out, notes
