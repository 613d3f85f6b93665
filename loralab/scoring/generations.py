"""The texts of a run's generation evaluations, kept beside its record (RUN/generations.jsonl),
so they can be read, diffed between runs, and rescored (`loralab score --generations`) without
decoding again: decoding is the expensive half of a generation evaluation.

One JSON object per line and per source: eval_set, split, prompt (the decoded prompt: the
"source =" input of a data-to-text task, the held-out prefix of an lm continuation),
references (all references of the source) and hypothesis (the output as it was scored: an
empty output is stored as ".", the stand-in the scorer saw)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loralab.errors import UserError

FILENAME = "generations.jsonl"


def append_generations(path: Path, eval_set: str, split: str, prompts: list[Any],
                       references: list[list[str]], hypotheses: list[str], tokenizer) -> None:
    """Append one eval set's generations; prompts given as token ids are decoded to text."""
    with open(path, "a", encoding="utf-8") as f:
        for prompt, refs, hyp in zip(prompts, references, hypotheses, strict=True):
            text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
            f.write(json.dumps({"eval_set": eval_set, "split": split, "prompt": text,
                                "references": list(refs), "hypothesis": hyp},
                               ensure_ascii=False) + "\n")


def read_generations(path: str | os.PathLike) -> dict[str, tuple[list[list[str]], list[str]]]:
    """{eval set: (references per source, hypotheses)} from a generations.jsonl (or the run
    directory holding one), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; pass a run directory's "
                        f"{FILENAME} (written by a study's generation evaluation)") from None
    sets: dict[str, tuple[list[list[str]], list[str]]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            refs, hyp = [str(r) for r in row["references"]], str(row["hypothesis"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not a generations line (a JSON object with "
                            "references and hypothesis); check the file") from None
        entry = sets.setdefault(str(row.get("eval_set") or "generations"), ([], []))
        entry[0].append(refs)
        entry[1].append(hyp)
    if not sets:
        raise UserError(f"{path} holds no generations")
    return sets
