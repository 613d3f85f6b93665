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
import re
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
from loralab.errors import UserError

DATA_VERSION = 2  # bump when preparation changes; it is part of the cache key
TASKS = ("lm", "classify", "generate")
OFFLINE_PRESETS = ("wiki-leads", "wiki-lambada", "rt-snippets", "e2e")
HUB_PRESETS = ("wikitext-2", "lambada", "imdb", "sst2", "e2e", "wellformed-query")
PRESETS = tuple(dict.fromkeys(OFFLINE_PRESETS + HUB_PRESETS))
FILE_SUFFIXES = (".txt", ".csv", ".json", ".jsonl", ".parquet")
SPLITS = ("train", "validation", "test")

# Tasks each preset supports; the first is its default.
PRESET_TASKS: dict[str, tuple[str, ...]] = {
    "wiki-leads": ("lm",), "wiki-lambada": ("lm",), "rt-snippets": ("classify", "lm"),
    "e2e": ("generate",), "wikitext-2": ("lm",), "lambada": ("lm",),
    "imdb": ("classify", "lm"), "sst2": ("classify", "lm"), "wellformed-query": ("classify",),
}
# Hub ids (unverified from this machine: the hub is out of reach here).
HUB_IDS: dict[str, tuple[str, str | None]] = {
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "lambada": ("EleutherAI/lambada_openai", "en"),
    "imdb": ("stanfordnlp/imdb", None),
    "sst2": ("stanfordnlp/sst2", None),
    "e2e": ("tuetschek/e2e_nlg", None),
    "wellformed-query": ("google-research-datasets/google_wellformed_query", None),
}
E2E_FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
# Function words never used as LAMBADA-style targets: a content word needs the context.
_STOPWORDS = frozenset(
    "the a an and or nor of to in on at for with by from as is was are were be been being it its "
    "this that these those which who whom whose than then there their they them he she his her "
    "him we our you your i my me not no but also into over under after before between during "
    "about such other more most many much some any all each can could may might will would "
    "should shall has have had do does did one two three first second well very only".split())


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


# ---------------------------------------------------------------- helpers

def _bucket(key: str) -> int:
    """A stable pseudo-random number in [0, 100) for a key (split assignment)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def _split_of(key: str, validation: int = 10, test: int = 10) -> str:
    b = _bucket(key)
    return "test" if b < test else "validation" if b < test + validation else "train"


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id,
                   getattr(tokenizer, "add_bos_token", None))).encode())
    return h.hexdigest()


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, needed to separate documents and end "
                        "targets; use a decoder model's tokenizer (gpt2, smollm2-135m)")
    return int(tokenizer.eos_token_id)


def _encode(tokenizer: Any, texts: list[str], *, bos: bool = False) -> list[list[int]]:
    """Token ids without special tokens; with `bos`, a BOS first if the tokenizer normally adds
    one (Gemma: yes; GPT-2, SmolLM2: no), so text starts the way the model was trained."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if bos and _adds_bos(tokenizer):
        ids = [[tokenizer.bos_token_id] + x for x in ids]
    return ids


def _adds_bos(tokenizer: Any) -> bool:
    first = tokenizer("a")["input_ids"][:1]
    return tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id]


def _hub_offline() -> bool:
    return bundled.hub_offline()


def _load_hub(name: str, **kw: Any) -> Any:
    import datasets

    path, config = HUB_IDS[name]
    if _hub_offline():
        raise UserError(f"dataset {name!r} comes from the Hugging Face hub ({path}), which is "
                        f"unreachable (offline); use an offline preset "
                        f"({', '.join(OFFLINE_PRESETS)}) or a local file")
    try:
        return datasets.load_dataset(path, config, **kw)
    except (ConnectionError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load dataset {name!r} ({path}) from the hub: {first}") from None


# ---------------------------------------------------------------- raw sources
# Each returns {split: {column: [values]}} with standard columns: "text" (documents),
# "text"+"label" (classification), "source"+"target" (generation), "context"+"target" (last word).

Raw = dict[str, dict[str, list[Any]]]


def _wiki_leads_articles() -> list[tuple[str, str]]:
    path = bundled.wiki_leads_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} does not parse ({exc}); delete it and rerun `loralab setup`")
    out = []
    for key, art in data.items():
        text = " ".join(str(art.get("extract", "")).split())
        if text:
            out.append((str(art.get("title", key)), text))
    return out


def _raw_wiki_leads() -> Raw:
    """Wikipedia lead sections, split 80/10/10 by a hash of the title."""
    raw: Raw = {s: {"text": []} for s in SPLITS}
    for title, text in _wiki_leads_articles():
        raw[_split_of(title)]["text"].append(text)
    return raw


def last_word_passages(text: str, *, min_context_words: int = 30) -> list[tuple[str, str]]:
    """LAMBADA-style (context, target) pairs cut from one passage at sentence ends.

    A cut qualifies when the sentence's final word is a content word (alphabetic, >= 3 letters,
    not a function word) that already occurs in the context before it, and the context has at
    least `min_context_words` words. LAMBADA kept passages whose last word humans could guess
    only from the broad context; a word that recurs from earlier in the passage is a cheap,
    deterministic proxy for that (the local sentence alone rarely gives it away). The sentence's
    full stop is dropped, as in LAMBADA.
    """
    pairs = []
    for end in re.finditer(r"[a-z]\.(?=\s+[A-Z\"(]|$)", text):
        m = re.match(r"^(.*\S)\s+([A-Za-z]+)\.$", text[: end.end()], flags=re.S)
        if not m:
            continue
        context, word = m.groups()
        if len(word) < 3 or word.lower() in _STOPWORDS:
            continue
        if len(context.split()) < min_context_words:
            continue
        if re.search(rf"\b{re.escape(word)}\b", context, flags=re.I):
            pairs.append((context, word))
    return pairs


def _raw_wiki_lambada() -> Raw:
    """Validation/test: last-word passages cut from the held-out wiki-leads validation/test
    articles, so an LM trained on wiki-leads never saw them. (Its train split is wiki-leads'
    train split, taken from that preset's cache by `load_task_data`.)"""
    raw: Raw = {"validation": {"context": [], "target": []}, "test": {"context": [], "target": []}}
    for title, text in _wiki_leads_articles():
        split = _split_of(title)
        if split == "train":
            continue
        for context, word in last_word_passages(text):
            raw[split]["context"].append(context)
            raw[split]["target"].append(word)
    return raw


def _raw_rt_snippets() -> tuple[Raw, tuple[str, ...]]:
    """Rotten Tomatoes sentences with mean human ratings in [-4, 4]; label = rating > 0, rows
    with |rating| < 0.5 dropped as neither clearly positive nor negative. Split 80/10/10 by id."""
    path = bundled.rt_snippets_file()
    raw: Raw = {s: {"text": [], "label": []} for s in SPLITS}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            sid, rating, text = parts[0], float(parts[1]), parts[2].strip()
        except (IndexError, ValueError):
            raise UserError(f"{path}:{n}: expected `id<TAB>rating<TAB>text`; delete the file "
                            "and rerun `loralab setup`") from None
        if abs(rating) < 0.5 or not text:
            continue
        split = _split_of(f"rt:{sid}")
        raw[split]["text"].append(text)
        raw[split]["label"].append(int(rating > 0))
    return raw, ("negative", "positive")


def _find_e2e_dir(data_dir: str | None) -> Path | None:
    cands = [data_dir] if data_dir else [os.environ.get("LORALAB_E2E_DIR"), "data/e2e",
                                         "../shared/data/e2e"]
    for c in cands:
        if c and (Path(c).expanduser() / E2E_FILES["validation"]).exists():
            return Path(c).expanduser()
    if data_dir:
        raise UserError(f"{data_dir} has no {E2E_FILES['validation']}; point --data-dir at the "
                        "folder with the official E2E CSVs (devset.csv, testset_w_refs.csv)")
    return None


def _read_csv_columns(path: Path, columns: tuple[str, ...]) -> dict[str, list[str]]:
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)} "
                                f"(has {', '.join(reader.fieldnames or []) or 'none'})")
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{path} does not parse as CSV ({exc})") from None
    return {c: [r[c] or "" for r in rows] for c in columns}


def _raw_e2e_local(root: Path) -> Raw:
    """The official E2E CSVs (columns mr, ref). With trainset.csv: train/dev/test as released.
    Without it: devset.csv is split 90/10 by MR (no MR in both) into train/validation, and
    testset_w_refs.csv is the test split."""
    raw: Raw = {s: {"source": [], "target": []} for s in SPLITS}
    has_train = (root / E2E_FILES["train"]).exists()
    for split, fname in E2E_FILES.items():
        path = root / fname
        if not path.exists():
            continue
        cols = _read_csv_columns(path, ("mr", "ref"))
        for mr, ref in zip(cols["mr"], cols["ref"]):
            dest = split
            if split == "validation" and not has_train:
                dest = "validation" if _bucket(f"e2e:{mr}") < 10 else "train"
            raw[dest]["source"].append(mr.strip())
            raw[dest]["target"].append(ref.strip())
    return raw


def _raw_hub(name: str) -> tuple[Raw, tuple[str, ...] | None]:
    """The hub presets (needs network). Kept as the real code path for users."""
    if name == "e2e":
        # A script-based repo: read the hub's parquet conversion instead.
        ds = _load_hub(name, revision="refs/convert/parquet")
        return {s: {"source": list(ds[s]["meaning_representation"]),
                    "target": list(ds[s]["human_reference"])} for s in SPLITS}, None
    ds = _load_hub(name)
    if name == "wikitext-2":
        return {s: {"text": [t for t in ds[s]["text"] if t.strip()]} for s in SPLITS}, None
    if name == "lambada":
        ctx, tgt = [], []
        for text in ds["test"]["text"]:
            head, _, word = text.strip().rpartition(" ")
            ctx.append(head)
            tgt.append(word)
        # LAMBADA (OpenAI version) is an evaluation set: it has only a test split.
        return {"test": {"context": ctx, "target": tgt}}, None
    if name in ("imdb", "sst2"):
        text_col = "text" if name == "imdb" else "sentence"
        raw: Raw = {s: {"text": [], "label": []} for s in SPLITS}
        for t, y in zip(ds["train"][text_col], ds["train"]["label"]):
            split = "validation" if _bucket(t) < 5 else "train"
            raw[split]["text"].append(t)
            raw[split]["label"].append(int(y))
        # SST-2's test labels are hidden (-1): its official validation set serves as test.
        test = ds["test"] if name == "imdb" else ds["validation"]
        raw["test"] = {"text": list(test[text_col]), "label": [int(y) for y in test["label"]]}
        return raw, ("negative", "positive")
    if name == "wellformed-query":
        # Well-formed when at least 4 of 5 annotators said so (rating >= 0.8).
        return {s: {"text": list(ds[s]["content"]),
                    "label": [int(r >= 0.8) for r in ds[s]["rating"]]} for s in SPLITS}, \
            ("not well-formed", "well-formed")
    raise KeyError(name)


def _raw_file(path: Path, task: str, options: dict[str, Any]) -> tuple[Raw, tuple[str, ...] | None]:
    """A local .txt/.csv/.json/.jsonl/.parquet file, split 90/5/5 by a hash of each row's text.

    .txt: documents separated by blank lines (LM only). Tables: columns named by the options
    text_column (default "text"), label_column ("label"), source_column ("source"),
    target_column ("target"). String labels are numbered in sorted order.
    """
    import datasets

    suffix = path.suffix.lower()
    if suffix == ".txt":
        if task != "lm":
            raise UserError(f"{path}: a .txt file only supports task lm; use csv/json with "
                            "columns for classify or generate")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not UTF-8 text ({exc})") from None
        docs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
        raw: Raw = {s: {"text": []} for s in SPLITS}
        for d in docs:
            raw[_split_of(d, 5, 5)]["text"].append(d)
        return raw, None
    builder = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}[suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path} does not parse as {builder} ({type(exc).__name__}: {first})"
                        ) from None
    cols = {"text": options.get("text_column", "text"),
            "label": options.get("label_column", "label"),
            "source": options.get("source_column", "source"),
            "target": options.get("target_column", "target")}
    need = {"lm": ("text",), "classify": ("text", "label"), "generate": ("source", "target")}[task]
    missing = [cols[c] for c in need if cols[c] not in ds.column_names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (has "
                        f"{', '.join(ds.column_names)}); name them with --option "
                        f"{need[0]}_column=NAME")
    data = {c: list(ds[cols[c]]) for c in need}
    label_names = None
    if task == "classify":
        data["label"], label_names = _number_labels(data["label"], path, options)
    raw = {s: {c: [] for c in need} for s in SPLITS}
    key_col = need[0]
    for i in range(len(ds)):
        split = _split_of(f"{data[key_col][i]}", 5, 5)
        for c in need:
            raw[split][c].append(data[c][i])
    return raw, label_names


def _number_labels(values: list[Any], where: Path, options: dict[str, Any]
                   ) -> tuple[list[int], tuple[str, ...]]:
    if any(v is None for v in values):
        raise UserError(f"{where}: some labels are empty; fill or drop those rows")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        ints = [int(v) for v in values]
        n = int(options.get("num_labels", max(ints) + 1))
        bad = sorted({v for v in ints if not 0 <= v < n})
        if bad:
            raise UserError(f"{where}: labels {bad[:5]} are outside 0..{n - 1}; labels must be "
                            "0..num_labels-1")
        return ints, tuple(str(i) for i in range(n))
    names = sorted({str(v) for v in values})
    index = {s: i for i, s in enumerate(names)}
    return [index[str(v)] for v in values], tuple(names)


# ---------------------------------------------------------------- tokenisation

def _pack(docs: list[str], tokenizer: Any, seq_len: int) -> dict[str, Any]:
    """Documents -> one token stream ([BOS] doc EOS ...) -> blocks of seq_len, tail dropped."""
    eos = _eos_id(tokenizer)
    stream: list[int] = []
    for ids in _encode(tokenizer, docs, bos=True):
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // seq_len
    blocks = np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)  # (N, T)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks}


def _prompt_target(prompts: list[str], targets: list[str], tokenizer: Any, seq_len: int,
                   *, eos: bool, keep_prompt_tail: bool) -> tuple[dict[str, list[Any]], int]:
    """Concatenate prompt and target ids with the loss on target ids only.

    Prompt and target are tokenised separately so the loss boundary is exact. Over-long rows:
    the prompt is cut on the left (`keep_prompt_tail`, last-word passages) or the row dropped
    (generation), and the target is cut on the right. Returns the columns and rows dropped.
    """
    eos_id = _eos_id(tokenizer) if eos else None
    p_ids = _encode(tokenizer, prompts, bos=True)
    t_ids = _encode(tokenizer, targets)
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped = 0
    for p, t in zip(p_ids, t_ids):
        t = t + ([eos_id] if eos_id is not None else [])
        if keep_prompt_tail:
            p = p[-(seq_len - len(t)):] if len(t) < seq_len else []
        if not p or len(p) >= seq_len:
            dropped += 1
            continue
        t = t[: seq_len - len(p)]
        out["input_ids"].append(p + t)
        out["attention_mask"].append([1] * (len(p) + len(t)))
        out["labels"].append([-100] * len(p) + t)
    return out, dropped


def subsample(dataset: Any, n: int | None) -> Any:
    """The same `n` examples for every strategy, seed and run: a fixed (seed 0) sample of the
    rows, kept in their order. `None` or `n >= len(dataset)` returns the dataset itself.

    Why seed 0 and not the run's seed: paired comparisons between strategies need every run to
    score the same examples."""
    if n is None or n >= len(dataset):
        return dataset
    idx = sorted(random.Random(0).sample(range(len(dataset)), n))
    return dataset.select(idx)


def generation_prompt(source: str) -> str:
    """The prompt for a source in the paper's `source = target<eos>` format."""
    return f"{source} ="


def _tokenise_split(split: str, cols: dict[str, list[Any]], task: str, tokenizer: Any,
                    seq_len: int) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    if "context" in cols:  # last-word passages
        out, dropped = _prompt_target(cols["context"], [" " + w for w in cols["target"]],
                                      tokenizer, seq_len, eos=False, keep_prompt_tail=True)
        out["context"], out["target"] = cols["context"], cols["target"]
        if dropped:
            raise UserError(f"seq_len {seq_len} is too short for the last-word passages")
        return out, notes
    if task == "lm":
        return _pack(cols["text"], tokenizer, seq_len), notes
    if task == "classify":
        enc = tokenizer(cols["text"], truncation=True, max_length=seq_len)
        truncated = sum(len(x) >= seq_len for x in enc["input_ids"])
        if truncated:
            notes.append(f"{split}: {truncated} texts truncated to {seq_len} tokens")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": cols["label"]}, notes
    prompts = [generation_prompt(s) for s in cols["source"]]
    out, dropped = _prompt_target(prompts, [" " + t for t in cols["target"]], tokenizer,
                                  seq_len, eos=True, keep_prompt_tail=False)
    if dropped:
        notes.append(f"{split}: {dropped} pairs dropped (prompt longer than seq_len {seq_len})")
    return out, notes


# ---------------------------------------------------------------- entry point

def _resolve_source(name: str, task: str | None, options: dict[str, Any]
                    ) -> tuple[str, str, str]:
    """(kind, task, identity) where kind is offline|hub|file|e2e-dir."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / E2E_FILES["validation"]).exists():
        task = task or "generate"
        kind, ident = "e2e-dir", ";".join(_file_identity(p) for p in sorted(path.glob("*.csv")))
    elif path.suffix.lower() in FILE_SUFFIXES and name not in PRESETS:
        if not path.is_file():
            raise UserError(f"data file {name} does not exist")
        kind, ident = "file", _file_identity(path)
        task = task or ("classify" if "label_column" in options else "lm")
    elif name in PRESETS:
        allowed = PRESET_TASKS[name]
        task = task or allowed[0]
        if task not in allowed:
            raise UserError(f"dataset {name!r} supports task {' or '.join(allowed)}, not {task!r}")
        kind, ident = "preset", name
        if name == "e2e":
            root = _find_e2e_dir(options.get("data_dir"))
            if root is not None:
                kind = "e2e-dir"
                ident = ";".join(_file_identity(p) for p in sorted(root.glob("*.csv")))
            elif _hub_offline():
                raise UserError("e2e: no local CSVs found and the hub is unreachable; pass "
                                "data_dir (CLI: --data-dir) pointing at devset.csv + "
                                "testset_w_refs.csv, or set LORALAB_E2E_DIR")
            else:
                kind = "hub"
        elif name in HUB_PRESETS:
            kind = "hub"
        if kind == "hub" and _hub_offline():  # fail before any tokenizer or model is loaded
            raise UserError(f"dataset {name!r} comes from the Hugging Face hub "
                            f"({HUB_IDS[name][0]}), which is unreachable (offline); use an "
                            f"offline preset ({', '.join(OFFLINE_PRESETS)}) or a local file")
    else:
        raise UserError(f"unknown dataset {name!r}; use a preset ({', '.join(PRESETS)}), an E2E "
                        f"CSV folder, or a file ({', '.join(FILE_SUFFIXES)})")
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return kind, task, ident


def _raw(name: str, kind: str, task: str, options: dict[str, Any]
         ) -> tuple[Raw, tuple[str, ...] | None]:
    if kind == "file":
        return _raw_file(Path(name).expanduser(), task, options)
    if kind == "e2e-dir":
        root = Path(name).expanduser() if name != "e2e" else _find_e2e_dir(options.get("data_dir"))
        return _raw_e2e_local(root), None
    if kind == "hub":
        raw, names = _raw_hub(name)
    elif name == "wiki-leads":
        raw, names = _raw_wiki_leads(), None
    elif name == "wiki-lambada":
        raw, names = _raw_wiki_lambada(), None
    else:
        raw, names = _raw_rt_snippets()
    if task == "lm" and names is not None:  # LM over a classification corpus's text
        raw = {s: {"text": c["text"]} for s, c in raw.items()}
        names = None
    return raw, names


def _check_raw(name: str, raw: Raw, task: str, num_labels: int | None) -> None:
    for split, cols in raw.items():
        n = len(next(iter(cols.values()), []))
        if n == 0:
            raise UserError(f"{name}: split {split!r} is empty; add data or use a larger file")
        if task == "classify":
            bad = sorted({y for y in cols["label"] if not 0 <= y < (num_labels or 0)})
            if bad:
                raise UserError(f"{name}: labels {bad[:5]} outside 0..{(num_labels or 0) - 1}")


def _wanted_splits(value: Any) -> list[str]:
    if value is None:
        return list(SPLITS)
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    bad = [v for v in names if v not in SPLITS]
    if bad or not names:
        raise UserError(f"splits {bad or names} not understood; choose from {', '.join(SPLITS)}")
    return [s for s in SPLITS if s in names]


def load_task_data(name: str, task: str | None, tokenizer: Any, *, seq_len: int = 128,
                   data_fraction: float = 1.0, seed: int = 0, **options: Any) -> TaskData:
    """Load, tokenise (cached) and split a dataset for `task`; see the module docstring.

    options: data_dir (E2E CSV folder), text_column / label_column / source_column /
    target_column / num_labels (local files), splits (e.g. "validation,test" to prepare only
    those; saves tokenising a training set that an evaluation does not need). `task=None`
    takes the preset's default.
    """
    import datasets

    if seq_len < 8:
        raise UserError(f"seq_len must be at least 8 (got {seq_len})")
    if not 0.0 < data_fraction <= 1.0:
        raise UserError(f"data_fraction must be in (0, 1] (got {data_fraction})")
    t0 = time.perf_counter()
    kind, task, ident = _resolve_source(name, task, options)
    wanted = _wanted_splits(options.pop("splits", None))
    key_opts = sorted((k, str(v)) for k, v in options.items() if k != "data_dir")
    key_src = json.dumps([DATA_VERSION, kind, ident, task, seq_len, wanted,
                          _tokenizer_fingerprint(tokenizer), key_opts])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    cache = bundled.cache_dir() / "datasets" / key
    meta_path = cache / "meta.json"
    from_cache = meta_path.exists()
    if from_cache:
        meta = json.loads(meta_path.read_text())
        dsd = datasets.load_from_disk(str(cache / "splits"))
        splits = {s: dsd[s] for s in meta["splits"]}
    else:
        raw, label_names = _raw(name, kind, task, options)
        raw = {k: v for k, v in raw.items() if k in wanted}
        borrow_train = name == "wiki-lambada" and kind == "preset" and "train" in wanted
        if not raw and not borrow_train:
            raise UserError(f"{name}: none of the splits {', '.join(wanted)} exist")
        num_labels = len(label_names) if (task == "classify" and label_names) else None
        _check_raw(name, raw, task, num_labels)
        splits, notes = {}, []
        if borrow_train:  # LM text = wiki-leads train, tokenised once and shared via its cache
            splits["train"] = load_task_data("wiki-leads", "lm", tokenizer, seq_len=seq_len,
                                             splits="train").splits["train"]
        for split in SPLITS:
            if split not in raw:
                continue
            cols, split_notes = _tokenise_split(split, raw[split], task, tokenizer, seq_len)
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
                for s, t in zip(cols["source"], cols["target"]):
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
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


# ---------------------------------------------------------------- description (`loralab data`)

def describe(name: str, *, task: str | None = None, tokenizer: str | None = None,
             seq_len: int = 128, data_fraction: float = 1.0, **options: Any) -> str:
    """A human-readable summary: splits, examples, tokens, label balance, one decoded sample."""
    from loralab.models.loading import load_tokenizer

    kind, task, _ = _resolve_source(name, task, options)
    tok_name = tokenizer or ("minilm-l6" if task == "classify" else "gpt2")
    tok = load_tokenizer(tok_name)
    td = load_task_data(name, task, tok, seq_len=seq_len, data_fraction=data_fraction, **options)
    lines = [f"dataset {name} ({kind}), task {task}, tokenizer {tok_name}, seq_len {seq_len}",
             f"prepared in {td.prep_seconds:.2f} s" + (" (from cache)" if td.from_cache else "")]
    for split, ds in td.splits.items():
        tokens, loss_tokens = td.token_counts(split)
        line = f"  {split:<10} {len(ds):>7,} examples {tokens:>10,} tokens"
        if task != "classify":
            line += f" ({loss_tokens:,} with loss)"
        if task == "classify":
            counts = td.label_counts(split)
            names = td.label_names or ()
            total = sum(counts.values())
            line += "  labels " + ", ".join(
                f"{names[k] if k < len(names) else k}={v} ({v / total:.0%})"
                for k, v in counts.items())
        if td.refs.get(split):
            line += f"  {len(td.refs[split]):,} sources"
        lines.append(line)
    lines += [f"note: {n}" for n in td.notes]
    shown = set()
    for split, ds in td.splits.items():
        fmt = "context" if "context" in ds.column_names else task
        if fmt in shown:
            continue
        shown.add(fmt)
        row = ds[0]
        lines.append(f"sample ({split}[0]):")
        if fmt == "context":
            lines.append(f"  context: ...{_clip(row['context'][-200:])}")
            lines.append(f"  target (last word, loss only here): {row['target']}")
        elif task == "classify":
            lines.append(f"  label {row['labels']}: {_clip(tok.decode(row['input_ids']))}")
        else:
            loss = [t for t in row["labels"] if t != -100]
            prompt = row["input_ids"][: len(row["input_ids"]) - len(loss)]
            if prompt:
                lines.append(f"  prompt (no loss): {_clip(tok.decode(prompt))}")
            lines.append(f"  {'target' if prompt else 'text'}: {_clip(tok.decode(loss))}")
    return "\n".join(lines)


def _clip(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + " ..."
