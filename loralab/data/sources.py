"""Raw data sources: the presets (bundled offline and hub), E2E CSV folders and local files.

Each reader returns `Raw`, {split: {column: [values]}} with standard columns: "text"
(documents), "text" + "label" (classification), "source" + "target" (generation), "context" +
"target" (last-word passages). Splits are assigned by a hash of a stable key of each row
(`split_of`), never by the run's seed, so adding data never reshuffles old rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from loralab import bundled
from loralab.errors import UserError

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
# Hugging Face hub ids of the hub presets: (dataset path, config name).
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


Raw = dict[str, dict[str, list[Any]]]


# ---------------------------------------------------------------- helpers

def bucket(key: str) -> int:
    """A stable pseudo-random number in [0, 100) for a key (split assignment)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def split_of(key: str, validation: int = 10, test: int = 10) -> str:
    b = bucket(key)
    return "test" if b < test else "validation" if b < test + validation else "train"


def file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


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

def _wiki_leads_articles() -> list[tuple[str, str]]:
    path = bundled.wiki_leads_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} does not parse ({exc}); delete it and rerun `loralab setup`"
                        ) from None
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
        raw[split_of(title)]["text"].append(text)
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
        split = split_of(title)
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
        split = split_of(f"rt:{sid}")
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
        for mr, ref in zip(cols["mr"], cols["ref"], strict=True):
            dest = split
            if split == "validation" and not has_train:
                dest = "validation" if bucket(f"e2e:{mr}") < 10 else "train"
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
        for t, y in zip(ds["train"][text_col], ds["train"]["label"], strict=True):
            split = "validation" if bucket(t) < 5 else "train"
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
            raw[split_of(d, 5, 5)]["text"].append(d)
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
        split = split_of(f"{data[key_col][i]}", 5, 5)
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


# ---------------------------------------------------------------- choosing and reading a source

def resolve_source(name: str, task: str | None, options: dict[str, Any]
                    ) -> tuple[str, str, str]:
    """(kind, task, identity) where kind is offline|hub|file|e2e-dir."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / E2E_FILES["validation"]).exists():
        task = task or "generate"
        kind, ident = "e2e-dir", ";".join(file_identity(p) for p in sorted(path.glob("*.csv")))
    elif path.suffix.lower() in FILE_SUFFIXES and name not in PRESETS:
        if not path.is_file():
            raise UserError(f"data file {name} does not exist")
        kind, ident = "file", file_identity(path)
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
                ident = ";".join(file_identity(p) for p in sorted(root.glob("*.csv")))
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


def read_raw(name: str, kind: str, task: str, options: dict[str, Any]
         ) -> tuple[Raw, tuple[str, ...] | None]:
    if kind == "file":
        return _raw_file(Path(name).expanduser(), task, options)
    if kind == "e2e-dir":
        root = Path(name).expanduser() if name != "e2e" else _find_e2e_dir(options.get("data_dir"))
        if root is None:  # resolve_source found the CSVs; they have gone since
            raise UserError("e2e: the local CSVs are no longer there; pass data_dir (CLI: "
                            "--data-dir) pointing at devset.csv + testset_w_refs.csv, or set "
                            "LORALAB_E2E_DIR")
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


def check_raw(name: str, raw: Raw, task: str, num_labels: int | None) -> None:
    for split, cols in raw.items():
        n = len(next(iter(cols.values()), []))
        if n == 0:
            raise UserError(f"{name}: split {split!r} is empty; add data or use a larger file")
        if task == "classify":
            bad = sorted({y for y in cols["label"] if not 0 <= y < (num_labels or 0)})
            if bad:
                raise UserError(f"{name}: labels {bad[:5]} outside 0..{(num_labels or 0) - 1}")


def wanted_splits(value: Any) -> list[str]:
    if value is None:
        return list(SPLITS)
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    bad = [v for v in names if v not in SPLITS]
    if bad or not names:
        raise UserError(f"splits {bad or names} not understood; choose from {', '.join(SPLITS)}")
    return [s for s in SPLITS if s in names]
