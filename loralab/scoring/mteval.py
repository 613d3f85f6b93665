"""BLEU and NIST as NIST's `mteval-v13a` Perl script computes them (the E2E challenge's scorer).

Corpus level, several references per source, the script's own normalisation (ASCII
lower-casing, punctuation split off) re-implemented in `mteval_tokenize`. BLEU (closest
reference length, the script's "exp" smoothing) is sacrebleu's `corpus_bleu` on those tokens;
NIST (n-gram information weights from the reference corpus) is re-implemented in `mteval_nist`,
since no library computes the script's figure, including the script's quirks.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_MTEVAL_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")
_MTEVAL_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([.,])")
_MTEVAL_PERIOD_COMMA_BEFORE = re.compile(r"([.,])([^0-9])")
_MTEVAL_DIGIT_DASH = re.compile(r"([0-9])(-)")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def mteval_tokenize(text: str, lowercase: bool = True) -> list[str]:
    """mteval-v13a's default ("western") normalisation, then split on whitespace.

    Entities &quot; &amp; &lt; &gt; are decoded; only ASCII A-Z is lower-cased; ASCII
    punctuation and symbols except ' - . , are split off; . and , are split off unless they sit
    between digits; a - after a digit is split off.
    """
    t = re.sub(r"\s+", " ", text)  # the script joins the SGML segment's whitespace first
    t = t.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    t = t.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    t = f" {t} "
    if lowercase:
        t = t.translate(_ASCII_LOWER)
    t = _MTEVAL_PUNCT.sub(r" \1 ", t)
    t = _MTEVAL_PERIOD_COMMA_AFTER.sub(r"\1 \2 ", t)
    t = _MTEVAL_PERIOD_COMMA_BEFORE.sub(r" \1 \2", t)
    t = _MTEVAL_DIGIT_DASH.sub(r"\1 \2 ", t)
    return t.split()


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_n + 1):  # zip of n shifted copies: the n-grams, counted in C
        counts.update(zip(*(words[i:] for i in range(n)), strict=False))
    return counts


def _nist_length_penalty(ratio: float) -> float:
    """NIST's brevity factor: 1 at ratio >= 1, 0.5 at ratio 2/3, exp(-beta log^2 ratio)."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def mteval_bleu(tok_refs: Sequence[Sequence[Sequence[str]]], tok_hyps: Sequence[Sequence[str]]
                ) -> float:
    """mteval-v13a corpus BLEU-4 on mteval tokens, computed by sacrebleu's `corpus_bleu`
    (`tokenize="none"` on the joined tokens, `smooth_method="exp"`, the script's smoothing).

    BLEU = BP * exp(mean_{n<=4} log p_n), p_n = clipped n-gram matches / hypothesis n-grams
    summed over the corpus (the k-th order with no match counts 1 / (2^k * hypothesis n-grams)),
    BP = exp(min(0, 1 - r/c)) with r the sum over segments of the reference length closest to
    the hypothesis length (ties -> shorter). Equal to the official figures (tests) and to 1e-15
    to the Perl script's arithmetic on the E2E dev and test sets.

    References: sacrebleu takes one stream per reference position, None where a source has no
    such reference; the official scorer pads with empty strings, which mteval skips in the
    closest length except the first reference (whose length it takes unchecked). So empty
    references other than the first become None here. Two corpora where sacrebleu gives 0
    and the script a small positive number: no n-gram matches at all, or no hypothesis n-gram of
    some order n <= 4 in the whole corpus (every output shorter than 4 tokens); neither happens
    on real E2E outputs.
    """
    import sacrebleu

    if len(tok_refs) != len(tok_hyps):
        raise ValueError(f"{len(tok_hyps)} hypotheses but {len(tok_refs)} reference lists")
    width = max(len(rs) for rs in tok_refs)
    streams = [[" ".join(rs[i]) if i < len(rs) and (i == 0 or rs[i]) else None
                for rs in tok_refs] for i in range(width)]
    hyps = [" ".join(h) for h in tok_hyps]
    # force: the text is tokenised on purpose (sacrebleu would warn about "tokenized periods")
    bleu = sacrebleu.corpus_bleu(hyps, streams,  # type: ignore[arg-type]  # takes None refs
                                 tokenize="none", smooth_method="exp", force=True)
    return bleu.score / 100


def mteval_nist(tok_refs: Sequence[Sequence[Sequence[str]]], tok_hyps: Sequence[Sequence[str]]
                ) -> float:
    """NIST-5 exactly as the official scorer's mteval-v13a computes it, on mteval tokens.

    NIST = sum_{n<=5} info(matched n-grams) / hypothesis n-grams, info(w1..wn) =
    -log2(count(w1..wn) / count(w1..wn-1)) over all references, times the NIST length penalty
    of c / (total reference words / mean number of non-empty references per source).
    (NLTK's `corpus_nist` is not a substitute: it gives 7.41 where the script gives 8.58 on
    the same tokens.)

    Sources may have different numbers of references (as in E2E). The official scorer pads them
    to the largest count with empty strings, and its modified mteval ("NIST to work with average
    number of non-empty references") counts only the non-empty ones per segment: dividing by the
    padded count would make the average reference too short and the length penalty too mild.
    A bigram whose first word is "0" takes the total word count as its denominator, because
    Perl reads the prefix string "0" as false; kept for identical scores.
    """
    if len(tok_refs) != len(tok_hyps):
        raise ValueError(f"{len(tok_hyps)} hypotheses but {len(tok_refs)} reference lists")
    max_n = 5
    ref_ngram_total: Counter = Counter()
    total_ref_words = 0
    ref_counts = []
    for rs in tok_refs:
        per_ref = [_ngram_counts(r, max_n) for r in rs]
        ref_counts.append(per_ref)
        for r, c in zip(rs, per_ref, strict=False):
            total_ref_words += len(r)
            ref_ngram_total.update(c)
    if total_ref_words == 0:
        raise ValueError("the references contain no words")
    info: dict[tuple, float] = {}
    for gram, count in ref_ngram_total.items():
        prefix = gram[:-1]  # mteval: `$mgram ? count(mgram) : tot_wrds`; Perl's "0" is false
        denom = ref_ngram_total[prefix] if prefix and prefix != ("0",) else total_ref_words
        info[gram] = -math.log2(count / denom)

    tst = [0] * (max_n + 1)
    tst_info = [0.0] * (max_n + 1)
    for hyp, rcs in zip(tok_hyps, ref_counts, strict=False):
        ref_max: dict[tuple, int] = {}  # per n-gram the largest count in one reference
        for rc in rcs:
            for gram, count in rc.items():
                if count > ref_max.get(gram, 0):
                    ref_max[gram] = count
        for n in range(1, max_n + 1):
            tst[n] += max(len(hyp) - n + 1, 0)
        for gram, count in _ngram_counts(hyp, max_n).items():
            if gram in ref_max:
                tst_info[len(gram)] += info[gram] * min(count, ref_max[gram])
    nist = sum(tst_info[n] / max(tst[n], 1) for n in range(1, max_n + 1))
    # mean non-empty references per source (the script's $cum_ref_count / $cum_seg_count)
    mean_refs = sum(1 for rs in tok_refs for r in rs if r) / len(tok_refs)
    return nist * _nist_length_penalty(tst[1] / (total_ref_words / mean_refs))


def mteval_bleu_nist(refs: Sequence[Sequence[str]], hyps: Sequence[str], *,
                     lowercase: bool = True) -> dict[str, float]:
    """The official scorer's BLEU and NIST: mteval-v13a tokenisation (`mteval_tokenize`, done
    once for both), BLEU by sacrebleu (`mteval_bleu`), NIST by `mteval_nist`."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    tok_refs = [[mteval_tokenize(r, lowercase) for r in rs] for rs in refs]
    tok_hyps = [mteval_tokenize(h, lowercase) for h in hyps]
    return {"BLEU": mteval_bleu(tok_refs, tok_hyps), "NIST": mteval_nist(tok_refs, tok_hyps)}
