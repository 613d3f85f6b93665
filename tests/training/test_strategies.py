"""Fine-tuning strategies as objects: every registry name loads a Strategy class, a new method
is one file plus one registry line, and each method's model surgery, phases, FLOPs, deployment
and rebuilt saved model (the quantized ones with real torchao on tiny random models)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from conftest import randomise_adapters, tiny_gpt2, tiny_llama, token_ids
from loralab import quant
from loralab.errors import UserError
from loralab.lora.adapter import save_adapter
from loralab.lora.config import LoRAConfig
from loralab.lora.inject import apply_lora, lora_modules, lora_parameters
from loralab.training.config import TrainConfig
from loralab.training.strategies import registry
from loralab.training.strategies.base import Strategy, strategy_for, strategy_named
from loralab.training.strategies.lora import LoRA


def _strategy(method: str, scheme: str = "int8") -> Strategy:
    return strategy_for(TrainConfig(method=method, quant=scheme))



# --- the registry and the protocol ----------------------------------------------------------

@pytest.mark.parametrize("name", registry.names())
def test_every_registry_name_loads_its_strategy_class(name):
    spec = registry.get_spec(name)
    cls = spec.load()
    assert isinstance(cls, type) and issubclass(cls, Strategy)
    assert cls.__name__ == spec.implementation.split(":")[1]
    strategy = strategy_for(TrainConfig(method=name))
    assert type(strategy) is cls and strategy.spec is spec and strategy.name == name


def test_a_new_strategy_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    """A toy method: one module defining a subclass, one StrategySpec line; nothing else is
    edited, and the config, the registry and the loop's calls accept it."""
    (tmp_path / "toy_strategy.py").write_text(textwrap.dedent('''
        from loralab.training.strategies.lora import LoRA

        class ToyLoRA(LoRA):
            """LoRA whose adapters train at twice the rank."""

            def make_trainable(self, model):
                import dataclasses
                from loralab.lora.inject import apply_lora
                from loralab.training.strategies.lora import lora_config

                config = lora_config(self.config)
                apply_lora(model, dataclasses.replace(config, rank=2 * config.rank))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = registry.StrategySpec("toy-lora", "LoRA at twice the rank", "toy_strategy:ToyLoRA",
                                 uses_lora=True)
    monkeypatch.setattr(registry, "STRATEGIES", (*registry.STRATEGIES, spec))
    monkeypatch.setattr(registry, "_BY_NAME", {s.name: s for s in registry.STRATEGIES})
    try:
        assert "toy-lora" in registry.names()
        assert registry.order("toy-lora") == len(registry.STRATEGIES) - 1  # the last line
        # TrainConfig validates against the registry when it checks a config: the new line is
        # a valid method at once
        config = TrainConfig(method="toy-lora", task="lm", rank=2)
        strategy = strategy_for(config)
        assert isinstance(strategy, LoRA) and type(strategy).__name__ == "ToyLoRA"
        model = tiny_llama()
        notes = strategy.prepare(model)
        assert {m.rank for _, m in lora_modules(model)} == {4}
        assert {id(p) for p in strategy.trainable_parameters(model)} == {
            id(p) for p in lora_parameters(model)}
        assert isinstance(notes, list)
    finally:
        sys.modules.pop("toy_strategy", None)


def test_flops_per_token_per_method():
    """The FLOP rules as each method applies them (method-free rules: tests/costs)."""
    assert _strategy("full").flops_per_token(100) == 600
    assert _strategy("lora").flops_per_token(100, lora_params=10) == 460
    assert _strategy("head").flops_per_token(100, head_params=5) == 220
    assert _strategy("none").flops_per_token(100) == 0
    for name in ("qat-lora", "qlora", "lora-ptq"):
        assert _strategy(name).flops_per_token(100, lora_params=10) == 460


def test_flops_per_token_formula_spells_out_the_value():
    for method, kw in [("full", {}), ("lora", {"lora_params": 10}), ("head", {"head_params": 5}),
                       ("none", {})]:
        text, value = _strategy(method).flops_formula(1000, **kw)
        assert value == _strategy(method).flops_per_token(1000, **kw)
        assert text.split(" (N = ")[0].endswith(f"= {value:,.0f}"), text
    assert _strategy("lora").flops_formula(1000, lora_params=10)[0].startswith(
        "4 N + 6 A = 4 x 1,000 + 6 x 10 = 4,060")
    mixed, _ = _strategy("lora-head").flops_formula(1000, lora_params=10, head_params=5,
                                                    lora_fraction=0.75)
    assert "= 3,550 (" in mixed  # 0.75 x 4,060 + 0.25 x 2,020


def test_lora_head_phases():
    """LoRA for the first steps, then the head alone; the body under no_grad in the head phase."""
    strategy = strategy_for(TrainConfig(method="lora-head", task="lm", head_epochs=1.0))
    model = tiny_llama()
    strategy.prepare(model)
    head_start = strategy.head_start(total_steps=10, steps_per_epoch=4)
    assert head_start == 6 and "steps 1-6" in strategy.phase_note(head_start, 10)
    assert [strategy.phase_at(s, head_start) for s in (5, 6)] == ["lora", "head"]
    assert not strategy.body_frozen("lora") and strategy.body_frozen("head")
    strategy.set_phase(model, "head")
    assert not any(p.requires_grad for p in lora_parameters(model))
    assert len(strategy.trainable_parameters(model)) > len(
        [p for p in model.parameters() if p.requires_grad])
    assert _strategy("lora").phase_at(10**6, 0) == _strategy("lora").phase_at(0, 0)
    assert _strategy("head").body_frozen("anything")


def test_qlora_rejects_schemes_that_quantize_activations():
    with pytest.raises(UserError, match="activations"):
        _strategy("qlora", "int8-dyn").prepare_base(tiny_llama())
    with pytest.raises(UserError, match="no fake-quantized"):
        _strategy("qat-lora", "nf4").prepare_base(tiny_llama())


# --- quantized strategies: deployment ---------------------------------------------------------

def test_deploy_lora_ptq_measures_merged_vs_unmerged():
    torch.manual_seed(0)
    model = tiny_llama()
    apply_lora(model, LoRAConfig(rank=4, targets="qv"))
    randomise_adapters(model)
    calls = []

    def evaluate(m):
        calls.append(m)
        return {"validation": {"loss": float(quant.collect_logits(m, [token_ids()])[0].mean())}}

    dep = _strategy("lora-ptq", "int8").deploy(model, evaluate, [token_ids()], latency_repeats=1)
    assert lora_modules(model)  # the trained model is left as it was
    assert not lora_modules(dep.model)
    assert all(quant.is_quantized_tensor(m.weight) for _, m in quant.body_linears(dep.model))
    drift = dep.info["merge_metric_drift"]["validation"]["loss"]
    assert drift == pytest.approx(dep.metrics["validation"]["loss"]
                                  - dep.info["unmerged_metrics"]["validation"]["loss"])
    assert dep.info["merge_logit_drift"]["max_abs"] > 0
    # the float merged model PTQ starts from is timed in the same rounds and sized on disk
    assert set(dep.info["latency"]) == {"merged", "unmerged", "float"}
    assert dep.info["float_model_bytes"] > dep.info["merged_model_bytes"]


def test_gpt2_conv1d_body_is_converted_and_then_trains_with_qat():
    torch.manual_seed(0)
    model = tiny_gpt2()
    batch = token_ids()
    before = model(**batch).logits
    assert quant.conv1d_to_linear(model) == 8  # c_attn, c_proj, c_fc, mlp c_proj x 2 layers
    torch.testing.assert_close(model(**batch).logits, before, rtol=1e-5, atol=1e-5)
    notes = _strategy("qat-lora", "int8").prepare_base(model)
    assert any("fake-quantized" in n for n in notes)
    apply_lora(model, LoRAConfig(rank=2, targets="qv"))  # fused c_attn: q and v slices
    randomise_adapters(model)
    model(**batch).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


# --- loading a run: the recorded model, rebuilt (load_run_model), exported (merge --run) ---

def _trained_like(method: str, scheme: str, tmp_path) -> tuple[nn.Module, str]:
    """A tiny LLaMA prepared for `method` as train() does, with random adapters on every
    projection and the (tied) head, saved as the run's adapter."""
    model = tiny_llama()
    _strategy(method, scheme).prepare_base(model)
    apply_lora(model, LoRAConfig(rank=4, targets="all"))
    randomise_adapters(model)
    return model, str(save_adapter(model, tmp_path / "adapter"))


@pytest.mark.parametrize("method,scheme", [("qat-lora", "int8-dyn"), ("qat-lora", "int4"),
                                           ("lora-ptq", "int4-weight"), ("lora-ptq", "nf4")])
def test_rebuild_recorded_is_the_deployed_model_finish_evaluates(tmp_path, method, scheme):
    model, adapter = _trained_like(method, scheme, tmp_path)
    model.eval()
    dep = _strategy(method, scheme).deploy(model, lambda m: {}, [], latency_repeats=0)
    rebuilt = strategy_named(method).rebuild_recorded(tiny_llama(), adapter, scheme).eval()
    assert not lora_modules(rebuilt)
    deployed = dict(quant.body_linears(dep.model))
    layers = quant.body_linears(rebuilt)
    assert layers and all(quant.is_quantized_tensor(m.weight) for _, m in layers)
    for name, layer in layers:  # the same quantized weights Q(W + s B A), bit for bit
        torch.testing.assert_close(quant.dequantize(layer.weight),
                                   quant.dequantize(deployed[name].weight), rtol=0, atol=0)
    with torch.no_grad():  # same weights, same kernels: identical logits
        torch.testing.assert_close(rebuilt(**token_ids()).logits, dep.model(**token_ids()).logits,
                                   rtol=0, atol=0)


def test_rebuild_recorded_qlora_puts_the_adapter_on_the_quantized_base(tmp_path):
    model, adapter = _trained_like("qlora", "nf4", tmp_path)
    rebuilt = strategy_named("qlora").rebuild_recorded(tiny_llama(), adapter, "nf4").eval()
    body = [n for n, m in lora_modules(rebuilt) if quant.is_quantized_tensor(m.base.weight)]
    # every adapted projection (7 per layer x 2) sits on NF4 weights; the tied head stays float
    assert len(body) == len(lora_modules(rebuilt)) - 1 == 14 and "lm_head" not in body
    with torch.no_grad():  # Q(W) + s B A, as trained: identical logits
        torch.testing.assert_close(rebuilt(**token_ids()).logits,
                                   model.eval()(**token_ids()).logits, rtol=0, atol=0)
    with pytest.raises(UserError, match="re-run"):
        strategy_named("qlora").rebuild_recorded(tiny_llama(), adapter, None)


def test_float_export_of_a_gpt2_qlora_model_loads_back_with_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2()
    _strategy("qlora", "int8").prepare_base(model)  # Conv1D -> Linear, then int8 weights
    apply_lora(model, LoRAConfig(rank=2, targets="qv"))
    randomise_adapters(model)
    with torch.no_grad():
        ref = model.eval()(**token_ids()).logits
    exported, note = strategy_named("qlora").float_export(model, "int8")
    assert "dequant(Q(W)) + s B A" in note
    assert sum(isinstance(m, Conv1D) for m in exported.modules()) == 8
    exported.save_pretrained(tmp_path / "merged")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():  # fp32 rounding of the merged sums only, as above
        torch.testing.assert_close(back(**token_ids()).logits, ref, rtol=1e-5, atol=1e-5)
    _, note = strategy_named("qat-lora").float_export(tiny_llama(), "int8-dyn")
    assert "activations" in note
