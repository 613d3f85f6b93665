"""DoRA (loralab.lora.dora, LoRALinear(dora=True)) against a naive fp64 reference, PEFT's own
DoRA layer, and PEFT's adapter format both ways."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab import LoRAConfig, apply_lora, load_adapter, save_adapter
from loralab.errors import UserError
from loralab.lora.inject import lora_modules, lora_parameters, merge_lora
from loralab.lora.layer import LoRALinear

warnings.filterwarnings("ignore", category=UserWarning)

CASES = [  # (conv1d, d_in, d_out, slices)
    (False, 12, 20, None),
    (True, 12, 20, None),
    (True, 12, 24, ((0, 8), (16, 24))),            # fused c_attn, q and v
]


def _layer(conv1d, d_in, d_out, slices, p=0.0, dtype=torch.float64, rank=3, scale=2.5):
    """A DoRA layer with random B and a magnitude moved off its initial value (as trained)."""
    torch.manual_seed(1)
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    base = base.to(dtype)
    nn.init.normal_(base.bias)
    base.requires_grad_(False)
    layer = LoRALinear(base, rank, scale, p, slices, dora=True).train()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(d_out, dtype=dtype))
    return layer


def _delta(a, b, scale, slices, d_out):
    """s B A as a (d_out, d_in) matrix (zero outside the slices), by plain autograd ops."""
    rank = a.shape[0] // len(slices)
    rows, row = [], 0
    at = 0
    for j, (lo, hi) in enumerate(slices):
        if lo > at:
            rows.append(a.new_zeros(lo - at, a.shape[1]))
        rows.append(b[row:row + hi - lo] @ a[j * rank:(j + 1) * rank])
        row, at = row + hi - lo, hi
    if at < d_out:
        rows.append(a.new_zeros(d_out - at, a.shape[1]))
    return scale * torch.cat(rows)


def naive_dora(x, w, bias, a, b, m, scale, slices, xd=None, detach=True):
    """PEFT's DoRA formula, written out: f = m / ||W + s B A||_c (a constant in backward),
    y = x W^T + b + (f - 1) (D(x) W^T) + f (D(x) (s B A)^T); D = identity without dropout.
    `w` is (d_out, d_in)."""
    delta = _delta(a, b, scale, slices, w.shape[0])
    norm = (w + delta).norm(dim=1)
    f = m / (norm.detach() if detach else norm)
    xd = x if xd is None else xd
    return x @ w.T + bias + (f - 1) * (xd @ w.T) + f * (xd @ delta.T)


def _run(layer, x, seed=7):
    """(y, grads of x, A, B, m) of the layer on x, dropout drawn after manual_seed(seed)."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    params = (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    grads = torch.autograd.grad(y, (x, *params), g)
    return y, grads, g


def _reference(layer, x, g, p, seed=7, detach=True):
    slices = layer.slices
    w = layer.weight.T if layer.conv1d else layer.weight
    x = x.detach().clone().requires_grad_()
    a, b, m = (t.detach().clone().requires_grad_() for t in
               (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    torch.manual_seed(seed)
    xd = F.dropout(x, p, training=True) if p > 0 else None   # the layer's draw, reproduced
    y = naive_dora(x, w, layer.bias, a, b, m, layer.scale, slices, xd, detach)
    return y, torch.autograd.grad(y, (x, a, b, m), g)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("conv1d,d_in,d_out,slices", CASES)
def test_values_and_gradients_match_naive_fp64(conv1d, d_in, d_out, slices, p):
    """y and the gradients wrt x, A, B and m, in fp64, against the written-out formula."""
    layer = _layer(conv1d, d_in, d_out, slices, p)
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    y, grads, g = _run(layer, x)
    y_ref, grads_ref = _reference(layer, x, g, p)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(t.abs().sum() > 0 for t in grads)


def test_norm_is_a_constant_in_backward():
    """The test above can fail: with the norm differentiated, A's and B's gradients change
    (m's does not: the norm does not depend on m)."""
    layer = _layer(False, 12, 20, None)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    _, grads, g = _run(layer, x)
    _, grads_live = _reference(layer, x, g, 0.0, detach=False)
    assert (grads[1] - grads_live[1]).abs().max() > 1e-3
    assert (grads[2] - grads_live[2]).abs().max() > 1e-3


@pytest.mark.parametrize("conv1d,d_in,d_out,slices", CASES)
def test_composed_form_matches_the_kernel(monkeypatch, conv1d, d_in, d_out, slices):
    """The plain-op form used under torch.compile (and with dropout) equals the kernel form."""
    layer = _layer(conv1d, d_in, d_out, slices)
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    y, grads, _ = _run(layer, x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y2, grads2, _ = _run(layer, x)
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads2, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv1d,d_in,d_out,slices", CASES)
def test_untrained_dora_changes_nothing(conv1d, d_in, d_out, slices):
    """m starts at ||W||_c (per output row) and B at 0: the layer is the base layer."""
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    layer = LoRALinear(base, 3, 2.0, slices=slices, dora=True)
    rows = base.weight.T if conv1d else base.weight
    torch.testing.assert_close(layer.lora_magnitude_vector, rows.norm(dim=1))
    x = torch.randn(4, d_in)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("conv1d,d_in,d_out,slices", CASES)
def test_merge_and_unmerge(conv1d, d_in, d_out, slices):
    """Merged W' = m (W + s B A) / ||W + s B A||_c (rows of norm m), the same outputs; unmerge
    gives W back."""
    layer = _layer(conv1d, d_in, d_out, slices, dtype=torch.float32).eval()
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, d_in)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        rows = layer.weight.T if conv1d else layer.weight
        # the merged rows have norm m: the defining property of DoRA's merged weight
        torch.testing.assert_close(rows.norm(dim=1), layer.lora_magnitude_vector)
        w_rows = w0.T if conv1d else w0
        delta = layer.delta_weight()
        expected = layer.lora_magnitude_vector[:, None] * (w_rows + delta) / \
            (w_rows + delta).norm(dim=1, keepdim=True)
        torch.testing.assert_close(rows, expected)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    assert "_dora_norm" not in dict(layer.named_buffers())


def test_merge_lora_gives_the_plain_model():
    model = _dora_model(tiny_llama, "qv")
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        y = model(x).logits
        merged = merge_lora(model)
        assert not lora_modules(merged)
        assert (merged(x).logits - y).abs().max().item() <= 1e-5


def test_bf16_autocast_stays_bf16_and_close():
    layer = _layer(False, 32, 16, None, dtype=torch.float32)
    x = torch.randn(8, 32)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (0.4% an ulp); outputs here are ~5: a few ulps
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32


def test_parameters_and_plain_layer_unchanged():
    """DoRA adds m to the adapter's parameters; a plain layer has no magnitude anywhere."""
    dora = LoRALinear(nn.Linear(6, 4), rank=2, scale=1.0, dora=True)
    assert dora.adapter_parameters() == (dora.lora_A, dora.lora_B, dora.lora_magnitude_vector)
    assert "dora=True" in repr(dora)
    plain = LoRALinear(nn.Linear(6, 4), rank=2, scale=1.0)
    assert plain.lora_magnitude_vector is None and not plain.dora
    assert sorted(plain.state_dict()) == ["base.bias", "base.weight", "lora_A", "lora_B"]


# --- PEFT's DoRA layer ---------------------------------------------------------------------------

@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_matches_peft_dora_layer_in_training(conv1d, p):
    """One layer against PEFT's (fp32, train mode, same dropout draws): outputs and gradients
    wrt x, A, B, m."""
    torch.manual_seed(2)
    base = Conv1D(20, 12) if conv1d else nn.Linear(12, 20)
    peft_model = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=p,
        fan_in_fan_out=conv1d, init_lora_weights=False)).train()
    peft_layer = peft_model.base_model.model[0]
    layer = LoRALinear(base.requires_grad_(False), 4, 2.0, p, dora=True).train()
    with torch.no_grad():
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
        peft_layer.lora_magnitude_vector["default"].weight.mul_(1.1)
        layer.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(3, 7, 12)
    g = torch.randn(3, 7, 20)
    results = []
    for module, params in ((layer, layer.adapter_parameters()),
                           (peft_layer, (peft_layer.lora_A["default"].weight,
                                         peft_layer.lora_B["default"].weight,
                                         peft_layer.lora_magnitude_vector["default"].weight))):
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)
        y = module(xi)
        results.append((y, torch.autograd.grad(y, (xi, *params), g)))
    (y, grads), (y_peft, grads_peft) = results
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_peft, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- PEFT's adapter format, both ways ------------------------------------------------------------

def _dora_model(make, preset, train_head=False):
    """A model with DoRA adapters as after training: B and the magnitudes moved off their init."""
    model = make()
    apply_lora(model, LoRAConfig(rank=4, alpha=32, targets=preset, train_head=train_head,
                                 dora=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_B.normal_(std=0.05)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand_like(
                layer.lora_magnitude_vector))
    return model.eval()


def _fresh(make):
    model = make()
    if hasattr(model, "classifier"):
        torch.manual_seed(99)
        model.classifier.reset_parameters()
    return model


ROUND_TRIPS = [
    (tiny_gpt2, "qv", False),            # fused c_attn with q, v slices (block-structured B)
    (tiny_gpt2, "attn-proj-ffn", False),  # whole Conv1D layers
    (tiny_llama, "qv", False), (tiny_llama, "all", False),
    (tiny_bert, "qv", True),
]


@pytest.mark.parametrize("make,preset,train_head", ROUND_TRIPS)
def test_peft_loads_loralab_dora_adapter(tmp_path, make, preset, train_head):
    model = _dora_model(make, preset, train_head)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(_fresh(make), tmp_path).eval()
    with torch.no_grad():
        got = peft_model(x).logits
    # fp32 with the sums in another order (PEFT: B(A(eye)) for the norm, two matmuls)
    assert (got - expected).abs().max().item() <= 1e-5
    # and the change from the base model is far above that tolerance: the test can fail
    with torch.no_grad():
        assert (_fresh(make)(x).logits - expected).abs().max().item() > 1e-3
    # round trip in loralab: compact slices and the same trainable parameters come back
    loaded = load_adapter(_fresh(make), tmp_path).eval()
    with torch.no_grad():
        assert (loaded(x).logits - expected).abs().max().item() <= 1e-5
    assert [m.slices for _, m in lora_modules(loaded)] == [m.slices for _, m in lora_modules(model)]
    for (_, a), (_, b) in zip(lora_modules(loaded), lora_modules(model), strict=True):
        assert torch.equal(a.lora_magnitude_vector, b.lora_magnitude_vector)
        assert a.lora_magnitude_vector.requires_grad


def test_saved_magnitude_uses_peft_key(tmp_path):
    model = _dora_model(tiny_gpt2, "qv")
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    # the magnitude spans all of c_attn (q, k, v), as PEFT treats the fused layer as one
    assert tensors[key].shape == (96,)
    layer = dict(lora_modules(model))["transformer.h.0.attn.c_attn"]
    assert torch.equal(tensors[key], layer.lora_magnitude_vector.detach())
    assert sum("magnitude" in k for k in tensors) == 2


def test_plain_adapter_saves_as_before(tmp_path):
    """No DoRA: no magnitude tensor, use_dora false (the format is unchanged)."""
    model = tiny_llama()
    apply_lora(model, LoRAConfig(rank=4, targets="qv"))
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is False


@pytest.mark.parametrize("make,targets,to_save", [
    (tiny_gpt2, ["c_attn", "c_proj"], None),
    (tiny_llama, ["q_proj", "v_proj", "down_proj"], ["lm_head"]),
    (tiny_bert, ["query", "value"], ["classifier"]),
])
def test_loralab_loads_peft_dora_adapter(tmp_path, make, targets, to_save):
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, modules_to_save=to_save,
                        fan_in_fan_out=make is tiny_gpt2, use_dora=True,
                        rank_pattern={targets[0]: 8}, alpha_pattern={targets[-1]: 4})
    peft_model = get_peft_model(make(), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.eval()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(_fresh(make), tmp_path).eval()
    assert all(m.dora for _, m in lora_modules(loaded))
    with torch.no_grad():
        assert (loaded(x).logits - expected).abs().max().item() <= 1e-5
        assert (_fresh(make)(x).logits - expected).abs().max().item() > 1e-3


def test_magnitude_without_use_dora_is_refused(tmp_path):
    save_adapter(_dora_model(tiny_llama, "qv"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="lora_magnitude_vector .*use_dora is False") as info:
        load_adapter(tiny_llama(), tmp_path)
    assert "\n" not in str(info.value)


def test_mixed_dora_and_plain_layers_cannot_be_saved(tmp_path):
    model = tiny_llama()
    apply_lora(model, LoRAConfig(rank=4, targets="qv", dora=True))
    name, layer = lora_modules(model)[0]
    layer.register_parameter("lora_magnitude_vector", None)
    with pytest.raises(UserError, match="mixes DoRA and plain"):
        save_adapter(model, tmp_path)


def test_magnitude_is_trainable_and_checkpointed():
    """apply_lora with dora: m is among the trainable LoRA parameters (so the optimizer and a
    checkpoint's trained_state hold it)."""
    model = tiny_llama()
    apply_lora(model, LoRAConfig(rank=4, targets="qv", dora=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    mags = {n for n in trainable if n.endswith("lora_magnitude_vector")}
    assert len(mags) == 4 and len(lora_parameters(model)) == 12
    model(torch.randint(0, 128, (2, 6))).logits.sum().backward()
    assert all(p.grad is not None for p in lora_parameters(model))


# --- through the training loop ------------------------------------------------------------------

@pytest.mark.slow
def test_dora_run_trains_checkpoints_and_saves_m(tmp_path):
    """`train` with dora (the CLI's --dora): m trains, the checkpoint holds it (so a resume
    restores it: `load_trained_state` puts it back), and the saved adapter is PEFT's DoRA with
    the run's logits."""
    from dataclasses import dataclass

    import datasets

    from loralab.training.config import TrainConfig
    from loralab.training.loop import train
    from loralab.training.strategies.base import strategy_for

    @dataclass
    class Loaded:
        model: object
        tokenizer: object = None
        notes: tuple = ()

    @dataclass
    class Data:
        splits: dict
        collate_fn: object

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (24, 10), generator=g).tolist()
    rows = {"input_ids": ids, "attention_mask": [[1] * 10] * 24, "labels": ids}
    data = Data({"train": datasets.Dataset.from_dict(rows)},
                lambda items: {k: torch.tensor([r[k] for r in items]) for k in rows})
    config = TrainConfig(model="tiny", task="lm", method="lora", dora=True, dropout=0.1,
                         preset="qv", rank=4, out=str(tmp_path / "run"), max_steps=4,
                         batch_size=4, lr=1e-2, warmup_steps=0, precision="fp32",
                         checkpoint_every=2, eval_every=0, keep_best=False)
    model = tiny_gpt2()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = train(config, loaded=Loaded(model), task_data=data)
    assert record["status"] == "finished"
    layers = lora_modules(model)
    assert all(layer.dora for _, layer in layers)
    norms = {n: (layer.weight.T if layer.conv1d else layer.weight).norm(dim=1)
             for n, layer in layers}
    assert any((layer.lora_magnitude_vector - norms[n]).abs().max() > 1e-4 for n, layer in layers)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    saved = {k: v for k, v in checkpoint["model"].items() if k.endswith(".lora_magnitude_vector")}
    assert len(saved) == len(layers)
    fresh = tiny_gpt2()
    strategy = strategy_for(config)
    strategy.prepare(fresh)
    strategy.load_trained_state(fresh, checkpoint["model"])
    for (name, a), (_, b) in zip(lora_modules(fresh), layers, strict=True):
        assert torch.equal(a.lora_magnitude_vector, b.lora_magnitude_vector), name
    for n, p in model.named_parameters():  # the base stays frozen
        if "lora_" not in n:
            assert torch.equal(p, init[n.replace(".base.", ".")]), n
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = model.eval()(x).logits
        peft_model = PeftModel.from_pretrained(tiny_gpt2(), adapter).eval()
        assert (peft_model(x).logits - expected).abs().max().item() <= 1e-5
