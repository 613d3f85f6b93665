"""Model surgery: inserting adapters, merging, trainable parameters and target errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab import LoRAConfig, apply_lora, merge_lora
from loralab.errors import UserError
from loralab.lora.inject import lora_modules, lora_parameters, merge_adapters, unmerge_adapters
from loralab.lora.layer import LoRALinear


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_bert])
@pytest.mark.parametrize("preset", ["qv", "attn", "attn-proj", "attn-proj-ffn", "all"])
def test_untrained_adapter_leaves_outputs_unchanged(make, preset):
    model = make()
    x = torch.randint(0, 128, (2, 12))
    before = model(x).logits
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=preset))
    # exact on purpose: the base path is the same addmm/linear on the same 2-D input, and B = 0
    # adds exact zeros, so any CPU gives the same bits
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_bert])
@pytest.mark.parametrize("preset", ["qv", "attn-proj-ffn", "all"])
def test_merge_unmerge_round_trip(make, preset):
    model = make()
    x = torch.randint(0, 128, (2, 12))
    base_logits = model(x).logits
    apply_lora(model, LoRAConfig(rank=4, alpha=32, targets=preset))
    for _, layer in lora_modules(model):
        # a trained-adapter magnitude: moves these logits by ~1e-2..1 (BERT's tiny init logits
        # are ~1e-2, so its B is larger)
        nn.init.normal_(layer.lora_B, std=0.5 if make is tiny_bert else 0.05)
    adapted = model(x).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    # x (W + s B A)^T vs x W^T + s (x A^T) B^T: fp32 roundings in another order, through every
    # layer; measured <= 2.2e-6 ("all": the head too) here and with MKL_CBWR=COMPATIBLE
    # ATEN_CPU_CAPABILITY=default (other GEMM kernels); 3e-5 (+1e-5 relative for logits ~1.5)
    # is >10x that and 30x below the 1e-3 an adapter must move the logits (above)
    tol = {"atol": 3e-5, "rtol": 1e-5}
    merge_adapters(model)
    torch.testing.assert_close(model(x).logits, adapted, **tol)
    unmerge_adapters(model)
    torch.testing.assert_close(model(x).logits, adapted, **tol)
    plain = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(x).logits, adapted, **tol)


def test_merged_model_saves_and_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()  # tied lm_head: merging into it must not change the embeddings
    embeddings = model.get_input_embeddings().weight.detach().clone()
    x = torch.randint(0, 128, (2, 12))
    apply_lora(model, LoRAConfig(rank=4, alpha=32, targets="all"))
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    adapted = model(x).logits
    plain = merge_lora(model)
    assert torch.equal(plain.get_input_embeddings().weight, embeddings)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # merged vs adapted: as in test_merge_unmerge_round_trip (2.2e-6 measured)
    torch.testing.assert_close(reloaded(x).logits, adapted, atol=3e-5, rtol=1e-5)


def test_merge_without_a_head_adapter_keeps_gpt2_tied_and_reloadable(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()  # tied lm_head, adapters on the body only
    x = torch.randint(0, 128, (2, 12))
    apply_lora(model, LoRAConfig(rank=4, targets="qv"))
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    adapted = model(x).logits
    plain = merge_lora(model)
    # a LoRA wrapper's `weight` property is not a second owner of its base weight: the merge
    # must not untie (a tied config with the head saved once keeps from_pretrained exact)
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert plain.config.tie_word_embeddings
    plain.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    # W + s B A summed once vs x W + (x A^T) B^T s: fp32 rounding only
    torch.testing.assert_close(reloaded(x).logits, adapted, atol=1e-5, rtol=0)


def _closed_form(model, preset: str, rank: int) -> int:
    """r (d_in + d_out) per adapted matrix, counting the fused c_attn as its q/k/v matrices."""
    per_matrix = {"qv": 2, "attn": 3}
    total = 0
    for name, module in model.named_modules():
        if name.endswith("attn.c_attn"):
            d_in, d_out = module.weight.shape
            total += per_matrix.get(preset, 3) * rank * (d_in + d_out // 3)
        elif isinstance(module, (nn.Linear, Conv1D)):
            d_in, d_out = (module.weight.shape if isinstance(module, Conv1D)
                           else module.weight.shape[::-1])
            leaf = name.split(".")[-1]
            wanted = {"qv": {"q_proj", "v_proj", "query", "value"},
                      "attn": {"q_proj", "k_proj", "v_proj", "query", "key", "value"}}
            extra_ffn = {"gate_proj", "up_proj", "down_proj", "c_fc", "intermediate"}
            if preset in wanted and leaf in wanted[preset]:
                total += rank * (d_in + d_out)
            elif preset == "attn-proj-ffn" and (
                    leaf in wanted["attn"] | extra_ffn | {"o_proj"}
                    or name.endswith(("attn.c_proj", "mlp.c_proj", "output.dense",
                                      "intermediate.dense"))):
                total += rank * (d_in + d_out)
    return total


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_bert])
@pytest.mark.parametrize("preset", ["qv", "attn", "attn-proj-ffn"])
def test_trainable_parameters_equal_closed_form(make, preset):
    model = make()
    expected = _closed_form(model, preset, rank=3)
    apply_lora(model, LoRAConfig(rank=3, targets=preset))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == sum(p.numel() for p in lora_parameters(model))


def test_train_head_unties_and_trains_only_the_head():
    model = tiny_llama()
    apply_lora(model, LoRAConfig(rank=2, targets="qv", train_head=True))
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is not emb.weight and head.weight.requires_grad
    assert not emb.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n} | {"lm_head.weight"}


def test_unknown_target_lists_adaptable_modules():
    with pytest.raises(UserError) as info:
        apply_lora(tiny_llama(), LoRAConfig(targets=("qproj",)))
    message = str(info.value)
    assert "qproj" in message and "model.layers.*.self_attn.q_proj" in message
    assert "\n" not in message


def test_non_dense_target_is_rejected():
    with pytest.raises(UserError, match="Embedding"):
        apply_lora(tiny_llama(), LoRAConfig(targets=("embed_tokens",)))


def test_glob_targets():
    model = apply_lora(tiny_llama(), LoRAConfig(targets=("model.layers.1.*.down_proj", "q_proj")))
    names = [n for n, _ in lora_modules(model)]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj"]
