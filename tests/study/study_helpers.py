"""Shared study test helpers (imported by module name: tests/study is on pytest's pythonpath):
a small study, a recorded-style run function, a tiny real study and a word-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

BASE = """\
name: t
model: minilm-l6
task: classify
data: rt-snippets
eval: [rt-snippets]
budget: {max_steps: 2, batch_size: 4, seq_len: 32, lr: 1.0e-3}
seeds: 1
strategies:
  - {name: head, method: head}
  - {name: lora-r1, method: lora, preset: qv, rank: 1, alpha: 2}
"""


def fake_run_fn(calls: list):
    """A stand-in for train.train that writes a record like it and logs how it was called."""
    def run(config: dict, resume: bool) -> dict:
        calls.append((config["strategy"], config["seed"], resume))
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        record = {"run_id": config["strategy"], "status": "finished", "config": config,
                  "metrics": {e["name"]: {"loss": 1.0 + config["seed"], "f1": 0.5}
                              for e in config["eval_sets"]},
                  "costs": {"trainable_params": 10, "total_params": 100},
                  "curves": {}, "artifacts": {}, "env": {}, "notes": []}
        (out / "record.json").write_text(json.dumps(record))
        return record
    return run


TINY_REAL = """\
name: tiny-real
model: minilm-l6
task: classify
num_labels: 2
data: {name: rt-snippets, fraction: 0.02}
eval: [{name: rt-snippets, data: rt-snippets, max_examples: 32}]
budget: {max_steps: 2, batch_size: 8, seq_len: 32, lr: 1.0e-3, eval_every: 1, eval_batches: 1,
         eval_max_examples: 16}
strategies:
  - {name: head, method: head}
  - {name: lora-r2, method: lora, preset: qv, rank: 2, alpha: 4}
"""


def _word_tokenizer(vocab_size: int = 128):
    """A real (fast) word-level tokenizer over words w0..w126 with EOS = 127, built in memory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<eos>"] = vocab_size - 1
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")
