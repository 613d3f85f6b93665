"""Adapters in PEFT's format: loralab -> PEFT and PEFT -> loralab give the same logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from loralab import LoRAConfig, apply_lora, load_adapter, save_adapter
from loralab.errors import UserError
from loralab.lora import LoRALinear, lora_modules

warnings.filterwarnings("ignore", category=UserWarning)


def _trained(make, preset: str, train_head: bool = False, rank: int = 4, rslora=False):
    """A model with adapters whose B is non-zero (as after training) and a perturbed head."""
    model = make()
    apply_lora(model, LoRAConfig(rank=rank, alpha=32, targets=preset, train_head=train_head,
                                 rslora=rslora))
    torch.manual_seed(3)
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    if train_head:
        head = model.get_output_embeddings() if hasattr(model, "lm_head") else model.classifier
        with torch.no_grad():
            head.weight.add_(torch.randn_like(head.weight) * 0.1)
    return model.eval()


def _fresh(make):
    """The base model as a user would load it again; a classifier head is re-initialised
    differently, so the adapter must carry it."""
    model = make()
    if hasattr(model, "classifier"):
        torch.manual_seed(99)
        model.classifier.reset_parameters()
    return model


CASES = [
    (tiny_gpt2, "qv", False), (tiny_gpt2, "attn-proj-ffn", True), (tiny_gpt2, "all", False),
    (tiny_llama, "qv", False), (tiny_llama, "attn-proj-ffn", True), (tiny_llama, "all", False),
    (tiny_bert, "qv", False), (tiny_bert, "attn-proj", True), (tiny_bert, "all", False),
]


@pytest.mark.parametrize("make,preset,train_head", CASES)
def test_peft_loads_loralab_adapter(tmp_path, make, preset, train_head):
    model = _trained(make, preset, train_head)
    x = torch.randint(0, 128, (2, 12))
    expected = model(x).logits
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(_fresh(make), tmp_path).eval()
    got = peft_model(x).logits
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("make,preset,train_head", CASES)
def test_loralab_round_trip(tmp_path, make, preset, train_head):
    model = _trained(make, preset, train_head, rslora=True)
    x = torch.randint(0, 128, (2, 12))
    expected = model(x).logits
    save_adapter(model, tmp_path)
    loaded = load_adapter(_fresh(make), tmp_path).eval()
    assert (loaded(x).logits - expected).abs().max().item() <= 1e-5
    # the fused c_attn comes back in its compact sliced form (same parameter count)
    assert [m.slices for _, m in lora_modules(loaded)] == [m.slices for _, m in lora_modules(model)]
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("make,targets,to_save", [
    (tiny_gpt2, ["c_attn", "c_proj"], None),
    (tiny_llama, ["q_proj", "v_proj", "down_proj"], ["lm_head"]),
    (tiny_bert, ["query", "value"], ["classifier"]),
])
def test_loralab_loads_peft_adapter(tmp_path, make, targets, to_save):
    base = make()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, modules_to_save=to_save,
                        fan_in_fan_out=make is tiny_gpt2, rank_pattern={targets[0]: 8},
                        alpha_pattern={targets[-1]: 4})
    peft_model = get_peft_model(base, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.eval()
    x = torch.randint(0, 128, (2, 12))
    expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(_fresh(make), tmp_path).eval()
    assert (loaded(x).logits - expected).abs().max().item() <= 1e-5
    ranks = {n.split(".")[-1]: m.rank for n, m in lora_modules(loaded)}
    assert ranks[targets[0]] == 8


def test_saved_files_use_peft_names(tmp_path):
    model = _trained(tiny_gpt2, "qv")
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["r"] == 4 and config["rank_pattern"]["transformer.h.0.attn.c_attn"] == 8
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (96, 8)
    assert torch.count_nonzero(b[32:64]) == 0          # no update on k
    assert not (tmp_path / "adapter_model.bin").exists()


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(tiny_gpt2(), tmp_path / "nope")


def test_pickle_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UserError, match="pickle"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_corrupt_weights(tmp_path):
    save_adapter(_trained(tiny_gpt2, "qv"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_malformed_config(tmp_path):
    save_adapter(_trained(tiny_gpt2, "qv"), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_adapter_for_another_model(tmp_path):
    save_adapter(_trained(tiny_gpt2, "qv"), tmp_path)
    with pytest.raises(UserError, match="does not fit"):
        load_adapter(tiny_llama(), tmp_path)


def test_wrong_shapes(tmp_path):
    save_adapter(_trained(tiny_llama, "qv"), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(UserError, match="does not fit"):
        load_adapter(wider, tmp_path)


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    """Writes are atomic: a crash mid-save leaves the earlier adapter intact and loadable."""
    model = _trained(tiny_gpt2, "qv")
    save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("loralab.adapter.save_file", boom)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    load_adapter(tiny_gpt2(), tmp_path)


def test_dora_is_refused(tmp_path):
    save_adapter(_trained(tiny_llama, "qv"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="DoRA"):
        load_adapter(tiny_llama(), tmp_path)


def test_no_lora_tensors(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="no lora_A"):
        load_adapter(tiny_llama(), tmp_path)


def test_loaded_adapter_is_trainable(tmp_path):
    save_adapter(_trained(tiny_llama, "qv"), tmp_path)
    model = load_adapter(tiny_llama(), tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(isinstance(m, LoRALinear) for _, m in lora_modules(model))
