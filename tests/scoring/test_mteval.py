"""mteval-v13a BLEU and NIST against the script's arithmetic, hand cases and the official
scorer's figures."""

from __future__ import annotations

import json
import math

import pytest

from e2e_cases import dev_groups
from loralab.cli.main import main
from loralab.scoring import mteval

# --------------------------------------------------------------------------- mteval BLEU/NIST

def test_mteval_tokenization_by_hand():
    tok = mteval.mteval_tokenize
    assert tok("The Vaults, a pub (£20-25).") == ["the", "vaults", ",", "a", "pub", "(", "£20",
                                                  "-", "25", ")", "."]
    assert tok("It's 3.5 or 1,000 &amp; x-ray") == ["it's", "3.5", "or", "1,000", "&", "x-ray"]
    assert tok("ÉCOLE Near") == ["École", "near"]  # only ASCII letters are lower-cased


def _naive_mteval_bleu(refs: list[list[str]], hyps: list[str]) -> float:
    """mteval-v13a's `bleu_score` transcribed from the Perl (default options) on mteval
    tokens: corpus n-gram precisions clipped by the per-segment maximum reference count, a
    zero match count of the k-th such order -> 1 / (2^k * hypothesis n-grams), an order with no
    hypothesis n-gram adds log 1, brevity from the closest non-empty reference length (ties to
    the shorter; the first reference's length taken unchecked)."""
    from collections import Counter

    def grams(words, n):
        return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    match, tst, ref_len = [0] * 5, [0] * 5, 0
    for rs, h in zip(refs, hyps, strict=False):
        hyp, toks = mteval.mteval_tokenize(h), [mteval.mteval_tokenize(r) for r in rs]
        closest = len(toks[0])
        for r in toks[1:]:
            d, best = abs(len(hyp) - len(r)), abs(len(hyp) - closest)
            if r and (d < best or (d == best and len(r) < closest)):
                closest = len(r)
        ref_len += closest
        for n in range(1, 5):
            ref_max: Counter = Counter()
            for r in toks:
                ref_max |= grams(r, n)
            tst[n] += max(len(hyp) - n + 1, 0)
            match[n] += sum(min(c, ref_max[g]) for g, c in grams(hyp, n).items())
    log_sum, smooth = 0.0, 1
    for n in range(1, 5):
        if tst[n] and not match[n]:
            smooth *= 2
            log_sum += math.log(1 / (smooth * tst[n]))
        elif tst[n]:
            log_sum += math.log(match[n] / tst[n])
    return math.exp(log_sum / 4) * math.exp(min(0.0, 1 - ref_len / tst[1]))


def test_bleu_equals_mteval_arithmetic_on_dev_set(e2e_dir):
    """sacrebleu's BLEU on mteval tokens (E2E sources have 1 to 15 references) equals the
    script's arithmetic, also with the official scorer's empty-string padding."""
    refs, hyps = dev_groups(e2e_dir, 547)  # all dev MRs with >= 2 references

    def tokens(groups):
        return [[mteval.mteval_tokenize(r) for r in rs] for rs in groups]

    tok_refs, tok_hyps = tokens(refs), [mteval.mteval_tokenize(h) for h in hyps]
    expected = _naive_mteval_bleu(refs, hyps)
    # same integer counts on both sides: only the last bits of exp/log can differ
    assert mteval.mteval_bleu(tok_refs, tok_hyps) == pytest.approx(expected, rel=1e-12)
    width = max(map(len, refs))
    padded = [rs + [[]] * (width - len(rs)) for rs in tok_refs]
    assert mteval.mteval_bleu(padded, tok_hyps) == pytest.approx(expected, rel=1e-12)
    refs, hyps = refs[:60], ["", "x", "the", "The Eagle", "zzz yyy xxx www"] + hyps[5:60]
    assert mteval.mteval_bleu(tokens(refs), [mteval.mteval_tokenize(h) for h in hyps]) == (
        pytest.approx(_naive_mteval_bleu(refs, hyps), rel=1e-12))  # empty, short, unmatched


def test_nist_by_hand():
    beta = -math.log(0.5) / math.log(1.5) ** 2
    # identical single sentence "a b": unigram info -log2(1/2) = 1 each, bigram info 0
    assert mteval.mteval_bleu_nist([["a b"]], ["a b"])["NIST"] == pytest.approx(1.0)
    # hypothesis "a" vs "a b": info 1 over 1 word, length ratio 1/2
    got = mteval.mteval_bleu_nist([["a b"]], ["a"])["NIST"]
    assert got == pytest.approx(math.exp(-beta * math.log(0.5) ** 2))
    # two sources with 1 and 2 references: the average reference length divides by the mean
    # number of non-empty references per source, 1.5 (the official scorer's modified mteval;
    # not the padded count 2), so 3 hyp words vs 6 ref words / 1.5 = 4: length ratio 3/4
    refs = [["x y"], ["x z", "x z"]]
    counts = {"x": 3, "y": 1, "z": 2}
    total = 6
    info = {w: -math.log2(c / total) for w, c in counts.items()}
    # bigram infos: "x y": count 1 / count(x) 3; "x z": 2 / 3
    hyp_info_1 = info["x"] + info["y"] + info["x"]
    got = mteval.mteval_bleu_nist(refs, ["x y", "x"])["NIST"]
    expected = hyp_info_1 / 3 + (-math.log2(1 / 3)) / 1
    assert got == pytest.approx(expected * math.exp(-beta * math.log(3 / 4) ** 2))


# /work/shared/cases/nist_reference_count.py: three sources with 3, 1 and 2 references; the
# expected figures are the official scorer's (its Perl mteval run on exactly these inputs)
_CASE_REFS = [["the eagle is a cheap french restaurant near the river .",
               "the eagle serves cheap french food by the river .",
               "cheap french food is served at the eagle , which is by the river ."],
              ["blue spice is a family friendly pub in the city centre ."],
              ["aromi is a coffee shop .",
               "aromi is a family friendly coffee shop near the river ."]]
_CASE_SYSTEMS = {
    "normal": (["the eagle is a cheap french restaurant near the river .",
                "blue spice is a family friendly pub in the city centre .",
                "aromi is a coffee shop near the river ."], 0.9290, 5.6376),
    "short": (["the eagle is a french restaurant .", "blue spice is a pub .",
               "aromi is a coffee shop ."], 0.4316, 1.6155),
}


@pytest.mark.parametrize("name", sorted(_CASE_SYSTEMS))
def test_nist_with_varying_reference_counts_equals_official_script(name):
    hyps, bleu, nist = _CASE_SYSTEMS[name]
    got = mteval.mteval_bleu_nist(_CASE_REFS, hyps)
    # the official scorer prints 4 decimals
    assert round(got["BLEU"], 4) == bleu
    assert round(got["NIST"], 4) == nist
    # the official scorer's own padding (empty strings up to the largest count) changes nothing
    padded = [rs + [""] * (3 - len(rs)) for rs in _CASE_REFS]
    assert mteval.mteval_bleu_nist(padded, hyps) == pytest.approx(got, rel=1e-12)


@pytest.mark.parametrize("name", sorted(_CASE_SYSTEMS))
def test_cli_score_equals_official_script_on_reference_count_case(name, tmp_path, capsys):
    hyps, bleu, nist = _CASE_SYSTEMS[name]
    refs_txt = tmp_path / "refs.txt"
    refs_txt.write_text("\n\n".join("\n".join(rs) for rs in _CASE_REFS) + "\n")
    sys_txt = tmp_path / "sys.txt"
    sys_txt.write_text("\n".join(hyps) + "\n")
    assert main(["score", str(refs_txt), str(sys_txt), "--no-java", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # the official scorer prints 4 decimals: `loralab score` must agree to the last digit
    assert (round(got["BLEU"], 4), round(got["NIST"], 4)) == (bleu, nist)


def test_nist_zero_prefix_quirk_by_hand():
    # mteval's info of an n-gram divides by the count of its (n-1)-word prefix unless that
    # prefix string is false in Perl: "" (unigrams) and also "0", so the bigram "0 a" divides by
    # the total word count. refs "0 a 0 b": counts 0:2 a:1 b:1 (4 words), "0 a":1.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = math.exp(-beta * math.log(2 / 4) ** 2)  # 2 hyp words vs 4 ref words
    unigram = (-math.log2(2 / 4) - math.log2(1 / 4)) / 2
    got = mteval.mteval_bleu_nist([["0 a 0 b"]], ["0 a"])["NIST"]
    assert got == pytest.approx((unigram - math.log2(1 / 4)) * penalty)
    # any other first word divides by its own count (2 here): info 1, not 2
    got = mteval.mteval_bleu_nist([["x a x b"]], ["x a"])["NIST"]
    assert got == pytest.approx((unigram - math.log2(1 / 2)) * penalty)


def test_bleu_smoothing_and_brevity_by_hand():
    # hyp "a b c d e" vs ref "a b x c d y": p1 = 4/5, p2 = 2/4 (ab, cd), p3 = 0 -> 1/(2*3),
    # p4 = 0 -> 1/(4*2) (the script's smoothing); brevity exp(1 - 6/5)
    got = mteval.mteval_bleu_nist([["a b x c d y"]], ["a b c d e"])["BLEU"]
    expected = math.exp((math.log(4 / 5) + math.log(2 / 4) + math.log(1 / 6) + math.log(1 / 8))
                        / 4) * math.exp(1 - 6 / 5)
    assert got == pytest.approx(expected, rel=1e-12)
    # the closest reference length skips empty references (a padded "" would be 0 words, tying
    # with 4 at distance 2 and, as the shorter, winning), as mteval's brevity_penalty_closest
    # (a second source "e f g h" supplies 3- and 4-grams, all matched: BLEU = brevity penalty)
    got = mteval.mteval_bleu_nist([["a b c d", ""], ["e f g h"]], ["a b", "e f g h"])["BLEU"]
    assert got == pytest.approx(math.exp(1 - 8 / 6))
    # ... except the first reference, whose length mteval takes unchecked (padding only appends)
    got = mteval.mteval_bleu_nist([["", "a b c d"], ["e f g h"]], ["a b", "e f g h"])["BLEU"]
    assert got == pytest.approx(1.0)
    # a known difference: with no 4-gram in the whole output sacrebleu gives 0, the script
    # exp((log 2/3 + log 1/2 + log 1/2 + 0) / 4) * exp(1 - 4/3) = 0.42; real outputs are longer
    assert mteval.mteval_bleu_nist([["a b d e"]], ["a b c"])["BLEU"] == 0.0
