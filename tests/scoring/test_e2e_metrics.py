"""E2E metrics against the official scorer's published figures, real peers and hand cases."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from loralab.scoring import e2e as em
from loralab.cli.main import main
from loralab.errors import UserError

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not installed")


def _dev_groups(e2e_dir, n: int, start: int = 0) -> tuple[list[list[str]], list[str]]:
    """n dev MRs: first reference as the 'system', the others as references."""
    groups: dict[str, list[str]] = {}
    with (e2e_dir / "devset.csv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            groups.setdefault(row["mr"], []).append(row["ref"])
    items = [g for g in groups.values() if len(g) >= 2][start:start + n]
    return [g[1:] for g in items], [g[0] for g in items]


# --------------------------------------------------------------------------- official figures

@needs_java
@pytest.mark.slow  # ~20 s of CPU (the METEOR JVM)
def test_official_example_scores(e2e_dir, capsys):
    ex = e2e_dir / "example"
    expected = json.loads((ex / "expected.json").read_text())
    assert main(["score", str(ex / "devel-conc.txt"), str(ex / "baseline-output.txt"),
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # the official scorer prints 4 decimals; every figure is deterministic (pure Python
    # arithmetic, or the fixed METEOR 1.5 jar), so all five must agree to the last printed digit
    for key in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"):
        assert round(got[key], 4) == expected[key], (key, got[key], expected[key])
    for key in ("chrF", "TER", "sacreBLEU"):
        assert key in got


# --------------------------------------------------------------------------- mteval BLEU/NIST

def test_mteval_tokenization_by_hand():
    tok = em.mteval_tokenize
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
    for rs, h in zip(refs, hyps):
        hyp, toks = em.mteval_tokenize(h), [em.mteval_tokenize(r) for r in rs]
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
    refs, hyps = _dev_groups(e2e_dir, 547)  # all dev MRs with >= 2 references
    tokens = lambda groups: [[em.mteval_tokenize(r) for r in rs] for rs in groups]
    tok_refs, tok_hyps = tokens(refs), [em.mteval_tokenize(h) for h in hyps]
    expected = _naive_mteval_bleu(refs, hyps)
    # same integer counts on both sides: only the last bits of exp/log can differ
    assert em.mteval_bleu(tok_refs, tok_hyps) == pytest.approx(expected, rel=1e-12)
    width = max(map(len, refs))
    padded = [rs + [[]] * (width - len(rs)) for rs in tok_refs]
    assert em.mteval_bleu(padded, tok_hyps) == pytest.approx(expected, rel=1e-12)
    refs, hyps = refs[:60], ["", "x", "the", "The Eagle", "zzz yyy xxx www"] + hyps[5:60]
    assert em.mteval_bleu(tokens(refs), [em.mteval_tokenize(h) for h in hyps]) == (
        pytest.approx(_naive_mteval_bleu(refs, hyps), rel=1e-12))  # empty, short, unmatched


def test_nist_by_hand():
    beta = -math.log(0.5) / math.log(1.5) ** 2
    # identical single sentence "a b": unigram info -log2(1/2) = 1 each, bigram info 0
    assert em.mteval_bleu_nist([["a b"]], ["a b"])["NIST"] == pytest.approx(1.0)
    # hypothesis "a" vs "a b": info 1 over 1 word, length ratio 1/2
    got = em.mteval_bleu_nist([["a b"]], ["a"])["NIST"]
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
    got = em.mteval_bleu_nist(refs, ["x y", "x"])["NIST"]
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
    got = em.mteval_bleu_nist(_CASE_REFS, hyps)
    # the official scorer prints 4 decimals
    assert round(got["BLEU"], 4) == bleu
    assert round(got["NIST"], 4) == nist
    # the official scorer's own padding (empty strings up to the largest count) changes nothing
    padded = [rs + [""] * (3 - len(rs)) for rs in _CASE_REFS]
    assert em.mteval_bleu_nist(padded, hyps) == pytest.approx(got, rel=1e-12)


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
    got = em.mteval_bleu_nist([["0 a 0 b"]], ["0 a"])["NIST"]
    assert got == pytest.approx((unigram - math.log2(1 / 4)) * penalty)
    # any other first word divides by its own count (2 here): info 1, not 2
    got = em.mteval_bleu_nist([["x a x b"]], ["x a"])["NIST"]
    assert got == pytest.approx((unigram - math.log2(1 / 2)) * penalty)


def test_bleu_smoothing_and_brevity_by_hand():
    # hyp "a b c d e" vs ref "a b x c d y": p1 = 4/5, p2 = 2/4 (ab, cd), p3 = 0 -> 1/(2*3),
    # p4 = 0 -> 1/(4*2) (the script's smoothing); brevity exp(1 - 6/5)
    got = em.mteval_bleu_nist([["a b x c d y"]], ["a b c d e"])["BLEU"]
    expected = math.exp((math.log(4 / 5) + math.log(2 / 4) + math.log(1 / 6) + math.log(1 / 8))
                        / 4) * math.exp(1 - 6 / 5)
    assert got == pytest.approx(expected, rel=1e-12)
    # the closest reference length skips empty references (a padded "" would be 0 words, tying
    # with 4 at distance 2 and, as the shorter, winning), as mteval's brevity_penalty_closest
    # (a second source "e f g h" supplies 3- and 4-grams, all matched: BLEU = brevity penalty)
    got = em.mteval_bleu_nist([["a b c d", ""], ["e f g h"]], ["a b", "e f g h"])["BLEU"]
    assert got == pytest.approx(math.exp(1 - 8 / 6))
    # ... except the first reference, whose length mteval takes unchecked (padding only appends)
    got = em.mteval_bleu_nist([["", "a b c d"], ["e f g h"]], ["a b", "e f g h"])["BLEU"]
    assert got == pytest.approx(1.0)
    # a known difference: with no 4-gram in the whole output sacrebleu gives 0, the script
    # exp((log 2/3 + log 1/2 + log 1/2 + 0) / 4) * exp(1 - 4/3) = 0.42; real outputs are longer
    assert em.mteval_bleu_nist([["a b d e"]], ["a b c"])["BLEU"] == 0.0


# --------------------------------------------------------------------------- COCO scorers

def test_rouge_l_and_cider_by_hand():
    # source 1: "a c d e" vs "a b c d": LCS 3, P = R = 3/4 -> ROUGE-L 3/4; source 2 identical
    # ROUGE-L 1. CIDEr: every n-gram is in one source's references of 2: idf log 2 for all, so
    # each order's cosine is a plain overlap: unigrams 3/4, bigrams (ac cd de vs ab bc cd) 1/3,
    # no common 3/4-grams; equal bigram counts, no length penalty: 10 (3/4 + 1/3) / 4; source 2
    # scores 10 (all four orders 1).
    got = em.coco_rouge_l_cider([["a b c d"], ["w x y z"]], ["a c d e", "w x y z"])
    assert got["ROUGE_L"] == pytest.approx((3 / 4 + 1) / 2, abs=1e-12)
    assert got["CIDEr"] == pytest.approx((10 * (3 / 4 + 1 / 3) / 4 + 10) / 2, rel=1e-12)


@pytest.mark.slow
@needs_java
def test_ptb_tokenizer_and_meteor_equal_pycocoevalcap(e2e_dir):
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, hyps = _dev_groups(e2e_dir, 40, start=100)
    hyps[0] = "Café (The Eagle) costs £20-25, doesn't it?"
    peer = PTBTokenizer().tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    ours = em.ptb_tokenize(hyps)
    assert ours == [peer[i][0] for i in range(len(hyps))]
    flat = em.ptb_tokenize([r for rs in refs for r in rs])
    tok_refs, pos = [], 0
    for rs in refs:
        tok_refs.append(flat[pos:pos + len(rs)])
        pos += len(rs)
    peer_score, peer_seg = Meteor().compute_score({i: r for i, r in enumerate(tok_refs)},
                                                  {i: [h] for i, h in enumerate(ours)})
    score, seg = em.meteor_score(tok_refs, ours)
    assert score == pytest.approx(peer_score, abs=1e-9)
    assert seg == pytest.approx(peer_seg, abs=1e-9)


def test_missing_java_is_a_user_error(monkeypatch):
    monkeypatch.setattr(em.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="Java not found"):
        em.score_e2e([["a b c"]], ["a b c"])
    scores = em.score_e2e([["the pub is cheap"]], ["the pub is cheap"], java=False)
    assert "METEOR" not in scores and scores["BLEU"] == pytest.approx(1.0)  # the rest works


# --------------------------------------------------------------------------- TER and the rest

def test_ter_equals_sacrebleu(e2e_dir):
    import sacrebleu

    refs, hyps = _dev_groups(e2e_dir, 30, start=200)
    hyps[1] = hyps[1] + " " + hyps[1]  # long hypotheses exercise the shift search
    hyps[2] = ""
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    peer = sacrebleu.corpus_ter(hyps, streams).score
    assert em.ter_score(refs, hyps, workers=1) == pytest.approx(peer, abs=1e-9)


def test_sacrebleu_version_is_bounded():
    """ter_score uses private names of sacrebleu.metrics.lib_ter: the requirement must stop
    before the next, unchecked minor version, and the installed version must satisfy it."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "sacrebleu"]
    assert any(spec.operator == "<" for spec in req.specifier), req
    assert req.specifier.contains(version("sacrebleu")), (req, version("sacrebleu"))


def test_rouge_score_is_best_reference_mean():
    from rouge_score import rouge_scorer

    refs = [["the cat sat", "a dog ran far"], ["hello world"]]
    hyps = ["a cat ran", "hello there world"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    got = em.rouge_score_f(refs, hyps)
    for key in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(r, h)[key].fmeasure for r in rs) for rs, h in zip(refs, hyps)]
        assert got[key] == pytest.approx(sum(best) / 2)


# --------------------------------------------------------------------------- inputs and CLI

def _write_csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def test_read_inputs_csv_text_and_errors(tmp_path):
    refs_csv = tmp_path / "refs.csv"
    _write_csv(refs_csv, ["mr", "ref"], [["m1", "r1a"], ["m1", "r1b"], ["m2", "r2a"],
                                         ["m1", "r1c"]])
    sys_csv = tmp_path / "sys.csv"
    _write_csv(sys_csv, ["mr", "output"], [["m2", "o2"], ["m1", "o1"]])
    refs, hyps = em.read_score_inputs(refs_csv, sys_csv)
    assert hyps == ["o2", "o1"] and refs == [["r2a"], ["r1a", "r1b", "r1c"]]  # matched by MR
    sys_txt = tmp_path / "sys.txt"
    sys_txt.write_text("o1\no2\no3\n")
    refs, hyps = em.read_score_inputs(refs_csv, sys_txt)  # consecutive MR groups, file order
    assert refs == [["r1a", "r1b"], ["r2a"], ["r1c"]] and hyps == ["o1", "o2", "o3"]
    refs_txt = tmp_path / "refs.txt"
    refs_txt.write_text("a\nb\n\n\nc\n\nd\ne\n")
    assert em.read_score_inputs(refs_txt, sys_txt)[0] == [["a", "b"], ["c"], ["d", "e"]]
    single = tmp_path / "single.txt"
    single.write_text("x\ny\nz\n")
    assert em.read_score_inputs(single, sys_txt)[0] == [["x"], ["y"], ["z"]]

    bad_cols = tmp_path / "bad.csv"
    _write_csv(bad_cols, ["meaning", "text"], [["m1", "o"]])
    with pytest.raises(UserError, match="column"):
        em.read_score_inputs(refs_csv, bad_cols)
    two = tmp_path / "two.txt"
    two.write_text("o1\no2\n")
    with pytest.raises(UserError, match="counts must match"):
        em.read_score_inputs(refs_txt, two)
    unknown = tmp_path / "unknown.csv"
    _write_csv(unknown, ["mr", "output"], [["m9", "o"]])
    with pytest.raises(UserError, match="no reference"):
        em.read_score_inputs(refs_csv, unknown)
    with pytest.raises(UserError, match="not found"):
        em.read_score_inputs(tmp_path / "nope.csv", sys_csv)


def test_cli_errors_exit_2(tmp_path, capsys):
    sys_txt = tmp_path / "sys.txt"
    sys_txt.write_text("o1\n")
    assert main(["score", str(tmp_path / "missing.txt"), str(sys_txt)]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_table_without_java(tmp_path, capsys):
    refs = tmp_path / "refs.txt"
    refs.write_text("the pub is cheap\na cheap pub\n\nthe cafe is near\n")
    sys_txt = tmp_path / "sys.txt"
    sys_txt.write_text("the pub is cheap\nthe cafe is far\n")
    assert main(["score", str(refs), str(sys_txt), "--no-java"]) == 0
    out = capsys.readouterr().out
    assert "BLEU" in out and "TER" in out and "METEOR" not in out
