"""A study's generation evaluation: decode an eval set's prompts and score the texts.

An eval set with `generate:` is also scored on generated text (BLEU, NIST, METEOR, ROUGE,
CIDEr, chrF, TER; `loralab.scoring.e2e`): for a `generate` task against the split's
references, for `lm` as continuations of held-out blocks. `generation_hook` is what the study
passes to `train(after_evaluation=...)`, so the scores enter the run record before train()
writes it, once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from torch import nn

from loralab.errors import UserError
from loralab.scoring import e2e as e2e_metrics
from loralab.scoring.decode import DecodeConfig, generate_texts
from loralab.scoring.generations import FILENAME, append_generations
from loralab.training.record import ExtraResults

Prompt = str | list[int]


def generation_prompts(tokenizer, task_data, ev: dict[str, Any], config: dict[str, Any]
                       ) -> list[tuple[Prompt, list[str]]]:
    """(prompt, references) pairs of an eval set, at most max_examples of them (default 50).

    task `generate`: the split's distinct sources in the training format ("source =") with all
    their references. Other tasks: held-out blocks, the first `prompt_tokens` token ids (default
    32) as the prompt (ids, not text: no decode/re-encode round trip) and the rest decoded as
    the reference; blocks of at most prompt_tokens + 4 tokens are skipped. Raises UserError
    when a `generate` eval set has no references."""
    gen = ev.get("generate") or {}
    n = gen.get("max_examples") or ev.get("max_examples") or 50
    if config["task"] == "generate":
        if not task_data.refs:
            raise UserError(f"eval set '{ev['name']}' has no references to score generations "
                            "against; remove 'generate' from it")
        split = ev.get("split") or "test"
        return list(task_data.references(split if split in task_data.refs else next(iter(
            task_data.refs))))[:n]
    k = int(gen.get("prompt_tokens") or 32)
    pairs: list[tuple[Prompt, list[str]]] = []
    for ids in task_data.splits[ev["name"]]["input_ids"][:n]:
        if len(ids) > k + 4:
            pairs.append((list(ids[:k]), [tokenizer.decode(ids[k:])]))
    return pairs


def decode_config(gen: dict[str, Any]) -> DecodeConfig:
    """The study's `generate:` options as a `DecodeConfig`. Defaults are greedy (beam 1,
    length penalty 1, no n-gram blocking, 48 new tokens); a study that wants the LoRA paper's
    beam search says so (num_beams: 10, length_penalty: 0.8, no_repeat_ngram_size: 4)."""
    return DecodeConfig(num_beams=int(gen.get("num_beams") or 1),
                        length_penalty=float(gen.get("length_penalty", 1.0)),
                        no_repeat_ngram_size=int(gen.get("no_repeat_ngram_size") or 0),
                        max_new_tokens=int(gen.get("max_new_tokens") or 48))


def generate_hypotheses(model: nn.Module, tokenizer, prompts: list[Prompt], task: str,
                        gen: dict[str, Any], *, batch_size: int = 8,
                        progress: str | None = None) -> list[str]:
    """Decode the prompts with `loralab.scoring.decode.generate_texts` (left-padded batches,
    stop at EOS; batched decoding gives the same tokens as one prompt at a time). For
    `generate` the hypothesis is the first line of the output (one sentence per MR, as the E2E
    scripts read it)."""
    texts = generate_texts(model, tokenizer, cast(Any, prompts), config=decode_config(gen),
                           batch_size=batch_size, progress=progress)
    if task == "generate":
        texts = [t.split("\n")[0].strip() for t in texts]
    return texts


def generation_scores(model: nn.Module, tokenizer, task_data, ev: dict[str, Any],
                      config: dict[str, Any], *, timings: dict[str, float] | None = None
                      ) -> dict[str, float]:
    """Decode the eval set's prompts and score them against its references with the E2E
    scorers (loralab.scoring.e2e): mteval BLEU/NIST, METEOR, ROUGE_L, CIDEr (when Java is
    installed), sacreBLEU, chrF, TER, ROUGE-1/2/L, plus `generated` (the count). `timings` (if
    given) accumulates decode_seconds and score_seconds, the two costs of a generation
    evaluation. The texts are appended to RUN/generations.jsonl (loralab.scoring.generations)
    when the config names its run (`out`). Raises UserError for an eval set without examples."""
    gen = ev.get("generate") or {}
    pairs = generation_prompts(tokenizer, task_data, ev, config)
    if not pairs:
        raise UserError(f"eval set '{ev['name']}': no examples to generate from")
    t0 = time.perf_counter()
    hyps = generate_hypotheses(model, tokenizer, [p for p, _ in pairs], config["task"], gen,
                               progress=f"decoding, {ev['name']}")
    t1 = time.perf_counter()
    java = bool(gen.get("java", True)) and shutil.which("java") is not None
    refs = [r for _, r in pairs]
    hyps = [h if h.strip() else "." for h in hyps]  # an empty output still counts, as a miss
    if config.get("out"):  # kept for reading and rescoring (`loralab score --generations`)
        append_generations(Path(config["out"]) / FILENAME, ev["name"], ev.get("split") or "test",
                           [p for p, _ in pairs], refs, hyps, tokenizer)
    scores = e2e_metrics.score_e2e(refs, hyps, java=java, progress=f"scoring, {ev['name']}")
    if timings is not None:
        timings["decode_seconds"] = timings.get("decode_seconds", 0.0) + t1 - t0
        timings["score_seconds"] = (timings.get("score_seconds", 0.0)
                                    + time.perf_counter() - t1)
    scores["generated"] = len(hyps)
    return {k: float(v) for k, v in scores.items()}


def generating_sets(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The run config's eval sets that ask for a generation evaluation."""
    return [e for e in config.get("eval_sets", []) if e.get("generate") is not None]


def score_generations(model: nn.Module, tokenizer, task_data, config: dict[str, Any],
                      scorer: Callable[..., dict[str, float]] = generation_scores
                      ) -> ExtraResults:
    """Score every generating eval set of the run: metrics per eval set, and the costs
    generation_seconds (wall time of it all), decode_seconds and score_seconds. A fresh
    RUN/generations.jsonl receives the texts (`scorer` appends to it)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if config.get("out"):
        (Path(config["out"]) / FILENAME).unlink(missing_ok=True)
    metrics = {ev["name"]: scorer(model, tokenizer, task_data, ev, config, timings=timings)
               for ev in generating_sets(config)}
    costs = {"generation_seconds": time.perf_counter() - t0, **timings}
    return ExtraResults(metrics=metrics, costs=costs)
