"""E2E NLG Challenge metrics, computed the way the challenge's official scorer computes them.

The official scorer (`measure_scores.py` of tuetschek/e2e-metrics) reports five numbers:

* BLEU and NIST from NIST's `mteval-v13a` Perl script: corpus level, several references per
  source, the script's own normalisation (ASCII lower-casing, punctuation split off). The
  tokenisation is re-implemented here (`mteval_tokenize`); BLEU (closest reference length,
  the script's "exp" smoothing) is sacrebleu's `corpus_bleu` on those tokens; NIST (n-gram
  information weights from the reference corpus) is re-implemented (`mteval_nist`: no library
  computes the script's figure), including the script's quirks.
* METEOR 1.5, ROUGE-L and CIDEr from the MS-COCO caption evaluation code (pycocoevalcap) on text
  tokenised by the Stanford PTB tokenizer (`-preserveLines -lowerCase`, punctuation tokens
  dropped). METEOR and the tokenizer are the original Java jars, shipped in the `pycocoevalcap`
  wheel; each runs in one JVM call for the whole corpus (the COCO wrappers start one JVM per
  call). ROUGE-L and CIDEr are pycocoevalcap's pure-Python `Rouge` and `Cider`.

Also computed: sacreBLEU BLEU, chrF and TER (sacrebleu, on 0..100 scales as sacrebleu reports
them; TER with a vectorised edit distance, equal to sacrebleu's) and ROUGE-1/2/L F-measure
(rouge-score, best reference per segment, mean over segments).
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loralab.errors import UserError

E2E_KEYS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# --------------------------------------------------------------------------- input files

_MR_HEADER = re.compile(r"(mr|src|source|meaning(?:[_ .-]rep(?:resentation)?)?|da"
                        r"|dial(?:ogue)?[_ .-]act)s?$", re.I)
_OUT_HEADER = re.compile(r"(out(?:put)?|sys(?:tem)?(?:[_ .-](?:out(?:put)?))?|pred(?:iction)?"
                         r"|hyp(?:othesis)?)s?$", re.I)
_REF_HEADER = re.compile(r"(trg|tgt|target|ref(?:erence)?|human(?:[_ .-](?:ref(?:erence)?))?)s?$",
                         re.I)
# Encoding damage present in some E2E releases; the official reader repairs it the same way.
_MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def _is_table(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"file not found: {path}; pass an existing CSV or text file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc


def _read_table(path: Path, second: re.Pattern, second_name: str) -> tuple[list[str], list[str]]:
    """Rows of a CSV/TSV with an MR column and one text column, found by header name."""
    text = _read_text(path)
    for bad, good in _MOJIBAKE:
        text = text.replace(bad, good)
    lines = text.splitlines()
    if not lines:
        raise UserError(f"{path} is empty; it needs a header row `mr,{second_name}` and data rows")
    delimiter = "\t" if "\t" in lines[0] else ","
    rows = [row for row in csv.reader(lines, delimiter=delimiter) if row]
    header = [h.strip() for h in rows[0]]
    mr_cols = [i for i, h in enumerate(header) if _MR_HEADER.match(h)]
    txt_cols = [i for i, h in enumerate(header) if second.match(h)]
    if len(mr_cols) != 1 or len(txt_cols) != 1:
        raise UserError(f"{path}: expected one `mr` column and one `{second_name}` column in the "
                        f"header, found {header}; name the columns `mr,{second_name}`")
    bad = [n for n, row in enumerate(rows[1:], start=2) if len(row) != len(header)]
    if bad:
        raise UserError(f"{path}: rows {bad[:5]} have {len(rows[bad[0] - 1])} fields, the header "
                        f"has {len(header)}; quote fields that contain the delimiter")
    mrs = [row[mr_cols[0]] for row in rows[1:]]
    texts = [row[txt_cols[0]] for row in rows[1:]]
    return mrs, texts


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines()]


def _read_multi_ref_lines(path: Path) -> list[list[str]]:
    """Groups of references separated by blank lines; a file with no blank line is read as one
    reference per source (as the official reader does). Repeated blank lines count as one."""
    groups: list[list[str]] = [[]]
    for line in _read_lines(path):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if len(groups) == 1:
        groups = [[ref] for ref in groups[0]]
    return groups


def read_score_inputs(refs_path: str | os.PathLike, sys_path: str | os.PathLike
                      ) -> tuple[list[list[str]], list[str]]:
    """Read references and system outputs: (references per source, one output per source).

    Either file may be CSV/TSV (by extension) or plain text. SYSTEM as CSV has columns
    `mr,output` (one row per MR); as text, one output per line. REFS as CSV has columns `mr,ref`
    with several rows per MR; as text, references one per line, blank line between sources.
    When both are CSV the references are matched to outputs by MR; otherwise consecutive rows
    with the same MR form one source, in file order.
    """
    refs_path, sys_path = Path(refs_path), Path(sys_path)
    sys_mrs: list[str] | None = None
    if _is_table(sys_path):
        sys_mrs, outputs = _read_table(sys_path, _OUT_HEADER, "output")
    else:
        outputs = [line for line in _read_lines(sys_path)]
        while outputs and not outputs[-1]:
            outputs.pop()
    if _is_table(refs_path):
        ref_mrs, ref_texts = _read_table(refs_path, _REF_HEADER, "ref")
        if sys_mrs is not None:
            by_mr: dict[str, list[str]] = {}
            for mr, ref in zip(ref_mrs, ref_texts):
                by_mr.setdefault(mr, []).append(ref)
            missing = [mr for mr in sys_mrs if mr not in by_mr]
            if missing:
                raise UserError(f"{len(missing)} MR(s) of {sys_path} have no reference in "
                                f"{refs_path}, e.g. {missing[0]!r}; score against the matching "
                                "reference file")
            refs = [by_mr[mr] for mr in sys_mrs]
        else:
            refs = []
            previous = None
            for mr, ref in zip(ref_mrs, ref_texts):
                if not refs or mr != previous:
                    refs.append([ref])
                    previous = mr
                else:
                    refs[-1].append(ref)
    else:
        refs = _read_multi_ref_lines(refs_path)
    if not outputs:
        raise UserError(f"{sys_path} holds no system outputs; give one output per line or row")
    if len(refs) != len(outputs):
        raise UserError(f"{sys_path} has {len(outputs)} outputs but {refs_path} has references "
                        f"for {len(refs)} sources; the counts must match (one output per source)")
    return refs, outputs


# --------------------------------------------------------------------------- mteval-v13a

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
        counts.update(zip(*(words[i:] for i in range(n))))
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
    # force: the text is tokenised on purpose (sacrebleu would warn about "tokenized periods")
    return sacrebleu.corpus_bleu([" ".join(h) for h in tok_hyps], streams, tokenize="none",
                                 smooth_method="exp", force=True).score / 100


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
        for r, c in zip(rs, per_ref):
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
    for hyp, rcs in zip(tok_hyps, ref_counts):
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


# --------------------------------------------------------------------------- Java tools

PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                             "!", ",", ":", "-", "--", "...", ";"])


def _coco_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("pycocoevalcap is not installed (it ships the METEOR 1.5 and PTB "
                        "tokenizer jars); run `pip install pycocoevalcap`")
    return Path(list(spec.submodule_search_locations)[0])


def java_executable() -> str:
    """Path of `java`, or a UserError that says how to install it."""
    java = shutil.which("java")
    if java is None:
        raise UserError("Java not found: METEOR 1.5 and the PTB tokenizer behind METEOR, "
                        "ROUGE_L and CIDEr are Java programs; install a JRE (`sudo apt-get install "
                        "default-jre-headless` or scripts/system-deps.sh), or pass --no-java")
    return java


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Stanford PTB tokenisation as the COCO caption code runs it, in one JVM call.

    `PTBTokenizer -preserveLines -lowerCase`, then the COCO punctuation tokens are dropped.
    (It also rewrites brackets to -LRB- etc. and the pound sign to `#`, as the official scorer's
    tokenizer does.)
    """
    jar = _coco_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    java = java_executable()
    clean = [re.sub(r"[\r\n\u2028\u2029\x0b\x0c\x85]", " ", t) for t in texts]
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(clean))
        name = fh.name
    try:
        proc = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", name],
                              capture_output=True, check=False)
    finally:
        os.unlink(name)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed: {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if len(lines) < len(texts):
        # trailing empty inputs may produce no output line
        if any(t.strip() for t in clean[len(lines):]):
            raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(texts)}")
        lines += [""] * (len(texts) - len(lines))
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION)
            for line in lines[:len(texts)]]


def meteor_score(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> tuple[float, list[float]]:
    """METEOR 1.5 (`-l en -norm`) corpus score and segment scores, one JVM for the corpus.

    As the COCO wrapper does: one `SCORE ||| refs ||| hyp` line per segment returns sufficient
    statistics; one `EVAL ||| stats ||| ...` line returns each segment's score and the corpus
    score, which aggregates the statistics (it is not the mean of the segment scores).
    """
    jar = _coco_dir() / "meteor" / "meteor-1.5.jar"
    java = java_executable()
    proc = subprocess.Popen([java, "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en",
                             "-norm"], cwd=str(jar.parent), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    lines = []
    for rs, hyp in zip(refs, hyps):
        hyp = hyp.replace("|||", "").replace("  ", " ")
        lines.append(" ||| ".join(("SCORE", " ||| ".join(rs), hyp)) + "\n")
    payload = "".join(lines).encode("utf-8")

    def write() -> None:
        try:
            proc.stdin.write(payload)
            proc.stdin.flush()
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        stats = [proc.stdout.readline().decode().strip() for _ in hyps]
        writer.join()
        if any(not s for s in stats):
            raise RuntimeError("METEOR stopped early: "
                               + proc.stderr.read().decode(errors="replace")[-500:])
        proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        proc.stdin.flush()
        segment = [float(proc.stdout.readline().strip()) for _ in hyps]
        corpus = float(proc.stdout.readline().strip())
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.kill()
        proc.wait()
    return corpus, segment


# --------------------------------------------------------------------------- COCO scorers

def coco_rouge_l_cider(refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> dict[str, float]:
    """ROUGE-L and CIDEr by pycocoevalcap's `Rouge` and `Cider` (pure Python, the MS-COCO
    caption code the official scorer runs) on tokenised text (tokens joined by single spaces).

    ROUGE-L: per segment F_beta (beta 1.2) of the best LCS precision and best LCS recall over
    the references; CIDEr (not CIDEr-D): tf-idf n-gram (n <= 4) cosine with document frequencies
    from this corpus's references, Gaussian length penalty sigma 6, times 10. Both corpus
    scores are means over segments.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: list(rs) for i, rs in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    return {"ROUGE_L": float(Rouge().compute_score(gts, res)[0]),
            "CIDEr": float(Cider().compute_score(gts, res)[0])}


# --------------------------------------------------------------------------- extra metrics

def _batched_beam_distances(candidates: list[list[str]], words_ref: list[str]):
    """sacrebleu's TER beam edit distance (`lib_ter.BeamEditDistance`) for many hypotheses of
    one length at once: (distances, operation matrices for the traces).

    Same band (beam 25 around the length diagonal, full width on the last row), costs and
    tie-breaking (no-op/substitution, then deletion, then insertion, each only when strictly
    cheaper) as sacrebleu, so the same distances and traces. Each matrix row is computed for all
    candidates together: E = min(substitution/no-op, deletion) per cell, then insertions by a
    running minimum, cur[j] = min over k <= j of E[k] + (j - k), an insertion where that is
    strictly below E[j]. Cells outside the band stay infinite.
    """
    import numpy as np
    from sacrebleu.metrics import lib_ter

    inf = lib_ter._INT_INFINITY
    vocab: dict[str, int] = {}
    ref = np.array([vocab.setdefault(w, len(vocab)) for w in words_ref], dtype=np.int64)
    hyp = np.array([[vocab.get(w, -1) for w in c] for c in candidates], dtype=np.int64)
    n_c, n_h = hyp.shape
    n_r = len(words_ref)
    ratio = n_r / n_h if n_h else 1
    beam = (math.ceil(ratio / 2 + lib_ter._BEAM_WIDTH) if lib_ter._BEAM_WIDTH < ratio / 2
            else lib_ter._BEAM_WIDTH)
    cost = np.full((n_h + 1, n_c, n_r + 1), inf, dtype=np.int64)
    cost[0] = np.arange(n_r + 1, dtype=np.int64)
    ops = np.full((n_c, n_h + 1, n_r + 1), ord("x"), dtype=np.uint8)
    ops[:, 0, :] = ord("i")
    arange = np.arange(n_r + 2, dtype=np.int64)
    for i in range(1, n_h + 1):
        diag = math.floor(i * ratio)
        lo = max(0, diag - beam)
        hi = n_r + 1 if i == n_h else min(n_r + 1, diag + beam)
        if hi <= lo:
            continue
        prev = cost[i - 1]
        j1 = max(lo, 1)
        mismatch = ref[None, j1 - 1:hi - 1] != hyp[:, i - 1:i]
        sub = prev[:, j1 - 1:hi - 1] + mismatch
        dele = prev[:, j1:hi] + 1
        take_del = dele < sub
        e = np.where(take_del, dele, sub)
        e_ops = np.where(take_del, ord("d"), np.where(mismatch, ord("s"), ord(" ")))
        if lo == 0:
            e = np.concatenate((prev[:, :1] + 1, e), axis=1)
            e_ops = np.concatenate((np.full((n_c, 1), ord("d")), e_ops), axis=1)
        k = arange[:e.shape[1]]
        cur = np.minimum.accumulate(e - k, axis=1) + k
        cur_ops = np.where(cur < e, ord("i"), e_ops)
        dead = cur >= inf
        if dead.any():
            cur[dead] = inf
            cur_ops[dead] = ord("x")
        cost[i, :, lo:hi] = cur
        ops[:, i, lo:hi] = cur_ops
    prev = cost[n_h]
    return [int(x) for x in prev[:, n_r]], ops


def _trace(ops, n_h: int, n_r: int) -> str:
    """Backtrace of one operation matrix into sacrebleu's trace string (' ', s, i, d)."""
    out = []
    i, j = n_h, n_r
    while i > 0 or j > 0:
        op = chr(ops[i, j])
        out.append(op)
        if op in ("s", " "):
            i, j = i - 1, j - 1
        elif op == "i":
            j -= 1
        elif op == "d":
            i -= 1
        else:
            raise RuntimeError(f"TER edit distance left an undefined cell at ({i}, {j})")
    return "".join(reversed(out))


def _ter_shift(words_h: list[str], words_r: list[str], pre_score: int, inv_trace: str,
               checked: int) -> tuple[int, list[str], int, int, str]:
    """One step of sacrebleu's greedy TER shift search (`lib_ter._shift`): the same candidate
    shifts, in the same order, ranked by the same tuple (gain, length, -start, -target, words);
    the candidates' edit distances come from `_batched_beam_distances` in one pass.
    Returns (gain, shifted words, candidates checked, their distance, their trace)."""
    from sacrebleu.metrics import lib_ter

    align, ref_err, hyp_err = lib_ter.trace_to_alignment(lib_ter._flip_trace(inv_trace))
    found = []
    for start_h, start_r, length in lib_ter._find_shifted_pairs(words_h, words_r):
        if sum(hyp_err[start_h:start_h + length]) == 0:
            continue
        if sum(ref_err[start_r:start_r + length]) == 0:
            continue
        if start_h <= align[start_r] < start_h + length:
            continue
        prev_idx = -1
        for offset in range(-1, length):
            if start_r + offset == -1:
                idx = 0
            elif start_r + offset in align:
                idx = align[start_r + offset] + 1
            else:
                break
            if idx == prev_idx:
                continue
            prev_idx = idx
            found.append((length, -start_h, -idx,
                          lib_ter._perform_shift(words_h, start_h, length, idx)))
            checked += 1
        if checked >= lib_ter._MAX_SHIFT_CANDIDATES:
            break
    if not found:
        return 0, words_h, checked, pre_score, inv_trace
    scores, ops = _batched_beam_distances([f[3] for f in found], words_r)
    best = max((pre_score - d, *f, n) for n, (d, f) in enumerate(zip(scores, found)))
    n = best[5]
    return best[0], best[4], checked, scores[n], _trace(ops[n], len(words_h), len(words_r))


def _ter_segment_stats(chunk: list[tuple[list[str], list[list[str]]]]) -> list[list[float]]:
    """[fewest edits over references, mean reference length] per (hyp words, refs words), by
    sacrebleu's TER algorithm (greedy shifts, then beam edit distance) on the fast distance."""
    from sacrebleu.metrics import lib_ter

    out = []
    for hyp, ref_words in chunk:
        best, total_len = math.inf, 0
        for ref in ref_words:
            if not ref:
                edits = len(hyp)
            else:
                (dist,), ops = _batched_beam_distances([hyp], ref)
                trace = _trace(ops[0], len(hyp), len(ref))
                words, shifts, checked = hyp, 0, 0
                while True:
                    delta, shifted, checked, new_dist, new_trace = _ter_shift(
                        words, ref, dist, trace, checked)
                    if checked >= lib_ter._MAX_SHIFT_CANDIDATES or delta <= 0:
                        break
                    shifts += 1
                    words, dist, trace = shifted, new_dist, new_trace
                edits = shifts + dist
            total_len += len(ref)
            best = min(best, edits)
        out.append([best, total_len / len(ref_words)])
    return out


def ter_score(refs: Sequence[Sequence[str]], hyps: Sequence[str], *, workers: int = 2) -> float:
    """sacrebleu's corpus TER (default options, 0..100) = sum of each segment's fewest edits over
    references / sum of mean reference lengths; on `workers` processes for large inputs."""
    from sacrebleu.metrics import TER

    ter = TER()
    work = [(ter._preprocess_segment(h).split(), [ter._preprocess_segment(r).split() for r in rs])
            for h, rs in zip(hyps, refs)]
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers == 1 or len(work) < 200:
        stats = _ter_segment_stats(work)
    else:
        import concurrent.futures
        import multiprocessing

        size = math.ceil(len(work) / (4 * workers))
        chunks = [work[i:i + size] for i in range(0, len(work), size)]
        ctx = multiprocessing.get_context("spawn")
        try:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                stats = [s for part in pool.map(_ter_segment_stats, chunks) for s in part]
        except (RuntimeError, OSError, concurrent.futures.process.BrokenProcessPool):
            # e.g. a caller's script without an `if __name__ == "__main__"` guard: one process
            stats = _ter_segment_stats(work)
    edits = sum(s[0] for s in stats)
    length = sum(s[1] for s in stats)
    return ter._compute_score_from_stats([edits, length]).score


def sacrebleu_scores(refs: Sequence[Sequence[str]], hyps: Sequence[str], *,
                     ter: bool = True) -> dict[str, float]:
    """sacreBLEU BLEU and chrF (and TER unless `ter=False`) with default settings, on 0..100 as
    sacrebleu reports them; sources with fewer references are padded with None, which
    sacrebleu skips."""
    import sacrebleu

    width = max(len(rs) for rs in refs)
    streams = [[rs[i] if i < len(rs) else None for rs in refs] for i in range(width)]
    out = {"sacreBLEU": sacrebleu.corpus_bleu(list(hyps), streams).score,
           "chrF": sacrebleu.corpus_chrf(list(hyps), streams).score}
    if ter:
        out["TER"] = ter_score(refs, hyps)
    return out


def rouge_score_f(refs: Sequence[Sequence[str]], hyps: Sequence[str], *,
                  use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE-1, ROUGE-2, ROUGE-L F-measure from rouge-score: per segment the best reference
    (`score_multi`), then the mean over segments; fractions 0..1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for rs, hyp in zip(refs, hyps):
        result = scorer.score_multi(list(rs), hyp)
        for key in sums:
            sums[key] += result[key].fmeasure
    return {key: value / len(hyps) for key, value in sums.items()}


# --------------------------------------------------------------------------- everything

def score_e2e(refs: Sequence[Sequence[str]], hyps: Sequence[str], *, java: bool = True,
              workers: int = 2, progress: str | None = None) -> dict[str, float]:
    """All metrics for one system: the official E2E five (BLEU and METEOR as fractions 0..1,
    NIST, ROUGE_L, CIDEr), sacreBLEU/chrF/TER (0..100), rouge-score F (0..1).

    With `java=False`, METEOR, ROUGE_L and CIDEr (which need the Java PTB tokenizer) are left
    out rather than computed on different tokens. TER (the slowest metric) runs on `workers`
    processes in the background while the rest is computed. `progress`: a label under which
    the metrics done and the elapsed time are shown on stderr (`loralab.progress`); None =
    silent.
    """
    from loralab.progress import Progress

    refs = [list(rs) for rs in refs]
    hyps = list(hyps)
    if len(refs) != len(hyps):
        raise UserError(f"{len(hyps)} outputs but references for {len(refs)} sources; "
                        "give one output per source")
    if not hyps:
        raise UserError("nothing to score: no outputs; give at least one output")
    empty = [i for i, rs in enumerate(refs) if not any(r.strip() for r in rs)]
    if empty:
        raise UserError(f"source {empty[0] + 1} has no non-empty reference; every source needs "
                        "at least one reference")
    ter_result: dict[str, object] = {}

    def run_ter() -> None:
        try:
            ter_result["TER"] = ter_score(refs, hyps, workers=workers)
        except BaseException as exc:  # re-raised in the caller's thread below
            ter_result["error"] = exc

    ter_thread = threading.Thread(target=run_ter, daemon=True)
    ter_thread.start()
    # steps: BLEU+NIST, [PTB tokens + METEOR, ROUGE_L + CIDEr,] sacreBLEU+chrF, ROUGE-n, TER
    shown = Progress(progress or "", 6 if java else 4, "metric", "metric groups",
                     enabled=progress is not None)
    scores: dict[str, float] = dict(mteval_bleu_nist(refs, hyps))
    shown.update()
    if java:
        flat = [r for rs in refs for r in rs] + hyps
        tokens = ptb_tokenize(flat)
        tok_refs, pos = [], 0
        for rs in refs:
            tok_refs.append(tokens[pos:pos + len(rs)])
            pos += len(rs)
        tok_hyps = tokens[pos:]
        scores["METEOR"] = meteor_score(tok_refs, tok_hyps)[0]
        shown.update()
        scores.update(coco_rouge_l_cider(tok_refs, tok_hyps))
        shown.update()
    scores.update(sacrebleu_scores(refs, hyps, ter=False))
    shown.update()
    scores.update(rouge_score_f(refs, hyps))
    shown.update()
    ter_thread.join()
    shown.update()
    shown.close()
    if "error" in ter_result:
        raise ter_result["error"]  # type: ignore[misc]
    scores["TER"] = ter_result["TER"]  # type: ignore[assignment]
    return scores
