"""Language-modelling and classification metrics.

Perplexity is exp of the mean negative log-likelihood per predicted token, where the mean is over
all tokens of the evaluation set: batches are combined by summing NLL and token counts, never by
averaging batch means (a batch of 3 tokens must not weigh as much as one of 300). Positions whose
label is -100 (padding, prompts, masked tokens) are ignored.

Generation metrics (BLEU, NIST, METEOR, ROUGE, CIDEr, chrF, TER) are in `loralab.scoring.e2e`;
decoding is in `loralab.scoring.decode`; classification scores are scikit-learn's
(`loralab.training.loop.classification_scores`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# --------------------------------------------------------------------------- language modelling


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True,
                  ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, int]:
    """(sum of token negative log-likelihoods in nats, number of tokens counted).

    For causal LMs (`shift=True`) the logits at position t predict the label at t+1, as in
    transformers' loss. Labels equal to `ignore_index` are skipped. The sum is in float64 so
    that long evaluations do not lose precision.
    """
    if shift:
        logits = logits[..., :-1, :]
        labels = labels[..., 1:]
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    nll = F.cross_entropy(logits.double(), labels, ignore_index=ignore_index, reduction="sum")
    return nll, int((labels != ignore_index).sum())


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(total NLL / tokens): the perplexity of a whole evaluation set from summed statistics."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(float(total_nll) / n_tokens)


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Total NLL in bits divided by the UTF-8 bytes of the text: comparable across tokenizers
    (a model with a coarser tokenizer predicts fewer, harder tokens; per-byte cost is fair)."""
    if n_bytes <= 0:
        raise ValueError("bits per byte needs a text of at least one byte")
    return float(total_nll) / (n_bytes * math.log(2))


def word_perplexity(total_nll: float, n_words: int) -> float:
    """exp(total NLL / words): perplexity per whitespace word, comparable across tokenizers
    (this is how WikiText results of models with different vocabularies are compared)."""
    if n_words <= 0:
        raise ValueError("word perplexity needs at least one word")
    return math.exp(float(total_nll) / n_words)


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
                ) -> dict[str, float]:
    """Token-weighted NLL and perplexity of a causal LM over batches of
    {input_ids, attention_mask, labels} (labels -100 where there is no loss)."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch.get("attention_mask")).logits
        nll, n = token_nll_sum(logits, batch["labels"])
        total += float(nll)
        count += n
    return {"nll": total, "tokens": count, "loss": total / max(count, 1),
            "perplexity": perplexity(total, count)}


@torch.no_grad()
def strided_perplexity(model: torch.nn.Module, input_ids: torch.Tensor, *, max_length: int,
                       stride: int) -> dict[str, float]:
    """Perplexity of one long token sequence x_0..x_{N-1} by a sliding window (transformers'
    perplexity guide, without its off-by-one at disjoint windows).

    A window of L = max_length tokens predicts at most L - 1 of them: the causal shift never
    predicts its first token, which is context only. So windows start every
    s = min(stride, L - 1) tokens: window k is x[k*s : min(k*s + L, N)] and scores only the tokens
    no earlier window scored. Token t (1 <= t < N) is therefore scored exactly once, in window
    k = max(0, ceil((t + 1 - L) / s)), with the t - k*s tokens before it in that window as
    context (at least L - s for every window after the first). stride == max_length gives the
    cheapest, least-context evaluation: windows that share one token (the previous window's last
    token is the next one's context), identical to stride = L - 1; with L-token windows that
    overlap by nothing, every window's first token would go unscored (transformers issue
    #30975). A smaller stride approaches full per-token context. The NLL is summed over all
    N - 1 scored tokens and divided by their number.
    """
    if max_length < 2:
        raise ValueError(f"need max_length >= 2 (a window of one token predicts nothing), "
                         f"got {max_length}")
    if not 0 < stride <= max_length:
        raise ValueError(f"need 0 < stride <= max_length, got stride {stride}, "
                         f"max_length {max_length}")
    step = min(stride, max_length - 1)
    ids = input_ids.reshape(1, -1)
    seq_len = ids.shape[1]
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, step):
        end = min(begin + max_length, seq_len)
        # prev_end > begin for every window after the first (step <= L - 1), so the first
        # unscored token is never the window's first token, which the shift cannot predict
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :max(prev_end - begin, 0)] = IGNORE_INDEX
        logits = model(input_ids=window).logits
        nll, n = token_nll_sum(logits, labels)
        total += float(nll)
        count += n
        prev_end = end
        if end == seq_len:
            break
    return {"nll": total, "tokens": count, "perplexity": perplexity(total, count)}


@torch.no_grad()
def lambada_scores(model: torch.nn.Module, tokenizer, texts: Sequence[str], *,
                   batch_size: int = 8) -> dict[str, float]:
    """LAMBADA-style last-word prediction: accuracy and perplexity of the final word.

    Each text is split at its last space into context and target word (" word"); the target's
    tokens are scored after the context. Accuracy: every target token is the model's argmax
    (greedy decoding would produce the whole word), as in EleutherAI's lm-evaluation-harness.
    Perplexity: exp(mean over texts of the word's total NLL), the harness's LAMBADA perplexity;
    `token_perplexity` is exp(NLL per target token).
    """
    pairs = []
    for text in texts:
        context, _, word = text.rstrip().rpartition(" ")
        if not context or not word:
            raise ValueError(f"LAMBADA text needs a context and a last word: {text[:60]!r}")
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        tgt = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        pairs.append((ctx, tgt))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct, word_nll, token_count = 0, 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(c) + len(t) for c, t in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (c, t) in enumerate(chunk):  # right padding: positions are unaffected
            seq = c + t
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
        logp = torch.log_softmax(logits, dim=-1)
        for row, (c, t) in enumerate(chunk):
            pos = torch.arange(len(c) - 1, len(c) + len(t) - 1)
            target = torch.tensor(t)
            word_nll += -float(logp[row, pos, target].sum())
            correct += int(bool((logits[row, pos].argmax(-1) == target).all()))
            token_count += len(t)
    n = len(pairs)
    return {"accuracy": correct / n, "perplexity": math.exp(word_nll / n),
            "token_perplexity": math.exp(word_nll / token_count), "n": n}
