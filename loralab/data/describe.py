"""`loralab data NAME`: a human-readable summary of a prepared dataset."""

from __future__ import annotations

from typing import Any

from loralab.data.sources import resolve_source
from loralab.data.tasks import load_task_data
from loralab.models.loading import load_tokenizer


def describe(name: str, *, task: str | None = None, tokenizer: str | None = None,
             seq_len: int = 128, data_fraction: float = 1.0, **options: Any) -> str:
    """A human-readable summary: splits, examples, tokens, label balance, one decoded sample."""
    kind, task, _ = resolve_source(name, task, options)
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
