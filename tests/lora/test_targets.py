"""Target presets per architecture, explicit names, and the `loralab targets` dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab.errors import UserError
from loralab.lora.targets import resolve_targets


def tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64))


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64))


def leaves(targets) -> list[str]:
    return sorted({t.name.split(".", 1)[0] if "." not in t.name else
                   ".".join(t.name.split(".")[-2:]) for t in targets})


EXPECTED = {
    tiny_llama: {
        "qv": ["self_attn.q_proj", "self_attn.v_proj"],
        "attn": ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        "attn-proj": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                      "self_attn.v_proj"],
        "attn-proj-ffn": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                          "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
    },
    tiny_bert: {
        "qv": ["self.query", "self.value"],
        "attn-proj": ["output.dense", "self.key", "self.query", "self.value"],
    },
    tiny_distilbert: {
        "qv": ["attention.q_lin", "attention.v_lin"],
        "attn-proj-ffn": ["attention.k_lin", "attention.out_lin", "attention.q_lin",
                          "attention.v_lin", "ffn.lin1", "ffn.lin2"],
    },
    tiny_gemma3: {
        "qv": ["self_attn.q_proj", "self_attn.v_proj"],
    },
}


@pytest.mark.parametrize("make,preset,expected",
                         [(m, p, e) for m, d in EXPECTED.items() for p, e in d.items()])
def test_presets(make, preset, expected):
    assert leaves(resolve_targets(make(), preset)) == expected


def test_bert_ffn_and_projection_are_told_apart():
    names = [t.name for t in resolve_targets(tiny_bert(), "attn-proj-ffn")]
    assert "bert.encoder.layer.0.attention.output.dense" in names
    assert "bert.encoder.layer.0.output.dense" in names
    assert "bert.encoder.layer.0.intermediate.dense" in names
    assert "bert.pooler.dense" not in names and "classifier" not in names


@pytest.mark.parametrize("make,head", [(tiny_llama, "lm_head"), (tiny_gpt2, "lm_head"),
                                       (tiny_bert, "classifier"),
                                       (tiny_distilbert, "classifier"), (tiny_gemma3, "lm_head")])
def test_all_adds_the_head(make, head):
    model = make()
    names = {t.name for t in resolve_targets(model, "all")}
    assert head in names
    assert names - {head, "pre_classifier"} == {t.name for t in
                                                resolve_targets(model, "attn-proj-ffn")}


def test_gpt2_fused_slices():
    model = tiny_gpt2()  # n_embd 32: c_attn outputs [q | k | v] = 96
    qv = resolve_targets(model, "qv")
    assert [t.name for t in qv] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert qv[0].slices == ((0, 32), (64, 96))
    assert resolve_targets(model, "attn")[0].slices == ((0, 32), (32, 64), (64, 96))
    ffn = {t.name for t in resolve_targets(model, "attn-proj-ffn")}
    assert {"transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj"} <= ffn
    whole = resolve_targets(model, ("c_attn",))
    assert whole[0].slices is None  # explicit name: the whole fused layer, as in PEFT


def test_comma_separated_names_and_globs():
    names = [t.name for t in resolve_targets(tiny_llama(), "q_proj, model.layers.0.mlp.*")]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
                     "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.q_proj"]


def test_unknown_architecture_needs_explicit_targets():
    from torch import nn

    with pytest.raises(UserError, match="explicit targets"):
        resolve_targets(nn.Sequential(nn.Linear(2, 2)), "qv")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "loralab", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_targets_on_bundled_model():
    done = _run("targets", "minilm-l6", "--task", "classify", "--preset", "qv", "--rank", "4",
                "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["modules"]) == 12                      # 6 layers x (query, value)
    assert report["lora_params"] == 12 * 4 * (384 + 384)
    assert report["total_params"] > 22_000_000


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (("--targets", "nothing_here"), "adaptable modules are:"),
    (("--rank", "0"), "rank must be a positive integer"),
])
def test_cli_targets_errors(args, needle):
    done = _run("targets", "minilm-l6", "--task", "classify", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert needle in lines[-1] and "Traceback" not in done.stderr
