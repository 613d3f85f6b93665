"""Datasets for the three tasks: presets (hub and bundled offline) and local files.

`load_task_data(name, task, tokenizer, seq_len=..., data_fraction=..., seed=...)` returns a
`TaskData` whose `splits` ("train", "validation", "test") are `datasets.Dataset`s with the
columns `input_ids`, `attention_mask`, `labels`:

- lm        documents -> tokens, an EOS after each document -> one stream cut into blocks of
            exactly `seq_len` tokens (packing: no padding, the tail shorter than a block is
            dropped). `labels == input_ids`; the model shifts them by one internally.
- classify  text truncated to `seq_len` tokens (padding happens per batch in `collate_fn`),
            `labels` is the int class.
- generate  the paper's format `source = target<eos>`: `input_ids` = tokens of "source =" then
            " target" then EOS; `labels` = -100 on the prompt, the target ids (and EOS) after,
            so the loss is on target tokens only. `references(split)` groups all references of
            one source for multi-reference scoring.
- last-word (validation/test of `wiki-lambada` and `lambada`, task "lm"): one passage per row,
            `input_ids` = context + " " + final word, `labels` = -100 except on the final
            word's tokens. Mean loss over those tokens gives the last-word perplexity; the
            word is predicted right when greedy argmax(logits[t-1]) == labels[t] at every
            labelled t (all its sub-tokens). The string columns `context` and `target` are kept
            for generation-based scoring. Contexts longer than `seq_len` are cut on the left.

Splits are deterministic and independent of `seed`: a row goes to a split by a hash of a
stable key (title, id, text), so adding data never reshuffles old rows. `seed` and
`data_fraction` only choose which training rows to keep; validation and test are never cut,
so runs with different fractions are scored on the same data.

Tokenised splits are cached under `<cache>/datasets/<key>` (Arrow, via `save_to_disk`), the
key hashing the data source, task, options, `seq_len` and the tokenizer's full definition; a
second load memory-maps them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralab import bundled
from loralab.data import MIN_SEQ_LEN
from loralab.data.sources import SPLITS, check_raw, read_raw, resolve_source, wanted_splits
from loralab.data.tokenise import eos_id, generation_prompt, tokenise_split, tokenizer_fingerprint
from loralab.errors import UserError

DATA_VERSION = 2  # bump when preparation changes; it is part of the cache key


# ---------------------------------------------------------------- the result

@dataclass(frozen=True)
class Collator:
    """Pads a list of rows into a batch (right padding).

    input_ids -> pad id, attention_mask -> 0, token labels -> -100 (no loss on padding); int
    labels (classification) are stacked. Columns other than those three are ignored.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        token_labels = torch.as_tensor(rows[0]["labels"]).ndim > 0  # else one class per row
        labels = (torch.full((len(rows), width), -100, dtype=torch.long) if token_labels
                  else torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long))
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            mask[i, :n] = torch.as_tensor(r["attention_mask"], dtype=torch.long)
            if token_labels:
                labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True, eq=False)
class TaskData:
    """Tokenised splits of one dataset for one task, ready for a DataLoader."""

    name: str
    task: str
    splits: dict[str, Any]  # split -> datasets.Dataset
    collate_fn: Collator
    seq_len: int
    num_labels: int | None = None
    label_names: tuple[str, ...] | None = None
    refs: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)
    prep_seconds: float = 0.0
    from_cache: bool = False
    notes: tuple[str, ...] = ()

    def references(self, split: str) -> list[tuple[str, list[str]]]:
        """Generation: (source prompt, [reference, ...]) per distinct source, in file order."""
        if split not in self.refs:
            raise UserError(f"{self.name}: no references for split {split!r} "
                            f"(have: {', '.join(self.refs) or 'none'})")
        return self.refs[split]

    def label_counts(self, split: str) -> dict[int, int]:
        """Classification: examples per label in `split`."""
        return dict(sorted(Counter(int(x) for x in self.splits[split]["labels"]).items()))

    def token_counts(self, split: str) -> tuple[int, int]:
        """(tokens, tokens with a loss) in `split`. A row's first label is never predicted (the
        causal shift), so an lm block of T tokens has T - 1 with a loss, as evaluation counts."""
        ds = self.splits[split]
        total = sum(sum(m) for m in ds["attention_mask"])
        if self.task == "classify":
            return total, 0
        return total, sum(sum(1 for x in lab[1:] if x != -100) for lab in ds["labels"])


def subsample(dataset: Any, n: int | None) -> Any:
    """The same `n` examples for every strategy, seed and run: a fixed (seed 0) sample of the
    rows, kept in their order. `None` or `n >= len(dataset)` returns the dataset itself.

    Why seed 0 and not the run's seed: paired comparisons between strategies need every run to
    score the same examples."""
    if n is None or n >= len(dataset):
        return dataset
    idx = sorted(random.Random(0).sample(range(len(dataset)), n))
    return dataset.select(idx)


# ---------------------------------------------------------------- entry point

def load_task_data(name: str, task: str | None, tokenizer: Any, *, seq_len: int = 128,
                   data_fraction: float = 1.0, seed: int = 0, **options: Any) -> TaskData:
    """Load, tokenise (cached) and split a dataset for `task`; see the module docstring.

    options: data_dir (E2E CSV folder), text_column / label_column / source_column /
    target_column / num_labels (local files), splits (e.g. "validation,test" to prepare only
    those; saves tokenising a training set that an evaluation does not need). `task=None`
    takes the preset's default.
    """
    import datasets

    if seq_len < MIN_SEQ_LEN:
        raise UserError(f"seq_len must be at least {MIN_SEQ_LEN} (got {seq_len})")
    if not 0.0 < data_fraction <= 1.0:
        raise UserError(f"data_fraction must be in (0, 1] (got {data_fraction})")
    t0 = time.perf_counter()
    kind, task, ident = resolve_source(name, task, options)
    wanted = wanted_splits(options.pop("splits", None))
    key_opts = sorted((k, str(v)) for k, v in options.items() if k != "data_dir")
    key_src = json.dumps([DATA_VERSION, kind, ident, task, seq_len, wanted,
                          tokenizer_fingerprint(tokenizer), key_opts])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    cache = bundled.cache_dir() / "datasets" / key
    meta_path = cache / "meta.json"
    from_cache = meta_path.exists()
    if from_cache:
        meta = json.loads(meta_path.read_text())
        dsd = datasets.load_from_disk(str(cache / "splits"))
        splits = {s: dsd[s] for s in meta["splits"]}
    else:
        raw, label_names = read_raw(name, kind, task, options)
        raw = {k: v for k, v in raw.items() if k in wanted}
        borrow_train = name == "wiki-lambada" and kind == "preset" and "train" in wanted
        if not raw and not borrow_train:
            raise UserError(f"{name}: none of the splits {', '.join(wanted)} exist")
        num_labels = len(label_names) if (task == "classify" and label_names) else None
        check_raw(name, raw, task, num_labels)
        splits, notes = {}, []
        if borrow_train:  # LM text = wiki-leads train, tokenised once and shared via its cache
            splits["train"] = load_task_data("wiki-leads", "lm", tokenizer, seq_len=seq_len,
                                             splits="train").splits["train"]
        for split in SPLITS:
            if split not in raw:
                continue
            cols, split_notes = tokenise_split(split, raw[split], task, tokenizer, seq_len)
            notes += split_notes
            if len(cols["input_ids"]) == 0:
                raise UserError(f"{name}: split {split!r} has no examples after tokenising "
                                f"(fewer than seq_len={seq_len} tokens?); lower seq_len or "
                                "add data")
            splits[split] = datasets.Dataset.from_dict(cols)
        refs = {}
        if task == "generate":
            for split, cols in raw.items():
                grouped: dict[str, list[str]] = {}
                for s, t in zip(cols["source"], cols["target"], strict=True):
                    grouped.setdefault(s, []).append(t)
                refs[split] = [[generation_prompt(s), r] for s, r in grouped.items()]
        meta = {"splits": list(splits), "num_labels": num_labels,
                "label_names": list(label_names) if label_names else None, "refs": refs,
                "notes": notes, "name": name, "task": task, "seq_len": seq_len}
        _save(cache, datasets.DatasetDict(splits), meta)
    if data_fraction < 1.0 and "train" in splits:
        n = len(splits["train"])
        keep = max(1, math.ceil(data_fraction * n))
        idx = np.sort(np.random.default_rng(seed).permutation(n)[:keep])
        splits["train"] = splits["train"].select(idx.tolist())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    return TaskData(
        name=name, task=task, splits=splits, collate_fn=Collator(int(pad)), seq_len=seq_len,
        num_labels=meta["num_labels"],
        label_names=tuple(meta["label_names"]) if meta["label_names"] else None,
        refs={s: [(p, list(r)) for p, r in v] for s, v in meta["refs"].items()},
        prep_seconds=time.perf_counter() - t0, from_cache=from_cache,
        notes=tuple(meta["notes"]))


def _save(cache: Path, dsd: Any, meta: dict[str, Any]) -> None:
    """Write splits + meta to a temp dir, then move it into place (atomic; races are benign)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
    try:
        dsd.save_to_disk(str(tmp / "splits"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        if not cache.exists():
            os.replace(tmp, cache)
    except OSError:
        if not cache.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
