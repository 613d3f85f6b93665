"""The lean frozen SwiGLU MLP against the plain transformers LlamaMLP (the naive reference)."""

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaMLP

from loralab.kernels.lean_mlp import LeanGeluMLP, LeanSwiGLU, lean_mlps


def _mlp(seed: int = 0) -> LlamaMLP:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=48, intermediate_size=128, hidden_act="silu",
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaMLP(config)


def _saved_bytes(fn, module: nn.Module) -> tuple[torch.Tensor, int]:
    """fn()'s output and the bytes of distinct non-parameter storages autograd keeps for
    backward while it runs (the activations)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_lean_matches_plain_output_and_input_gradient():
    plain = _mlp().requires_grad_(False)
    lean = LeanSwiGLU(plain.gate_proj, plain.up_proj, plain.down_proj)
    x = torch.randn(3, 7, 48, requires_grad=True)
    grad = torch.randn(3, 7, 48)
    assert lean.lean()
    y_ref = plain(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, grad)
    y = lean(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


def test_lean_saves_only_gate_and_up():
    plain = _mlp().requires_grad_(False)
    lean = LeanSwiGLU(plain.gate_proj, plain.up_proj, plain.down_proj)
    x = torch.randn(4, 16, 48, requires_grad=True)
    _, plain_bytes = _saved_bytes(lambda: plain(x), plain)
    _, lean_bytes = _saved_bytes(lambda: lean(x), plain)
    f_bytes = 4 * 16 * 128 * 4                                       # one (tokens, f) fp32
    assert lean_bytes == 2 * f_bytes                                 # g and u
    assert plain_bytes == 3 * f_bytes                                # g, silu(g), u


def test_trainable_weight_falls_back_to_plain_path_with_weight_gradients():
    plain = _mlp()
    lean = LeanSwiGLU(plain.gate_proj, plain.up_proj, plain.down_proj)
    plain.requires_grad_(False)
    plain.up_proj.weight.requires_grad_(True)
    assert not lean.lean()
    x = torch.randn(2, 5, 48)
    lean(x).sum().backward()
    assert plain.up_proj.weight.grad is not None and plain.up_proj.weight.grad.abs().sum() > 0


def test_no_grad_and_bf16_autocast():
    plain = _mlp().requires_grad_(False)
    lean = LeanSwiGLU(plain.gate_proj, plain.up_proj, plain.down_proj)
    x = torch.randn(2, 5, 48, requires_grad=True)
    with torch.no_grad():
        assert not lean.lean()
        torch.testing.assert_close(lean(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = plain(x)
        y = lean(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    (dx,) = torch.autograd.grad(y.float().sum(), x)
    assert dx.dtype == torch.float32 and torch.isfinite(dx).all()


def test_lean_mlps_swaps_llama_mlps_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).requires_grad_(False)
    keys = list(model.state_dict())
    ids = torch.randint(0, 64, (2, 9))
    ref = model(input_ids=ids).logits
    assert lean_mlps(model) == 2
    assert lean_mlps(model) == 0                                     # idempotent
    assert all(isinstance(layer.mlp, LeanSwiGLU) for layer in model.model.layers)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_lora_training_step_matches_plain_mlps():
    """One adapted model with lean MLPs and one without give the same loss and LoRA grads."""
    from loralab.lora.config import LoRAConfig
    from loralab.lora.inject import apply_lora, lora_parameters

    def build(lean: bool):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(config)
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="qv"))
        for p in lora_parameters(model):
            nn.init.normal_(p, std=0.1)
        if lean:
            lean_mlps(model)
        return model

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for lean in (False, True):
        model = build(lean)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in lora_parameters(model)])
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _gpt2(layers: int = 1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def test_gpt2_mlp_lean_matches_gelu_new_and_saves_only_h():
    model = _gpt2().requires_grad_(False).eval()
    plain = model.transformer.h[0].mlp
    x = torch.randn(4, 16, 32, requires_grad=True)
    y_ref, plain_bytes = _saved_bytes(lambda: plain(x), plain)
    assert lean_mlps(model) == 1
    lean = model.transformer.h[0].mlp
    assert isinstance(lean, LeanGeluMLP) and lean.lean()
    y, lean_bytes = _saved_bytes(lambda: lean(x), lean)
    h_bytes = 4 * 16 * 128 * 4
    assert lean_bytes == h_bytes                                 # h only
    assert plain_bytes == 4 * h_bytes                            # gelu_new's intermediates
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-7)   # fused tanh-GELU: rounding
    grad = torch.randn_like(y)
    (dx_ref,) = torch.autograd.grad(y_ref, x, grad)
    (dx,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-7)


def test_gpt2_lora_training_step_and_dropout_fallback():
    """LoRA on c_attn with lean MLPs: same loss and adapter gradients as plain MLPs in eval
    mode (residual dropout off); in train mode the MLP's dropout still applies; an adapted
    c_fc (a LoRA layer, not a Conv1D) takes the plain path."""
    from loralab.lora.config import LoRAConfig
    from loralab.lora.inject import apply_lora, lora_parameters

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for lean in (False, True):
        model = _gpt2(layers=2)
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="qv"))
        for p in lora_parameters(model):
            nn.init.normal_(p, std=0.1)
        if lean:
            assert lean_mlps(model) == 2
        model.eval()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in lora_parameters(model)])
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    model.train()
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 9, 32, requires_grad=True)
    assert (mlp(x) == 0).any()                                   # resid dropout p=0.1
    model = _gpt2()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="attn-proj-ffn"))
    lean_mlps(model)
    assert not model.transformer.h[0].mlp.lean()


def test_gpt2_adapted_mlp_uses_fused_gelu_in_training_and_gelu_new_without_grad():
    """attn-proj-ffn: c_fc and c_proj carry adapters, so the lean function does not apply, but
    a training call still runs the fused tanh-GELU (it saves h, not gelu_new's four tensors):
    same output and adapter gradients up to rounding; a no-grad call is gelu_new bit for bit."""
    import copy

    from loralab.lora.config import LoRAConfig
    from loralab.lora.inject import apply_lora, lora_parameters

    model = _gpt2()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="attn-proj-ffn"))
    for p in lora_parameters(model):
        nn.init.normal_(p, std=0.1)
    model.eval()                                                 # residual dropout off
    plain = model.transformer.h[0].mlp
    lean_model = copy.deepcopy(model)
    assert lean_mlps(lean_model) == 1
    lean = lean_model.transformer.h[0].mlp
    assert not lean.lean()
    x = torch.randn(4, 16, 32, requires_grad=True)
    y_ref, plain_bytes = _saved_bytes(lambda: plain(x), plain)
    y, lean_bytes = _saved_bytes(lambda: lean(x), lean)
    h_bytes = 4 * 16 * 128 * 4
    assert plain_bytes - lean_bytes == 3 * h_bytes               # h kept, three fewer
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)  # |y| < 0.5: 6e-8 measured
    grad = torch.randn_like(y)
    y_ref.backward(grad)
    y.backward(grad)
    ref_grads = [p.grad for p in lora_parameters(plain)]
    lean_grads = [p.grad for p in lora_parameters(lean)]
    assert len(lean_grads) == 4 and all(g is not None for g in lean_grads)
    # adapter gradients (|g| up to ~6) sum 64 tokens x 128 features of products that the fused
    # GELU rounds differently: 1.9e-6 apart at most (measured, also with other GEMM kernels),
    # which an atol of 1e-6 let through only by an element's rtol share; 2e-5 is 10x that
    for a, b in zip(lean_grads, ref_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    with torch.no_grad():
        assert torch.equal(lean(x), plain(x))


def test_full_fine_tuning_gpt2_gets_the_fused_gelu_with_the_same_weight_gradients():
    """The full fine-tuning strategy's prepare installs the lean MLPs; with every weight trainable
    the MLP takes the plain path with the fused GELU, and every weight gradient matches the
    untouched transformers model up to rounding."""
    import copy

    from loralab.training.config import make_config
    from loralab.training.strategies.base import strategy_for

    ref = _gpt2(layers=2).eval()                                 # dropout off on both sides
    model = copy.deepcopy(ref)
    strategy_for(make_config(model="tiny", task="lm", data="synthetic", method="full",
                             out="unused")).prepare(model)
    assert all(isinstance(block.mlp, LeanGeluMLP) and not block.mlp.lean()
               for block in model.transformer.h)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ref.requires_grad_(True)
    losses = [m(input_ids=ids, labels=ids).loss for m in (ref, model)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for loss in losses:
        loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_other_mlps_are_left_alone():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=64))
    assert lean_mlps(model) == 0


def test_hooks_on_a_replaced_mlp_keep_firing_and_stay_removable():
    model = _gpt2()
    calls = []
    handle = model.transformer.h[0].mlp.register_forward_hook(lambda m, a, o: calls.append(1))
    lean_mlps(model)
    ids = torch.randint(0, 64, (1, 5))
    model(input_ids=ids)
    assert calls == [1]
    handle.remove()
    model(input_ids=ids)
    assert calls == [1]
