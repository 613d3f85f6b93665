"""Regional torch.compile: which blocks, the same maths as eager, and train() with compile on."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab.kernels.compiling import (
    AUTO_MIN_FLOPS,
    compile_blocks,
    repeated_blocks,
    should_compile,
    uncompile_blocks,
)
from loralab.lora.config import LoRAConfig
from loralab.lora.inject import apply_lora, lora_modules


@pytest.mark.parametrize("make, where", [(tiny_gpt2, "transformer.h"), (tiny_llama, "model.layers"),
                                         (tiny_bert, "bert.encoder.layer")])
def test_repeated_blocks_are_the_layer_stack(make, where):
    model = make()
    blocks = repeated_blocks(model)
    assert blocks == list(model.get_submodule(where))


def test_should_compile_policy():
    big = dict(params=135_000_000, tokens_per_step=1024)  # SmolLM2 at 8 x 128
    steps = math.ceil(AUTO_MIN_FLOPS / (6 * 135_000_000 * 1024))
    assert should_compile("auto", trains=True, total_steps=steps, **big)[0]
    assert not should_compile("auto", trains=True, total_steps=steps - 1, **big)[0]
    assert not should_compile("auto", trains=True, total_steps=20, params=22_000_000,
                              tokens_per_step=2048)[0]  # a short MiniLM run stays eager
    assert should_compile("on", trains=True, total_steps=1)[0]
    assert not should_compile("off", trains=True, total_steps=10**6, **big)[0]
    assert not should_compile("on", trains=False, total_steps=10)[0]
    with pytest.raises(ValueError):
        should_compile("yes", trains=True, total_steps=10)


def _adapted(make, targets: str, dropout: float = 0.0):
    torch.manual_seed(0)
    model = make()
    model.requires_grad_(False)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout, targets=targets))
    for _, layer in lora_modules(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


@pytest.mark.parametrize("make, targets", [(tiny_gpt2, "qv"), (tiny_gpt2, "all"),
                                           (tiny_llama, "all")])
def test_compiled_blocks_match_eager_logits_and_grads(make, targets):
    """The composed LoRA path traced by dynamo (sliced GPT-2 c_attn included) gives the eager
    custom-Function results: logits and every adapter gradient."""
    model = _adapted(make, targets)
    x = torch.randint(0, model.config.vocab_size, (2, 12),
                      generator=torch.Generator().manual_seed(3))
    eager = model(x).logits
    eager.square().mean().backward()
    ref = {n: (m.lora_A.grad.clone(), m.lora_B.grad.clone()) for n, m in lora_modules(model)}
    model.zero_grad(set_to_none=True)
    assert compile_blocks(model, backend="aot_eager") == model.config.num_hidden_layers
    compiled = model(x).logits
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for name, layer in lora_modules(model):
        torch.testing.assert_close(layer.lora_A.grad, ref[name][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, ref[name][1], atol=1e-5, rtol=1e-4)
    assert uncompile_blocks(model) == model.config.num_hidden_layers
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in repeated_blocks(model))


def test_compiled_dropout_drops_and_rescales():
    """Under compilation the LoRA dropout is inductor's own random op: still inverted dropout
    (kept inputs scaled by 1/(1-p)), so the adapter term keeps its expectation."""
    model = _adapted(tiny_llama, "qv", dropout=0.5)
    compile_blocks(model, backend="aot_eager")
    model.train()
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    torch.manual_seed(1)
    a = model(x).logits
    torch.manual_seed(2)
    b = model(x).logits
    assert not torch.allclose(a, b)  # dropout is active in training mode
    model.eval()
    with torch.no_grad():
        c, d = model(x).logits, model(x).logits
    torch.testing.assert_close(c, d)


@pytest.mark.slow
def test_train_with_compile_on_matches_eager(tmp_path):
    """train() with --compile on (real inductor) gives the eager loss curve (dropout 0) and
    records that it compiled; the blocks run eagerly again afterwards."""
    from loralab.training.config import TrainConfig
    from loralab.training.loop import train
    from test_train import Loaded, lm_data

    curves = {}
    for setting in ("off", "on"):
        torch.manual_seed(0)
        model = tiny_llama()
        config = TrainConfig(model="tiny", task="lm", method="lora", preset="all", out=str(
            tmp_path / setting), max_steps=3, batch_size=4, lr=1e-2, compile=setting,
            keep_best=False, precision="fp32")  # auto is bf16 on AMX; this compares fp32
        record = train(config, loaded=Loaded(model), task_data=lm_data(n=16))
        assert record["env"]["compiled"] is (setting == "on")
        curves[setting] = [v for _, v in record["curves"]["train_loss"]]
        assert all(getattr(b, "_compiled_call_impl", None) is None
                   for b in repeated_blocks(model))
    assert curves["on"] == pytest.approx(curves["off"], abs=1e-4)
