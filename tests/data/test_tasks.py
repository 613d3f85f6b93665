"""load_task_data: every offline preset loaded for real, the E2E CSVs, local files, collation,
bad data."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from loralab import bundled
from loralab.data.tasks import Collator, TaskData, load_task_data
from loralab.data.tokenise import generation_prompt
from loralab.errors import UserError
from loralab.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2-135m")


def _articles() -> dict[str, dict]:
    return json.loads(bundled.wiki_leads_file(build=False).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- wiki-leads (LM packing)

def test_wiki_leads_packs_every_token_of_each_split(gpt2):
    from loralab.data.sources import split_of

    seq_len = 128
    td = load_task_data("wiki-leads", "lm", gpt2, seq_len=seq_len)
    assert set(td.splits) == {"train", "validation", "test"}
    for ds in td.splits.values():
        assert ds.column_names == ["input_ids", "attention_mask", "labels"]
        assert all(len(r) == seq_len for r in ds["input_ids"][:50])
        assert ds["input_ids"][:50] == ds["labels"][:50]
        assert all(all(m) for m in ds["attention_mask"][:50])
    arts = _articles()
    assert len(arts) == 10033
    # Naive reference for the validation split: its documents in file order, each followed by
    # EOS, one stream, cut into whole blocks.
    docs = [" ".join(a["extract"].split()) for a in arts.values()
            if a["extract"].strip() and split_of(a["title"]) == "validation"]
    stream = [t for ids in gpt2(docs, add_special_tokens=False)["input_ids"]
              for t in ids + [gpt2.eos_token_id]]
    val = td.splits["validation"]
    assert len(val) == len(stream) // seq_len
    assert val[0]["input_ids"] == stream[:seq_len]
    assert val[len(val) - 1]["input_ids"] == stream[(len(val) - 1) * seq_len: len(val) * seq_len]
    total = sum(len(ds) for ds in td.splits.values())
    assert 0.75 < len(td.splits["train"]) / total < 0.85  # 80/10/10 by article


def test_wiki_leads_is_deterministic_cached_and_fraction_cuts_train_only(gpt2):
    full = load_task_data("wiki-leads", "lm", gpt2, seq_len=128)
    again = load_task_data("wiki-leads", "lm", gpt2, seq_len=128)
    assert again.from_cache
    assert again.splits["validation"]["input_ids"] == full.splits["validation"]["input_ids"]
    part = load_task_data("wiki-leads", "lm", gpt2, seq_len=128, data_fraction=0.1, seed=1)
    other = load_task_data("wiki-leads", "lm", gpt2, seq_len=128, data_fraction=0.1, seed=2)
    n = len(full.splits["train"])
    assert len(part.splits["train"]) == math.ceil(0.1 * n)
    assert len(part.splits["validation"]) == len(full.splits["validation"])
    rows = {tuple(r) for r in full.splits["train"]["input_ids"]}
    assert all(tuple(r) in rows for r in part.splits["train"]["input_ids"][:100])
    assert part.splits["train"]["input_ids"] != other.splits["train"]["input_ids"]


# ---------------------------------------------------------------- wiki-lambada (last word)

def test_wiki_lambada_from_held_out_passages(gpt2, smollm2):
    from loralab.data.sources import split_of

    td = load_task_data("wiki-lambada", "lm", gpt2, seq_len=128)
    leads = load_task_data("wiki-leads", "lm", gpt2, seq_len=128)
    # its LM training text is wiki-leads train, token for token
    assert td.splits["train"]["input_ids"][:20] == leads.splits["train"]["input_ids"][:20]
    assert len(td.splits["train"]) == len(leads.splits["train"])
    for split in ("validation", "test"):
        ds = td.splits[split]
        assert len(ds) > 300
        for row in ds.select(range(60)):
            labelled = [i for i, y in enumerate(row["labels"]) if y != -100]
            # loss only on the last word, which ends the input
            assert labelled == list(range(len(row["input_ids"]) - len(labelled),
                                          len(row["input_ids"])))
            assert gpt2.decode([row["labels"][i] for i in labelled]) == " " + row["target"]
            assert re.search(rf"\b{row['target']}\b", row["context"], flags=re.I)
            assert row["context"].endswith(gpt2.decode(row["input_ids"][: labelled[0]])[-40:])
    # held out: every passage starts a validation/test article, none starts a train one
    by_split: dict[str, list[str]] = {}
    for a in _articles().values():
        by_split.setdefault(split_of(a["title"]), []).append(" ".join(a["extract"].split()))
    for split in ("validation", "test"):
        for ctx in td.splits[split]["context"][:40]:
            assert any(t.startswith(ctx) for t in by_split[split])
            assert not any(t.startswith(ctx) for t in by_split["train"])
    # the same passages under SmolLM2's tokenizer (evaluation splits only)
    td2 = load_task_data("wiki-lambada", "lm", smollm2, seq_len=128, splits="validation,test")
    assert set(td2.splits) == {"validation", "test"}
    assert td2.splits["test"]["target"] == td.splits["test"]["target"]
    row = td2.splits["test"][0]
    assert smollm2.decode([y for y in row["labels"] if y != -100]) == " " + row["target"]


def test_last_word_context_cut_on_the_left(gpt2):
    td = load_task_data("wiki-lambada", "lm", gpt2, seq_len=16, splits=["validation"])
    assert list(td.splits) == ["validation"]
    row = td.splits["validation"][0]
    assert len(row["input_ids"]) <= 16 and row["labels"][-1] != -100


# ---------------------------------------------------------------- rt-snippets (classification)

def test_rt_snippets_labels_and_balance(minilm):
    td = load_task_data("rt-snippets", "classify", minilm, seq_len=64)
    assert td.num_labels == 2 and td.label_names == ("negative", "positive")
    # naive reference straight from the file
    ratings = [float(ln.split("\t")[1]) for ln in
               bundled.rt_snippets_file(build=False).read_text(encoding="utf-8").splitlines()
               if ln.strip()]
    kept = [r for r in ratings if abs(r) >= 0.5]
    assert sum(len(ds) for ds in td.splits.values()) == len(kept) == 10072
    counts = [td.label_counts(s) for s in td.splits]
    assert sum(c[1] for c in counts) == sum(r > 0 for r in kept)
    for c in counts:
        assert 0.4 < c[1] / (c[0] + c[1]) < 0.6
    row = td.splits["train"][0]
    assert row["input_ids"][0] == minilm.cls_token_id and len(row["input_ids"]) <= 64
    assert max(len(r) for r in td.splits["train"]["input_ids"]) == 64  # long ones truncated


def test_rt_snippets_as_lm_text(gpt2):
    td = load_task_data("rt-snippets", "lm", gpt2, seq_len=64)
    assert td.num_labels is None and len(td.splits["train"]) > 100


# ---------------------------------------------------------------- E2E (generation)

def _e2e_rows(path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [(r["mr"].strip(), r["ref"].strip()) for r in csv.DictReader(fh)]


@pytest.mark.parametrize("tok_name", ["gpt2", "smollm2-135m"])
def test_e2e_local_csvs_loss_mask_and_references(e2e_dir, tok_name, request):
    tok = request.getfixturevalue("gpt2" if tok_name == "gpt2" else "smollm2")
    td = load_task_data("e2e", "generate", tok, seq_len=128, data_dir=str(e2e_dir))
    dev, test = _e2e_rows(e2e_dir / "devset.csv"), _e2e_rows(e2e_dir / "testset_w_refs.csv")
    assert len(td.splits["train"]) + len(td.splits["validation"]) == len(dev) == 4672
    assert len(td.splits["test"]) == len(test) == 4693
    refs = td.references("test")
    assert len(refs) == 630 == len({m for m, _ in test})
    assert sum(len(r) for _, r in refs) == 4693
    assert refs[0] == (generation_prompt(test[0][0]), [r for m, r in test if m == test[0][0]])
    # no MR in both train and validation
    src = {s: {p for p, _ in td.references(s)} for s in ("train", "validation")}
    assert not src["train"] & src["validation"]
    assert len(src["train"]) + len(src["validation"]) == 547
    for i in (0, 1, 500):
        row = td.splits["test"][i]
        mr, ref = test[i]
        n_prompt = sum(1 for y in row["labels"] if y == -100)
        assert row["labels"][:n_prompt] == [-100] * n_prompt
        assert tok.decode(row["input_ids"][:n_prompt]) == f"{mr} ="
        target = row["labels"][n_prompt:]
        assert target == row["input_ids"][n_prompt:]
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]) == " " + ref


def test_e2e_dir_path_as_name(e2e_dir, gpt2):
    td = load_task_data(str(e2e_dir), None, gpt2, seq_len=128)
    assert td.task == "generate" and len(td.references("validation")) > 0


# ---------------------------------------------------------------- collate

def test_collate_pads_and_masks():
    c = Collator(pad_token_id=9)
    batch = c([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
               {"input_ids": [4], "attention_mask": [1], "labels": [4], "target": "x"}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    cls = c([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 1},
             {"input_ids": [3], "attention_mask": [1], "labels": 0}])
    assert cls["labels"].dtype == torch.long and cls["labels"].tolist() == [1, 0]
    as_tensors = c([{"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1]),
                     "labels": torch.tensor(1)}])  # rows from a torch-formatted dataset
    assert as_tensors["labels"].tolist() == [1]


def test_collate_feeds_a_real_dataloader(minilm):
    td = load_task_data("rt-snippets", "classify", minilm, seq_len=32)
    loader = torch.utils.data.DataLoader(td.splits["validation"], batch_size=4,
                                         collate_fn=td.collate_fn)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)
    assert isinstance(td, TaskData)


# ---------------------------------------------------------------- local files

def _write_csv(path, rows, header):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_local_csv_classification(tmp_path, minilm):
    rows = [(f"review number {i} was {'good' if i % 3 else 'bad'}", "pos" if i % 3 else "neg")
            for i in range(300)]
    _write_csv(tmp_path / "r.csv", rows, ["review", "stars"])
    td = load_task_data(str(tmp_path / "r.csv"), "classify", minilm, seq_len=32,
                        text_column="review", label_column="stars")
    assert td.label_names == ("neg", "pos")
    assert sum(len(d) for d in td.splits.values()) == 300
    assert sum(td.label_counts(s).get(0, 0) for s in td.splits) == 100


def test_local_jsonl_generation_and_txt_lm(tmp_path, gpt2):
    with open(tmp_path / "g.jsonl", "w") as fh:
        for i in range(200):
            fh.write(json.dumps({"source": f"item {i}", "target": f"the number {i}"}) + "\n")
    td = load_task_data(str(tmp_path / "g.jsonl"), "generate", gpt2, seq_len=32)
    row = td.splits["train"][0]
    assert row["labels"][0] == -100 and row["labels"][-1] == gpt2.eos_token_id
    (tmp_path / "t.txt").write_text("\n\n".join(f"Paragraph {i}. " + "words " * 40
                                                for i in range(200)))
    lm = load_task_data(str(tmp_path / "t.txt"), "lm", gpt2, seq_len=32)
    assert all(len(lm.splits[s]) > 0 for s in ("train", "validation", "test"))


def test_token_counts_count_predicted_tokens():
    # an lm block's first token is context only (labels shift by one), as train.target_count
    # counts it; prompt-masked rows already start with -100, so they are unchanged
    import datasets

    rows = {"input_ids": [[1, 2, 3, 4]] * 3, "attention_mask": [[1] * 4] * 3}
    lm = TaskData("x", "lm", {"test": datasets.Dataset.from_dict(
        {**rows, "labels": rows["input_ids"]})}, collate_fn=None, seq_len=4)
    assert lm.token_counts("test") == (12, 9)
    gen = TaskData("x", "generate", {"test": datasets.Dataset.from_dict(
        {**rows, "labels": [[-100, -100, 3, 4]] * 3})}, collate_fn=None, seq_len=4)
    assert gen.token_counts("test") == (12, 6)


def test_local_parquet(tmp_path, minilm):
    import datasets

    datasets.Dataset.from_dict({"text": [f"s {i}" for i in range(200)],
                                "label": [i % 2 for i in range(200)]}).to_parquet(
        str(tmp_path / "d.parquet"))
    td = load_task_data(str(tmp_path / "d.parquet"), "classify", minilm, seq_len=16)
    assert td.num_labels == 2


# ---------------------------------------------------------------- bad data

def test_bad_data_errors(tmp_path, gpt2, minilm):
    _write_csv(tmp_path / "a.csv", [("x", 0)] * 50, ["body", "label"])
    with pytest.raises(UserError, match="missing column"):
        load_task_data(str(tmp_path / "a.csv"), "classify", minilm)
    _write_csv(tmp_path / "b.csv", [(f"t{i}", i % 5) for i in range(100)], ["text", "label"])
    with pytest.raises(UserError, match="outside 0..2"):
        load_task_data(str(tmp_path / "b.csv"), "classify", minilm, num_labels=3)
    _write_csv(tmp_path / "c.csv", [("only one row", 0)], ["text", "label"])
    with pytest.raises(UserError, match="empty"):
        load_task_data(str(tmp_path / "c.csv"), "classify", minilm)
    (tmp_path / "d.json").write_text('{"text": "unterminated')
    with pytest.raises(UserError, match="does not parse"):
        load_task_data(str(tmp_path / "d.json"), "lm", gpt2)
    (tmp_path / "e.txt").write_text("too short")
    with pytest.raises(UserError, match="empty|no examples"):
        load_task_data(str(tmp_path / "e.txt"), "lm", gpt2, seq_len=64)
    with pytest.raises(UserError, match="does not exist"):
        load_task_data(str(tmp_path / "nope.csv"), "lm", gpt2)
    with pytest.raises(UserError, match="unknown dataset"):
        load_task_data("no-such-preset", "lm", gpt2)
    with pytest.raises(UserError, match="supports task"):
        load_task_data("wiki-leads", "classify", gpt2)
    with pytest.raises(UserError, match="data_fraction"):
        load_task_data("wiki-leads", "lm", gpt2, data_fraction=0.0)
    with pytest.raises(UserError, match="devset.csv"):
        load_task_data("e2e", "generate", gpt2, data_dir=str(tmp_path))


def test_hub_preset_offline_is_one_line_error(monkeypatch, gpt2):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("wikitext-2", "sst2"):
        with pytest.raises(UserError) as err:
            load_task_data(name, None, gpt2)
        assert "\n" not in str(err.value) and "wiki-leads" in str(err.value)
