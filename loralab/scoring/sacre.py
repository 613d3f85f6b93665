"""sacreBLEU BLEU, chrF and TER (on 0..100 scales, as sacrebleu reports them).

TER is computed with a vectorised edit distance over sacrebleu's own shift search
(`sacrebleu.metrics.lib_ter`), equal to sacrebleu's `TER`, spread over worker processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence


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
    best = max((pre_score - d, *f, n) for n, (d, f) in enumerate(zip(scores, found, strict=False)))
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
            for h, rs in zip(hyps, refs, strict=False)]
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
    bleu = sacrebleu.corpus_bleu(list(hyps), streams)  # type: ignore[arg-type]  # takes None refs
    chrf = sacrebleu.corpus_chrf(list(hyps), streams)  # type: ignore[arg-type]  # takes None refs
    out = {"sacreBLEU": bleu.score, "chrF": chrf.score}
    if ter:
        out["TER"] = ter_score(refs, hyps)
    return out
