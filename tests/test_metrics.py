"""Language-modelling and classification metrics against naive references and scikit-learn."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_gpt2
from sklearn import metrics as skm

from loralab.metrics import (bits_per_byte, classification_metrics, confusion_matrix,
                             evaluate_lm, lambada_scores, perplexity, strided_perplexity,
                             token_nll_sum, word_perplexity)


def _naive_token_nlls(model, ids: list[int]) -> list[float]:
    """NLL of each token after the first, given all tokens before it, one position at a time."""
    out = []
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    for t in range(1, len(ids)):
        out.append(-float(torch.log_softmax(logits[t - 1], -1)[ids[t]]))
    return out


def test_token_nll_matches_transformers_loss():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (3, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    nll, n = token_nll_sum(out.logits, labels)
    assert n == int((labels[:, 1:] != -100).sum())
    assert float(nll) / n == pytest.approx(float(out.loss), rel=1e-5)


def test_perplexity_is_token_weighted_across_batches():
    model = tiny_gpt2()
    seqs = [torch.randint(0, 128, (n,)).tolist() for n in (3, 20, 7, 12)]
    batches = []
    for pair in (seqs[:2], seqs[2:]):  # right-padded batches with -100 on padding
        width = max(len(s) for s in pair)
        ids = torch.zeros((2, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, s in enumerate(pair):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            labels[r, :len(s)] = torch.tensor(s)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    result = evaluate_lm(model, batches)
    every = [x for s in seqs for x in _naive_token_nlls(model, s)]
    assert result["tokens"] == len(every) == sum(len(s) - 1 for s in seqs)
    assert result["perplexity"] == pytest.approx(math.exp(sum(every) / len(every)), rel=1e-6)
    batch_means = []
    for pair in (seqs[:2], seqs[2:]):
        nl = [x for s in pair for x in _naive_token_nlls(model, s)]
        batch_means.append(sum(nl) / len(nl))
    # the mean of batch means is a different (wrong) number here
    assert abs(math.exp(sum(batch_means) / 2) - result["perplexity"]) > 1e-6


def test_perplexity_helpers_by_hand():
    assert perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert word_perplexity(3 * math.log(10.0), 3) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_strided_perplexity_against_naive_windows():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (50,))
    # one window covering everything = plain full-context evaluation
    full = strided_perplexity(model, ids, max_length=64, stride=64)
    naive = _naive_token_nlls(model, ids.tolist())
    assert full["tokens"] == 49
    assert full["nll"] == pytest.approx(sum(naive), rel=1e-9)
    # max_length 16, stride 8: token t (t >= 16) is scored in the window starting at
    # begin = 8 * ceil((t + 1 - 16) / 8), i.e. with t - begin tokens of context
    res = strided_perplexity(model, ids, max_length=16, stride=8)
    total, count = 0.0, 0
    for t in range(1, 50):
        begin = 0 if t < 16 else 8 * math.ceil((t + 1 - 16) / 8)
        window = ids[begin:t + 1].tolist()
        total += _naive_token_nlls(model, window)[-1]
        count += 1
    assert res["tokens"] == count
    assert res["nll"] == pytest.approx(total, rel=1e-9)
    assert res["perplexity"] > 1


class _CharTokenizer:
    """Characters as ids 1..; enough of the tokenizer interface for lambada_scores."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 120) for c in text]}


def test_lambada_against_naive_greedy():
    model = tiny_gpt2()
    tok = _CharTokenizer()
    rng = random.Random(0)
    texts = [" ".join("".join(rng.choice("abcde") for _ in range(rng.randint(1, 4)))
                      for _ in range(rng.randint(2, 6))) for _ in range(12)]
    res = lambada_scores(model, tok, texts, batch_size=5)
    correct, nll, ntok = 0, 0.0, 0
    for text in texts:
        context, _, word = text.rpartition(" ")
        ctx, tgt = tok(context)["input_ids"], tok(" " + word)["input_ids"]
        nlls = _naive_token_nlls(model, ctx + tgt)[len(ctx) - 1:]
        nll += sum(nlls)
        ntok += len(tgt)
        seq = list(ctx)  # greedy decoding, one token at a time
        for _ in tgt:
            with torch.no_grad():
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        correct += seq[len(ctx):] == tgt
    assert res["n"] == len(texts)
    assert res["accuracy"] == correct / len(texts)
    assert res["perplexity"] == pytest.approx(math.exp(nll / len(texts)), rel=1e-6)
    assert res["token_perplexity"] == pytest.approx(math.exp(nll / ntok), rel=1e-6)


@pytest.mark.parametrize("n_classes,seed", [(2, 0), (2, 1), (3, 2), (5, 3)])
def test_classification_equals_sklearn(n_classes, seed):
    rng = random.Random(seed)
    y = [rng.randrange(n_classes) for _ in range(200)]
    p = [t if rng.random() < 0.6 else rng.randrange(n_classes) for t in y]
    got = classification_metrics(y, p)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score),
                     ("f1", skm.f1_score)):
        assert got[f"{name}_macro"] == pytest.approx(fn(y, p, average="macro", zero_division=0))
        average = "binary" if n_classes == 2 else "macro"
        assert got[name] == pytest.approx(fn(y, p, average=average, zero_division=0))
    assert got["confusion_matrix"] == skm.confusion_matrix(y, p).tolist()


def test_classification_degenerate_cases_equal_sklearn():
    y, p = [0, 0, 0, 1], [0, 0, 0, 0]  # positive class never predicted: precision undefined
    got = classification_metrics(y, p)
    assert got["precision"] == skm.precision_score(y, p, zero_division=0) == 0.0
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y, p, average="macro",
                                                         zero_division=0))
    y, p = [2, 0, 1, 1], [2, 2, 1, 0]
    labels = [0, 1, 2, 3]  # a class absent from both
    got = classification_metrics(y, p, labels=labels)
    assert got["recall_macro"] == pytest.approx(skm.recall_score(
        y, p, labels=labels, average="macro", zero_division=0))
    assert confusion_matrix(y, p, labels) == skm.confusion_matrix(y, p, labels=labels).tolist()
