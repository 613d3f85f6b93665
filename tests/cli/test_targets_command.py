"""`loralab targets`: grouped modules, and the counts a run records."""

from __future__ import annotations

import json

import pytest

from loralab.cli.main import main


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random LLaMA (tied head, as SmolLM2) with the bundled GPT-2 tokenizer, and a small
    text corpus for one training step."""
    from conftest import save_tiny_llama_inputs

    return save_tiny_llama_inputs(tmp_path_factory.mktemp("tiny-targets"), 32,
                                  "the river city runs past old bridge town boats water".split())


def test_targets_groups_by_module_kind_and_all_lists_every_module(tiny_llama_dir, capsys):
    model = str(tiny_llama_dir / "llama")
    assert main(["targets", model, "--preset", "attn-proj-ffn", "--rank", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    body = [line.split() for line in lines[2:] if line.startswith("model.")]
    kinds = [r[0] for r in body]
    assert kinds == [f"model.layers.*.{m}" for m in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert all(r[2] == "2" for r in body)  # two layers each
    # q: 32 -> 32, rank 4: 4 (32 + 32) per layer, two layers
    assert body[0][3:6] == ["32", "x", "32"] and body[0][-1] == f"{2 * 4 * 64:,}"
    assert main(["targets", model, "--preset", "attn-proj-ffn", "--rank", "4", "--all"]) == 0
    full = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model.")]
    assert len(full) == 14 and full[0].split()[0] == "model.layers.0.self_attn.q_proj"


@pytest.mark.slow
def test_targets_percentage_counts_what_a_run_records(tiny_llama_dir, tmp_path, capsys):
    """The old count divided the LoRA parameters by the base model's alone; a run's record
    divides its trainable parameters by all of them, LoRA factors included."""
    from loralab.training.config import make_config
    from loralab.training.loop import train

    model = str(tiny_llama_dir / "llama")
    assert main(["targets", model, "--preset", "attn", "--rank", "4", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    record = train(make_config({
        "model": model, "task": "lm", "data": str(tiny_llama_dir / "text.txt"),
        "method": "lora", "preset": "attn", "rank": 4, "max_steps": 1, "batch_size": 2,
        "seq_len": 16, "out": str(tmp_path / "run"), "compile": "off",
        "eval_max_examples": 2}))
    costs = record["costs"]
    assert shown["trainable_params"] == costs["trainable_params"] == shown["lora_params"]
    assert shown["total_params"] == costs["total_params"]
    assert shown["trainable_pct"] == pytest.approx(costs["trainable_pct"], rel=1e-12)
