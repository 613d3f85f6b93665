"""Which modules LoRA adapts: presets per architecture, explicit names and globs.

The presets follow the LoRA paper's ablations (Hu et al. 2021, section 7.1) and the naming used in
later studies:

    qv              Wq, Wv                                   (the paper's default)
    attn            Wq, Wk, Wv                               (LoRA-1)
    attn-proj       + the attention output projection Wo     (LoRA-2)
    attn-proj-ffn   + the feed-forward projections           (LoRA-3)
    all             + every layer of the task head           (LoRA-4)

GPT-2 computes q, k and v with one fused Conv1D (`c_attn`, output = [q | k | v]). Adapting "Wq
and Wv" there means adapting two column blocks of one matrix: a `Target` carries the output
slices to adapt, and the LoRA layer gives each slice its own rank-r pair (A_j, B_j), so the
trainable count stays r (d_in + d_out) per adapted matrix, exactly as for separate projections.

Resolution is pure: `resolve_targets(model, spec)` returns the list of `Target`s without touching
the model, which is what `loralab targets` prints as a dry run.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab.errors import UserError
from loralab.lora.config import PRESETS
from loralab.models.heads import task_head_modules

# Regexes over full module names (`re.search`), per architecture family. Each preset adds to the
# previous one; the head is found separately (see `head_module_names`).
_QKV = {"q": 0, "k": 1, "v": 2}
_FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt2": {
        "qv": (r"\.attn\.c_attn$[q,v]",),
        "attn": (r"\.attn\.c_attn$[q,k,v]",),
        "proj": (r"\.attn\.c_proj$",),
        "ffn": (r"\.mlp\.c_fc$", r"\.mlp\.c_proj$"),
    },
    "llama": {  # also Mistral, Qwen2, Gemma 3, SmolLM2
        "qv": (r"\.self_attn\.q_proj$", r"\.self_attn\.v_proj$"),
        "attn": (r"\.self_attn\.[qkv]_proj$",),
        "proj": (r"\.self_attn\.o_proj$",),
        "ffn": (r"\.mlp\.(gate|up|down)_proj$",),
    },
    "bert": {  # BERT, RoBERTa, MiniLM
        "qv": (r"\.attention\.self\.(query|value)$",),
        "attn": (r"\.attention\.self\.(query|key|value)$",),
        "proj": (r"\.attention\.output\.dense$",),
        "ffn": (r"\.intermediate\.dense$", r"\.layer\.\d+\.output\.dense$"),
    },
    "distilbert": {
        "qv": (r"\.attention\.(q_lin|v_lin)$",),
        "attn": (r"\.attention\.(q_lin|k_lin|v_lin)$",),
        "proj": (r"\.attention\.out_lin$",),
        "ffn": (r"\.ffn\.lin[12]$",),
    },
}
_FAMILY_OF = {
    "gpt2": "gpt2",
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma": "llama", "gemma2": "llama", "gemma3": "llama", "gemma3_text": "llama",
    "bert": "bert", "roberta": "bert",
    "distilbert": "distilbert",
}
_PRESET_PARTS = {
    "qv": ("qv",),
    "attn": ("attn",),
    "attn-proj": ("attn", "proj"),
    "attn-proj-ffn": ("attn", "proj", "ffn"),
    "all": ("attn", "proj", "ffn"),
}


@dataclass(frozen=True)
class Target:
    """One module to adapt.

    `slices` is None to adapt the whole output, or the (start, stop) output ranges to adapt, each
    with its own rank-r pair (GPT-2's fused c_attn: q is (0, d), v is (2d, 3d)).
    """

    name: str
    slices: tuple[tuple[int, int], ...] | None = None


def is_adaptable(module: nn.Module) -> bool:
    """LoRA applies to dense maps: `nn.Linear` and transformers' GPT-2 `Conv1D`."""
    return isinstance(module, (nn.Linear, Conv1D))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an adaptable module; Conv1D stores its weight as (d_in, d_out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = cast(torch.Tensor, module.weight).shape
    return d_in, d_out


def family(model: nn.Module) -> str | None:
    """The preset family of a transformers model (by `config.model_type`), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _FAMILY_OF.get(model_type or "")


def adaptable_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name and is_adaptable(module)]


def head_module_names(model: nn.Module) -> list[str]:
    """The adaptable layers of the task head (`loralab.models.heads.task_head_modules`): every
    Linear / Conv1D inside it, or the LoRA layer wrapping one (named without its `.base`).
    DistilBERT: `pre_classifier`, `classifier`; RoBERTa: `classifier.dense`,
    `classifier.out_proj`; causal LMs: `lm_head`. The `all` preset adapts these; quantization
    leaves them in float."""
    names: list[str] = []
    for head_name, head in task_head_modules(model).items():
        for sub, module in head.named_modules():
            name = f"{head_name}.{sub}" if sub else head_name
            if any(name.startswith(n + ".") for n in names):
                continue  # the base layer inside a LoRA layer already listed
            base = getattr(module, "base", None)
            if is_adaptable(module) or (isinstance(base, nn.Module) and is_adaptable(base)):
                names.append(name)
    return names


def _collapse(names: list[str]) -> list[str]:
    """Collapse per-layer names (`h.0.attn`, `h.1.attn`) to one glob each (`h.*.attn`)."""
    seen: dict[str, None] = {}
    for name in names:
        seen[re.sub(r"\.\d+\.", ".*.", name)] = None
    return list(seen)


def _no_match_error(model: nn.Module, what: str) -> UserError:
    available = ", ".join(_collapse(adaptable_names(model)))
    return UserError(
        f"target {what} matches no adaptable module of {type(model).__name__}; "
        f"adaptable modules are: {available}"
    )


def _fused_slices(module: nn.Module, letters: str, n_heads_groups: int = 3) -> tuple:
    d_out = in_out_features(module)[1]
    size = d_out // n_heads_groups
    return tuple((_QKV[c] * size, (_QKV[c] + 1) * size) for c in letters.split(","))


def _preset_targets(model: nn.Module, preset: str) -> list[Target]:
    fam = family(model)
    if fam is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UserError(
            f"no LoRA presets for model type '{model_type}'; give explicit targets instead "
            f"(module names or globs, e.g. --targets '*.q_proj,*.v_proj')"
        )
    patterns = [p for part in _PRESET_PARTS[preset] for p in _FAMILIES[fam][part]]
    modules = dict(model.named_modules())
    targets: list[Target] = []
    for name, module in modules.items():
        if not name or not is_adaptable(module):
            continue
        for pattern in patterns:
            regex, _, fused = pattern.partition("$[")
            if re.search(regex + "$", name):
                slices = _fused_slices(module, fused.rstrip("]")) if fused else None
                targets.append(Target(name, slices))
                break
    if preset == "all":
        heads, taken = set(head_module_names(model)), {t.name for t in targets}
        targets += [Target(n) for n in modules if n in heads and n not in taken]
    if not targets:
        raise _no_match_error(model, f"preset '{preset}'")
    return targets


def _explicit_targets(model: nn.Module, patterns: tuple[str, ...]) -> list[Target]:
    """Module names or globs: a pattern matches a full name (`fnmatch`) or its last components
    (`q_proj` matches `model.layers.0.self_attn.q_proj`, as in PEFT)."""
    modules = dict(model.named_modules())
    chosen: dict[str, None] = {}
    for pattern in patterns:
        hits = [n for n in modules if n and (fnmatch.fnmatchcase(n, pattern)
                                             or n.endswith("." + pattern))]
        if not hits:
            raise _no_match_error(model, f"'{pattern}'")
        bad = [n for n in hits if not is_adaptable(modules[n])]
        if bad and len(bad) == len(hits):
            kind = type(modules[bad[0]]).__name__
            raise UserError(
                f"target '{pattern}' matches {bad[0]} ({kind}), which LoRA cannot adapt "
                f"(only Linear and Conv1D); choose one of: "
                f"{', '.join(_collapse(adaptable_names(model)))}"
            )
        chosen.update({n: None for n in hits if is_adaptable(modules[n])})
    return [Target(n) for n in modules if n in chosen]  # in the model's order


def resolve_targets(model: nn.Module, targets: str | tuple[str, ...] | list[str]) -> list[Target]:
    """The modules LoRA adapts: a preset name, or module names / globs (a tuple, or one
    comma-separated string). Raises `UserError` listing the adaptable modules if nothing
    matches."""
    if isinstance(targets, str):
        if targets in PRESETS:
            return _preset_targets(model, targets)
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not targets:
        raise UserError(f"no LoRA targets given; use a preset ({', '.join(PRESETS)}) or names")
    return _explicit_targets(model, tuple(targets))
