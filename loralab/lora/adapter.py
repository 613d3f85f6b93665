"""Adapters on disk in PEFT's format, so PEFT, transformers and vLLM load what loralab trains.

A directory holds `adapter_config.json` (PEFT's `LoraConfig` fields) and
`adapter_model.safetensors` with PEFT's key names:

    base_model.model.<module>.lora_A.weight    (r' x d_in)
    base_model.model.<module>.lora_B.weight    (d_out x r')
    base_model.model.<head>.<param>            (fully trained heads: PEFT's modules_to_save)
    base_model.model.<module>.lora_magnitude_vector   (d_out; DoRA only, with use_dora true)

PEFT has no notion of adapting only some output slices of a fused layer. A GPT-2 `c_attn` adapted
on q and v (rank r each) is therefore written as the equivalent rank-2r update of the whole layer:
A' = [A_q; A_v] and a block-structured B' with zeros on the k rows, with `rank_pattern` and
`alpha_pattern` chosen so PEFT's scale alpha'/r' equals ours. B' A' = the same delta W, so PEFT
computes the same logits. The slices are also recorded in the safetensors metadata, so loralab
reads the adapter back in its compact form. Loading uses safetensors only, never pickle.

PiSSA / OLoRA layers (whose base holds the residual W - s B0 A0) are written converted, as PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` writes them: the rank-2r update
A' = [A; A0], B' = [B, -B0] of the ORIGINAL base, same scale, `init_lora_weights` true
(`loralab.lora.init.converted_factors`). adapter_config.json keeps PEFT's fields only; the
conversion is recorded in the safetensors metadata (`loralab_init`) and a README.md beside it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loralab.errors import UserError
from loralab.lora.init import converted_factors, initial_kind
from loralab.lora.inject import has_lora, head_modules, lora_modules
from loralab.lora.layer import LoRALinear
from loralab.lora.peft_fields import check_lora_config
from loralab.models.heads import head_parameters
from loralab.models.surgery import untie_weight

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"
"""DoRA's magnitude m (d_out,), saved as `base_model.model.<module>.lora_magnitude_vector`."""


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def _head_parts(model: nn.Module) -> tuple[list[tuple[str, nn.Module]],
                                           list[tuple[str, LoRALinear]]]:
    """The task head (`inject.head_modules`) split for saving: (modules stored whole, as
    PEFT's `modules_to_save`; LoRA layers inside the head). A head module without adapters is
    stored whole (DistilBERT: pre_classifier and classifier; RoBERTa: the classifier wrapper).
    Inside one that carries adapters (preset `all`) the adapted layers keep their adapters and
    every other submodule with parameters of its own is stored whole under its full name."""
    whole: list[tuple[str, nn.Module]] = []
    adapted: list[tuple[str, LoRALinear]] = []
    for name, head in head_modules(model):
        subs = [(f"{name}.{s}" if s else name, m) for s, m in head.named_modules()]
        layers = [(n, m) for n, m in subs if isinstance(m, LoRALinear)]
        if not layers:
            whole.append((name, head))
            continue
        adapted += layers
        for full, module in subs:
            if any(full == n or full.startswith(n + ".") for n, _ in layers + whole):
                continue
            if next(module.parameters(recurse=False), None) is not None:
                if any(n.startswith(full + ".") for n, _ in layers):
                    raise UserError(f"head module {full} holds parameters and adapted layers, "
                                    "which PEFT's format cannot store; do not adapt its layers")
                whole.append((full, module))
    return whole, adapted


def _heads_to_save(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Head modules stored with the adapter: trainable ones, and always a classifier's (it is
    freshly initialised for the task, so the adapter is meaningless without all of it)."""
    classify = _task_type(model) == "SEQ_CLS"
    return [(n, m) for n, m in _head_parts(model)[0]
            if classify or any(p.requires_grad for p in m.parameters())]


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT-keyed tensors and the PEFT config dict for the adapters in `model`."""
    layers = lora_modules(model)
    if not layers:
        raise UserError("model has no LoRA adapters to save; call apply_lora() first")
    first = layers[0][1]
    # PiSSA / OLoRA layers are written as their rank-2r update of the original base
    # (loralab.lora.init.converted_factors), as PEFT's conversion writes them
    rank, scale = converted_factors(first)[2], first.scale
    alpha = scale * rank  # the config-level alpha for layers with scale alpha/r
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern, slices_meta = {}, {}, {}
    for name, layer in layers:
        a, b, layer_rank = converted_factors(layer)
        full_rank = a.shape[0]
        if layer.slices != ((0, layer.out_features),):
            b = _block_b(layer, b, layer_rank)
            slices_meta[name] = {"rank": layer_rank, "slices": [list(s) for s in layer.slices]}
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
        if layer.lora_magnitude_vector is not None:  # DoRA's m, under PEFT's key (no .weight)
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = layer.lora_magnitude_vector.detach(
            ).contiguous()
        if full_rank != rank:
            rank_pattern[name] = full_rank
        if not math.isclose(layer.scale * full_rank, alpha, rel_tol=1e-9):
            alpha_pattern[name] = layer.scale * full_rank
    heads = _heads_to_save(model)
    for name, head in heads:
        for pname, param in head.named_parameters():
            tensors[f"{PREFIX}{name}.{pname}"] = param.detach().contiguous()
    task_type = _task_type(model)
    adapted_heads = _head_parts(model)[1]
    if task_type == "SEQ_CLS" and adapted_heads:
        # A LoRA-adapted classifier: its base weights are new for the task, so they are stored
        # as PEFT stores base layers (`.base_layer.`); SEQ_CLS would make PEFT expect the
        # classifier in modules_to_save instead, so the task type is left unset.
        task_type = None
        for name, layer in adapted_heads:
            for pname, param in layer.base.named_parameters():
                tensors[f"{PREFIX}{name}.base_layer.{pname}"] = param.detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout,
        "use_rslora": False,
        "target_modules": [n for n, _ in layers],
        "fan_in_fan_out": any(layer.conv1d for _, layer in layers),
        "bias": "none",
        "modules_to_save": [n for n, _ in heads] or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": _uses_dora(layers),
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    frozen = [n for n, m in heads if not any(p.requires_grad for p in m.parameters())]
    kinds = {n: k for n, layer in layers if (k := initial_kind(layer)) is not None}
    converted = {"init": sorted(set(kinds.values())), "layers": sorted(kinds),
                 "rank": first.rank, "saved_rank": rank} if kinds else None
    return tensors, {"config": config, "slices": slices_meta, "frozen_heads": frozen,
                     "init": converted}


def _block_b(layer: LoRALinear, b: torch.Tensor, rank: int) -> torch.Tensor:
    """The (d_out x k rank) block-structured B' whose product with the stacked A (k rank rows)
    equals the sliced update: rows of slice j use columns j rank .. (j+1) rank, others zero."""
    full = torch.zeros(layer.out_features, len(layer.slices) * rank, dtype=b.dtype,
                       device=b.device)
    row = 0
    for j, (lo, hi) in enumerate(layer.slices):
        full[lo:hi, j * rank:(j + 1) * rank] = b[row:row + hi - lo]
        row += hi - lo
    return full


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapters (and heads to save) to `directory` in PEFT's format, atomically:
    each file is written to a temporary name and renamed, so a crash never leaves a torn file."""
    tensors, meta = adapter_state(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "loralab_slices": json.dumps(meta["slices"]),
                "loralab_frozen_heads": json.dumps(meta["frozen_heads"])}
    if meta["init"] is not None:  # PiSSA / OLoRA, converted: recorded beside PEFT's fields
        metadata["loralab_init"] = json.dumps(meta["init"])
        note = conversion_note(meta["init"])
        _atomic(out / README_NAME, lambda p: Path(p).write_text(note))
    tensors = {k: v.cpu() for k, v in tensors.items()}
    _atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata))
    text = json.dumps(meta["config"], indent=2, sort_keys=True) + "\n"
    _atomic(out / CONFIG_NAME, lambda p: Path(p).write_text(text))
    return out


def conversion_note(init: dict) -> str:
    """The README.md of a converted PiSSA / OLoRA adapter (`adapter_state`'s "init" entry)."""
    kinds = " / ".join(init["init"])
    return (f"# loralab adapter ({kinds} init, converted)\n\n"
            f"Trained with {kinds} initialisation (the base kept the residual W - s B0 A0). "
            f"Saved converted to the equivalent plain LoRA on the ORIGINAL base model: "
            f"A' = [A; A0], B' = [B, -B0], rank {init['rank']} -> {init['saved_rank']} per "
            f"adapted slice, same scale (PEFT's save_pretrained with "
            f"path_initial_model_for_weight_conversion writes the same; init_lora_weights is "
            f"therefore true). Load it on the unmodified base with PeftModel.from_pretrained or "
            f"loralab.load_adapter. Converted layers: {len(init['layers'])}.\n")


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config, tensors, loralab metadata) of an adapter directory, with one-line errors for a
    missing, pickled, corrupt or unsupported adapter."""
    path = Path(directory)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise UserError(f"adapter directory {path} does not exist; give the directory that "
                        f"holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing; an adapter directory needs {CONFIG_NAME}")
    if not weights_path.is_file():
        if (path / "adapter_model.bin").is_file():
            raise UserError(f"{path} holds a pickled adapter_model.bin, which loralab does not "
                            "load (pickle can run code); re-save it with safetensors")
        raise UserError(f"{weights_path} is missing; an adapter directory needs {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc}); re-save the adapter") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA; "
                        "loralab loads LoRA adapters only")
    check_lora_config(config, config_path)  # allow-list of the LoraConfig fields loralab reproduces
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        extra = {"slices": json.loads(metadata.get("loralab_slices", "{}")),
                 "frozen_heads": json.loads(metadata.get("loralab_frozen_heads", "[]")),
                 "init": json.loads(metadata.get("loralab_init", "null"))}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UserError(f"{weights_path} is corrupt or not a safetensors file ({exc}); "
                        "re-save the adapter") from None
    return config, tensors, extra


def _strip(key: str) -> str:
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return key.replace(".default.", ".")


def _pattern_value(pattern: dict[str, float] | None, name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name as a regex on its
    trailing components."""
    import re

    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Insert the adapters saved in `directory` (by loralab or PEFT) into `model` and load their
    weights and any saved heads. The adapters are trainable; everything else is frozen."""
    config, tensors, extra = read_adapter(directory)
    slices = extra["slices"]
    if has_lora(model):
        raise UserError("model already has LoRA adapters; load the adapter into a fresh model")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = _strip(key)
        for part, marker in (("lora_A", ".lora_A.weight"), ("lora_B", ".lora_B.weight"),
                             (MAGNITUDE, f".{MAGNITUDE}"), (MAGNITUDE, f".{MAGNITUDE}.weight")):
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)], {})[part] = tensor
                break
        else:
            if "lora_embedding" in name:
                raise UserError(f"{directory}: tensor {key} is of an adapter kind loralab does "
                                "not support (embedding LoRA); load it with PEFT")
            rest[name] = tensor
    if not pairs:
        raise UserError(f"{directory}: no lora_A/lora_B tensors found; is this a LoRA adapter?")
    modules = dict(model.named_modules())
    model.requires_grad_(False)
    rslora = bool(config.get("use_rslora"))
    dora = bool(config.get("use_dora"))
    for name, pair in sorted(pairs.items()):
        base = modules.get(name)
        if base is None or "lora_A" not in pair or "lora_B" not in pair:
            raise UserError(f"{directory}: adapter module {name} does not fit this "
                            f"{type(model).__name__}; load the adapter into the base model "
                            f"it was trained on ({config.get('base_model_name_or_path')})")
        a, b, magnitude = pair["lora_A"], pair["lora_B"], pair.get(MAGNITUDE)
        if (magnitude is not None) != dora:
            raise UserError(f"{directory}: adapter module {name} has "
                            f"{'no ' if dora else ''}{MAGNITUDE} (DoRA's magnitude) but "
                            f"use_dora is {dora}; re-save the adapter")
        full_rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(full_rank) if rslora else alpha / full_rank
        info = slices.get(name)
        try:
            if info:
                rank, spans = info["rank"], tuple(tuple(s) for s in info["slices"])
                layer = LoRALinear(base, rank, scale, config.get("lora_dropout", 0.0), spans,
                                   dora=dora)
                compact = torch.cat([b[lo:hi, j * rank:(j + 1) * rank]
                                     for j, (lo, hi) in enumerate(spans)])
                _copy(layer, a, compact, magnitude)
            else:
                layer = LoRALinear(base, full_rank, scale, config.get("lora_dropout", 0.0),
                                   dora=dora)
                _copy(layer, a, b, magnitude)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise UserError(f"{directory}: adapter for {name} does not fit this model ({exc}); "
                            "use the base model it was trained on") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    _load_heads(model, rest, config, extra["frozen_heads"], directory)
    return model


def _copy(layer: LoRALinear, a: torch.Tensor, b: torch.Tensor,
          magnitude: torch.Tensor | None = None) -> None:
    """Load A, B (and DoRA's magnitude m into a DoRA layer) after checking their shapes."""
    if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
        raise ValueError(f"shapes A {tuple(a.shape)} B {tuple(b.shape)} vs expected "
                         f"{tuple(layer.lora_A.shape)} {tuple(layer.lora_B.shape)}")
    m = layer.lora_magnitude_vector
    if m is not None and (magnitude is None or magnitude.shape != m.shape):
        raise ValueError(f"DoRA magnitude of shape "
                         f"{None if magnitude is None else tuple(magnitude.shape)} vs expected "
                         f"{tuple(m.shape)}")
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        if m is not None and magnitude is not None:
            m.copy_(magnitude)


def _uses_dora(layers: list[tuple[str, LoRALinear]]) -> bool:
    """PEFT's `use_dora` for the adapters being saved: one switch for all of them, so DoRA and
    plain layers in one model cannot be saved in its format."""
    kinds = {layer.dora for _, layer in layers}
    if len(kinds) > 1:
        raise UserError("the model mixes DoRA and plain LoRA layers, which PEFT's adapter "
                        "format cannot store (use_dora is one switch); adapt all with dora or none")
    return kinds == {True}


def _load_heads(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict,
                frozen_heads: list[str], directory) -> None:
    """Copy the other saved parameters into the model: fully trained heads (PEFT's
    `modules_to_save`, made trainable unless loralab saved them frozen) and base-layer copies
    PEFT writes for tied layers (`<module>.base_layer.weight`, loaded but kept frozen).

    A parameter belongs to `modules_to_save` by PEFT's own rule: its module or an ancestor has a
    name ending with an entry (so `classifier` covers RoBERTa's `classifier.dense`). A
    classifier's head is new for the task, so every parameter of it must be in the adapter:
    otherwise it would stay random and the adapter would not reproduce its run."""
    modules = dict(model.named_modules())
    to_save = config.get("modules_to_save") or []
    written: set[int] = set()
    for key, tensor in tensors.items():
        name, _, pname = key.replace(".modules_to_save.", ".").rpartition(".")
        frozen = name.endswith(".base_layer") or name == "base_layer"
        name = name.removesuffix(".base_layer")
        module = modules.get(name)
        if isinstance(module, LoRALinear):
            module = module.base
        if module is None or not isinstance(getattr(module, pname, None), torch.Tensor):
            raise UserError(f"{directory}: saved tensor {key} has no place in this "
                            f"{type(model).__name__}; use the base model it was trained on")
        if pname == "weight":
            untie_weight(model, module)
        param = getattr(module, pname)
        if param.shape != tensor.shape:
            raise UserError(f"{directory}: saved {key} has shape {tuple(tensor.shape)} but the "
                            f"model's is {tuple(param.shape)}; check num_labels / base model")
        with torch.no_grad():
            param.copy_(tensor)
        written.add(id(param))
        parts = name.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        trained = any(o.endswith(t) for o in owners for t in to_save)
        param.requires_grad_(trained and not frozen and not set(owners) & set(frozen_heads))
    if _task_type(model) == "SEQ_CLS":
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [names[id(p)] for p in head_parameters(model) if id(p) not in written]
        if missing:
            raise UserError(f"{directory}: the adapter holds no {missing[0]}, part of the new "
                            "classification head, which would stay random; save the adapter "
                            "with the whole head (modules_to_save)")
