"""Model surgery for LoRA: insert adapters (`apply_lora`), find them, merge them into the base
weights and remove them (`merge_lora`).

All functions take the model and change it in place (returning it for chaining); none keeps
state. Freezing is by object: `requires_grad_(False)` on the whole model, then the new adapter
parameters (and, with `train_head`, the task head's modules) are the trainable ones.
"""

from __future__ import annotations

from torch import nn

from loralab.errors import UserError
from loralab.lora.config import LoRAConfig
from loralab.lora.init import initialise_model
from loralab.lora.layer import LoRALinear
from loralab.lora.targets import Target, in_out_features, resolve_targets
from loralab.models.heads import task_head_modules
from loralab.models.surgery import set_submodule, untie_weight


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The adapted layers with their module names (the base model's names, without `.base`)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A and B (and DoRA's magnitude) of every adapted layer, in the model's order."""
    return [p for _, m in lora_modules(model) for p in m.adapter_parameters()]


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The task head's modules (`loralab.models.heads.task_head_modules`): what `train_head`
    trains fully and PEFT's `modules_to_save` names, e.g. DistilBERT's pre_classifier +
    classifier."""
    return list(task_head_modules(model).items())


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Insert adapters into `model` (in place) and return it.

    Every base parameter is frozen; only the adapters (and the head, with `train_head`) train.
    Freezing is by object: `requires_grad_(False)` on the model, then on the new parameters.
    With `init` pissa / olora the adapted base weights become residuals W - s B0 A0
    (`loralab.lora.init`); the outputs are unchanged until A, B train.
    """
    if has_lora(model):
        raise UserError("model already has LoRA adapters; merge_lora() or start from a fresh model")
    targets: list[Target] = resolve_targets(model, config.targets)
    heads = head_modules(model) if config.train_head else []
    clash = [t.name for t in targets for h, _ in heads
             if t.name == h or t.name.startswith(h + ".")]
    if clash:
        raise UserError(f"{clash[0]} is both a LoRA target and part of the fully trained head; "
                        "use preset 'attn-proj-ffn' with train_head, or 'all' without it")
    model.requires_grad_(False)
    layers = []
    for target in targets:
        base = model.get_submodule(target.name)
        layer = LoRALinear(base, config.rank, config.scale, config.dropout, target.slices,
                           "gaussian" if config.init == "gaussian" else "kaiming",
                           dora=config.dora)
        set_submodule(model, target.name, layer)
        layers.append(layer)
    initialise_model(model, layers, config.init, config.svd_niter)  # PiSSA / OLoRA
    for _, head in heads:
        for module in head.modules():  # a tied lm_head gets its own weight before it trains
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                untie_weight(model, module)
        head.requires_grad_(True)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """W += s B A in every adapted layer, keeping the adapters (so `unmerge_adapters` can undo
    it). A head whose weight is tied to the embeddings is untied first."""
    for _, layer in lora_modules(model):
        if not layer.merged:
            untie_weight(model, layer.base)
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """W -= s B A in every merged layer."""
    for _, layer in lora_modules(model):
        layer.unmerge()
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the adapters: the result is the plain
    transformers model (same classes and parameter names), ready for `save_pretrained`."""
    merge_adapters(model)
    for name, layer in lora_modules(model):
        set_submodule(model, name, layer.base)
    return model


def describe_targets(model: nn.Module, config: LoRAConfig) -> list[dict]:
    """One row per module `config` would adapt: name, kind, shape, slices, LoRA parameters
    r (d_in + d_out_j) summed over its slices. Does not change the model."""
    rows = []
    for target in resolve_targets(model, config.targets):
        module = model.get_submodule(target.name)
        d_in, d_out = in_out_features(module)
        slices = target.slices or ((0, d_out),)
        params = sum(config.rank * (d_in + hi - lo) for lo, hi in slices)
        rows.append({"name": target.name, "kind": type(module).__name__, "d_in": d_in,
                     "d_out": d_out, "slices": [list(s) for s in slices] if target.slices else None,
                     "lora_params": params})
    return rows
