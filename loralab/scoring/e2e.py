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
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from loralab.errors import UserError
from loralab.progress import Progress
from loralab.scoring.coco import coco_rouge_l_cider, meteor_score, ptb_tokenize
from loralab.scoring.mteval import mteval_bleu_nist
from loralab.scoring.sacre import sacrebleu_scores, ter_score

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
    short = [n for n, row in enumerate(rows[1:], start=2) if len(row) != len(header)]
    if short:
        raise UserError(f"{path}: rows {short[:5]} have {len(rows[short[0] - 1])} fields, the "
                        f"header has {len(header)}; quote fields that contain the delimiter")
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
            for mr, ref in zip(ref_mrs, ref_texts, strict=False):
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
            for mr, ref in zip(ref_mrs, ref_texts, strict=False):
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


# --------------------------------------------------------------------------- rouge-score

def rouge_score_f(refs: Sequence[Sequence[str]], hyps: Sequence[str], *,
                  use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE-1, ROUGE-2, ROUGE-L F-measure from rouge-score: per segment the best reference
    (`score_multi`), then the mean over segments; fractions 0..1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for rs, hyp in zip(refs, hyps, strict=False):
        result = scorer.score_multi(list(rs), hyp)
        for key in sums:
            sums[key] += result[key].fmeasure
    return {key: value / len(hyps) for key, value in sums.items()}


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
