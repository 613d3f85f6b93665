"""Language-modelling and classification metrics against naive references and scikit-learn."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_gpt2
from loralab.scoring.metrics import (
    bits_per_byte,
    evaluate_lm,
    lambada_scores,
    perplexity,
    strided_perplexity,
    token_nll_sum,
    word_perplexity,
)
from loralab.training.evaluate import classification_scores


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
    # in log space (the mean NLL, ~4.8): padded 2-row batches vs one unpadded row at a time run
    # GEMMs of other shapes, whose fp32 sums may round differently on another CPU (AVX-512
    # blocking): ~1e-7 relative per token; 1e-5 is >20x that and 400x below the 4e-3 by which
    # the mean of batch means (asserted below) differs
    assert math.log(result["perplexity"]) == pytest.approx(sum(every) / len(every), abs=1e-5)
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
    # the same forward in both (one 50-token window): only the float64 sum order differs
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
    # 16-token windows vs one forward per token of 2..16 tokens: GEMMs and attention of other
    # shapes, equal to the bit on AVX2 but free to round differently on another CPU (~1e-7
    # relative per fp32 token NLL); 1e-6 still sees a window with the wrong context, which
    # moves this sum by >= 3.5e-5 (stride 12 instead of 8: 2e-3)
    assert res["nll"] == pytest.approx(total, rel=1e-6)
    assert res["perplexity"] > 1


def _window_reference(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """(NLL sum, tokens) scoring each token t >= 1 on its own, given exactly the context its
    window gives: windows of max_length tokens start every s = min(stride, max_length - 1)
    tokens (a window's first token is never predicted), and t belongs to the first window that
    holds it at a non-first position, k = max(0, ceil((t + 1 - max_length) / s)), so its
    context is ids[k*s : t]."""
    step = min(stride, max_length - 1)
    total = 0.0
    for t in range(1, len(ids)):
        begin = max(0, math.ceil((t + 1 - max_length) / step)) * step
        assert begin < t and t - begin < max_length  # in the window, not its first token
        total += _naive_token_nlls(model, ids[begin:t + 1])[-1]
    return total, len(ids) - 1


class _PrefixLM(torch.nn.Module):
    """A cheap causal LM in float64: logits_j = A[x_j] + mean(B[x_0..x_j]) + P[j], so each
    prediction depends on the whole context and on its position in the window (as in GPT-2),
    at a fraction of a transformer's cost (many (max_length, stride) pairs stay fast)."""

    def __init__(self, vocab: int = 50, positions: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(vocab, vocab, generator=g, dtype=torch.float64)
        self.b = torch.randn(vocab, vocab, generator=g, dtype=torch.float64)
        self.p = torch.randn(positions, vocab, generator=g, dtype=torch.float64)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        n = input_ids.shape[-1]
        prefix = self.b[input_ids].cumsum(-2) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]
        return SimpleNamespace(logits=self.a[input_ids] + prefix + self.p[:n])


def test_strided_perplexity_scores_every_token_once_with_window_context():
    # every 1 <= stride <= max_length, including stride 1 and disjoint windows (stride ==
    # max_length, where the old code skipped each window's first token), on texts shorter
    # than, equal to, one longer than and several times max_length; each token's NLL must be
    # the one it gets from exactly its window's context. float64 throughout, and the reference
    # runs the same ops on shorter inputs: only summation order differs (~1e-15), so rel 1e-12.
    model = _PrefixLM()
    g = torch.Generator().manual_seed(1)
    for n in (2, 10, 23):
        ids = torch.randint(0, 50, (n,), generator=g)
        for max_length in range(2, 10):
            for stride in range(1, max_length + 1):
                res = strided_perplexity(model, ids, max_length=max_length, stride=stride)
                assert res["tokens"] == n - 1, (n, max_length, stride)
                nll, _ = _window_reference(model, ids.tolist(), max_length, stride)
                assert res["nll"] == pytest.approx(nll, rel=1e-12), (n, max_length, stride)
    with pytest.raises(ValueError):
        strided_perplexity(model, ids, max_length=1, stride=1)
    with pytest.raises(ValueError):
        strided_perplexity(model, ids, max_length=4, stride=5)


def test_strided_perplexity_case_disjoint_equals_overlap_by_one():
    # /work/shared/cases/strided_perplexity.py: 20 tokens, stride == max_length scores 19 tokens
    # and equals stride max_length - 1 (same windows, so the same floats: exact equality)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=2, n_embd=32, n_head=2,
                                       n_positions=64)).eval()
    ids = torch.randint(0, 100, (1, 20))
    for length in (5, 8):
        got = strided_perplexity(model, ids, max_length=length, stride=length)
        ref = strided_perplexity(model, ids, max_length=length, stride=length - 1)
        assert got["tokens"] == 19
        assert got["perplexity"] == ref["perplexity"]
        assert got["nll"] == ref["nll"]


def test_strided_perplexity_gpt2_against_per_token_context():
    # a real transformer, each token scored alone with the context its window gives. The
    # reference runs the model on inputs of other lengths than the windows, so float32 matmuls
    # and softmaxes reduce in other orders/blocking (which differ between AVX2 and AVX-512/AMX
    # kernels): logits agree to ~1e-6 relative, the mean NLL (~4.9 nats) to ~1e-6, so rel 1e-5
    # on perplexity leaves a 10x margin. Scoring the wrong tokens moves it far more (below).
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (16,)).tolist()
    for max_length, stride in ((5, 5), (6, 1), (8, 3), (16, 16)):
        res = strided_perplexity(model, torch.tensor(ids), max_length=max_length, stride=stride)
        nll, tokens = _window_reference(model, ids, max_length, stride)
        assert res["tokens"] == tokens == 15
        assert res["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        if (max_length, stride) == (5, 5):  # disjoint windows that skip each first token
            skipped = [x for b in range(0, 16, 5) for x in _naive_token_nlls(model, ids[b:b + 5])]
            assert len(skipped) == 12
            assert abs(math.exp(sum(skipped) / 12) / res["perplexity"] - 1) > 1e-3


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


def _naive_prf(y: list[int], p: list[int], cls: int) -> tuple[float, float, float]:
    """Precision, recall, F1 of one class by counting; 0 where a denominator is 0."""
    tp = sum(t == cls and q == cls for t, q in zip(y, p, strict=False))
    fp = sum(t != cls and q == cls for t, q in zip(y, p, strict=False))
    fn = sum(t == cls and q != cls for t, q in zip(y, p, strict=False))
    return (tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0,
            2 * tp / (2 * tp + fp + fn) if tp else 0.0)


@pytest.mark.parametrize("n_classes,seed", [(2, 0), (2, 1), (3, 2), (5, 3)])
def test_classification_scores_equal_naive_counts(n_classes, seed):
    rng = random.Random(seed)
    y = [rng.randrange(n_classes) for _ in range(200)]
    p = [t if rng.random() < 0.6 else rng.randrange(n_classes) for t in y]
    got = classification_scores(p, y, n_classes)
    per_class = [_naive_prf(y, p, c) for c in range(n_classes)]
    macro = [sum(c[m] for c in per_class) / n_classes for m in range(3)]
    main = per_class[1] if n_classes == 2 else macro  # binary: class 1 is the positive class
    # sums of at most 5 ratios of small integers: exact up to float rounding
    assert got["accuracy"] == sum(t == q for t, q in zip(y, p, strict=False)) / len(y)
    for m, name in enumerate(("precision", "recall", "f1")):
        assert got[f"{name}_macro"] == pytest.approx(macro[m], abs=1e-12)
        assert got[name] == pytest.approx(main[m], abs=1e-12)


def test_classification_scores_degenerate_cases(recwarn):
    # positive class never predicted: binary precision undefined -> 0; class 0 P 3/4 R 1 F 6/7
    got = classification_scores([0, 0, 0, 0], [0, 0, 0, 1], 2)
    assert got["precision"] == got["recall"] == got["f1"] == 0.0
    assert got["f1_macro"] == pytest.approx((6 / 7 + 0) / 2, abs=1e-12)
    # class 3 absent from labels and predictions: it counts, with 0, in the macro means
    got = classification_scores([2, 2, 1, 0], [2, 0, 1, 1], 4)
    per_class = [_naive_prf([2, 0, 1, 1], [2, 2, 1, 0], c) for c in range(4)]
    assert got["recall_macro"] == pytest.approx(sum(c[1] for c in per_class) / 4, abs=1e-12)
    assert got["recall_macro"] == pytest.approx((0 + 1 / 2 + 1 + 0) / 4, abs=1e-12)
    assert got["precision"] == got["precision_macro"]  # > 2 classes: the main figure is macro
    assert not [w for w in recwarn if "ill-defined" in str(w.message)]  # zero_division=0
    with pytest.raises(ValueError, match="predictions"):
        classification_scores([0], [0, 1], 2)
