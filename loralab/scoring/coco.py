"""METEOR 1.5, ROUGE-L and CIDEr from the MS-COCO caption evaluation code (pycocoevalcap), on
text tokenised by the Stanford PTB tokenizer (`-preserveLines -lowerCase`, punctuation tokens
dropped), as the E2E challenge's scorer computes them.

METEOR and the tokenizer are the original Java jars, shipped in the `pycocoevalcap` wheel; each
runs in one JVM call for the whole corpus (the COCO wrappers start one JVM per call). ROUGE-L
and CIDEr are pycocoevalcap's pure-Python `Rouge` and `Cider`. A missing Java is a one-line
`UserError`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from loralab.errors import UserError

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
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr  # all PIPE: never None
    lines = []
    for rs, hyp in zip(refs, hyps, strict=False):
        hyp = hyp.replace("|||", "").replace("  ", " ")
        lines.append(" ||| ".join(("SCORE", " ||| ".join(rs), hyp)) + "\n")
    payload = "".join(lines).encode("utf-8")

    def write() -> None:
        try:
            stdin.write(payload)
            stdin.flush()
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        stats = [stdout.readline().decode().strip() for _ in hyps]
        writer.join()
        if any(not s for s in stats):
            raise RuntimeError("METEOR stopped early: "
                               + stderr.read().decode(errors="replace")[-500:])
        stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        stdin.flush()
        segment = [float(stdout.readline().strip()) for _ in hyps]
        corpus = float(stdout.readline().strip())
    finally:
        try:
            stdin.close()
        except BrokenPipeError:
            pass
        proc.kill()
        proc.wait()
    return corpus, segment


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
