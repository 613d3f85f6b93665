"""`peft`: Hugging Face PEFT's own implementation (LoRA, IA3, VeRA, LoHa, ...) trained by
loralab's loop, so "loralab LoRA" and "PEFT LoRA" share one budget, data order and set of
measurements (trainable parameters, adapter size on disk, time, tokens/s, peak memory, FLOPs).

The run's `peft` mapping is the PEFT config: `peft.LoraConfig(**mapping)`, or with a `type`
key (`{type: IA3, target_modules: [...]}`) that PEFT type's config class (`IA3Config`,
`VeraConfig`, ...; case and `-` do not matter). Keys the mapping omits come from the run's
fields where the config class has them, so a PEFT row is comparable with a loralab row:

    r <- rank, lora_alpha <- alpha, lora_dropout <- dropout, use_rslora <- rslora,
    use_dora <- dora, init_lora_weights <- init (kaiming: True, gaussian: "gaussian"),
    target_modules <- the preset resolved for the architecture (loralab.lora.targets),
    task_type <- SEQ_CLS (classify) or CAUSAL_LM (lm, generate),
    modules_to_save <- the task head's modules (classify: the head trains fully, as in lora).

GPT-2's preset `qv` adapts two column blocks of the fused `c_attn` in loralab; PEFT adapts the
whole `c_attn` (q, k and v), a wider adapter: a note says so. PEFT's LoRA initialises A with
the same kaiming-uniform law as loralab's but draws more random numbers (it builds A and B as
nn.Linear layers first), so the same seed gives other A matrices and curves that agree in law,
not bit for bit.

Adapters are injected into the run's model in place (`get_peft_model`); the PeftModel wrapper is
kept by this strategy object only to `save_pretrained` the artefact (`adapter`, PEFT's own
format). Checkpoints hold the trainable tensors as for LoRA (adapters and the head's copy),
so resume is bit-identical. A saved run is rebuilt with `PeftModel.from_pretrained`.

Not supported, with a one-line error: AdaLoRA (its rank allocation needs `update_and_allocate`
after every optimizer step and state a checkpoint does not hold), X-LoRA and Poly (they need
extra inputs), prompt-learning types (prompt/prefix/p-tuning add virtual tokens the loop's
losses do not expect) and init pissa/olora (PEFT's conversion for the original base needs the
initial adapter saved before training; use method lora).

Training FLOPs per token: LoRA's formula, 4 N + 6 A, with N the base model's matmul weights
(counted before injection) and A the adapter parameters PEFT trains (head copies excluded).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, ClassVar, cast

from torch import nn

from loralab.costs import measure
from loralab.errors import UserError
from loralab.lora.targets import resolve_targets
from loralab.models.heads import task_head_modules
from loralab.models.surgery import set_submodule
from loralab.training.config import TrainConfig
from loralab.training.strategies.base import Strategy
from loralab.training.strategies.registry import StrategySpec

DEFAULT_TYPE = "LORA"

REFUSED = {
    "ADALORA": "it reallocates ranks with update_and_allocate after every optimizer step and "
               "keeps state a checkpoint does not hold",
    "XLORA": "it mixes several trained LoRA adapters chosen by a classifier",
    "POLY": "it needs task ids with every batch",
    "ADAPTION_PROMPT": "it adds prompt tokens the loop's losses do not expect",
}
"""PEFT types this strategy refuses, and why (prompt-learning types are refused too)."""

def _peft_types() -> dict[str, type]:
    """PEFT type name (upper case: LORA, IA3, VERA, ...) -> its config class, plus the config
    classes' own names (LORACONFIG, ...). Raises UserError when PEFT is not installed."""
    try:
        from peft import PEFT_TYPE_TO_CONFIG_MAPPING
    except ImportError:
        raise UserError("method peft trains Hugging Face PEFT's implementation, which is not "
                        "installed; pip install peft") from None

    types = {str(getattr(k, "value", k)).upper(): v for k, v in
             PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    return types | {cls.__name__.upper(): cls for cls in types.values()}


def peft_type(mapping: dict[str, Any] | None) -> tuple[str, type]:
    """(PEFT type name, its config class) of a `peft` mapping (its `type`, default LoRA).
    Raises UserError naming the key and the fix for an unknown or unsupported type."""
    types = _peft_types()
    from peft.config import PromptLearningConfig

    raw = str((mapping or {}).get("type") or DEFAULT_TYPE)
    name = raw.upper().replace("-", "_")
    if name not in types:
        near = difflib.get_close_matches(name, list(types), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        known = sorted(k for k in types if not k.endswith("CONFIG"))
        raise UserError(f"peft: unknown PEFT type {raw!r} under 'type'{hint}; use one of "
                        f"{', '.join(known)}")
    cls = types[name]
    name = next(k for k, v in types.items() if v is cls and not k.endswith("CONFIG"))
    if name in REFUSED or issubclass(cls, PromptLearningConfig):
        why = REFUSED.get(name, "it adds virtual tokens the loop's losses do not expect")
        raise UserError(f"peft: type {raw!r} is not supported by method peft: {why}; use LoRA, "
                        "IA3, VeRA, LoHa or LoKr")
    return name, cls


def check_mapping(mapping: dict[str, Any] | None) -> tuple[str, type]:
    """Check a `peft` mapping without a model: a known, supported type and only keys its
    config class has. Returns (type name, config class). Raises UserError naming the key."""
    name, cls = peft_type(mapping)
    valid = {f.name for f in dataclasses.fields(cls)} - {"peft_type"}
    for key in mapping or {}:
        if key != "type" and key not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise UserError(f"peft: unknown key {key!r} for {cls.__name__}; {hint}valid keys: "
                            f"{', '.join(sorted(valid))}")
    return name, cls


def _from_run(config: TrainConfig, valid: set[str], name: str) -> dict[str, Any]:
    """The run's LoRA fields as the PEFT keys of `valid` (see the module docstring). Raises
    UserError for a variant the PEFT type cannot express or this strategy does not support."""
    inits: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian"}
    if config.init not in inits:
        raise UserError(f"init {config.init!r} with method peft is not supported (PEFT's "
                        "conversion to the original base needs the initial adapter saved "
                        "before training); use method lora, or init kaiming or gaussian")
    values: dict[str, Any] = {"r": config.rank, "lora_alpha": config.alpha,
                              "lora_dropout": config.dropout, "use_rslora": config.rslora,
                              "use_dora": config.dora, "init_lora_weights": inits[config.init]}
    asked = {"use_rslora": config.rslora, "use_dora": config.dora,
             "init_lora_weights": config.init != "kaiming"}
    for key, on in asked.items():
        if on and key not in valid:
            raise UserError(f"PEFT type {name} has no {key!r}: rslora, dora and init apply to "
                            "PEFT LoRA only; remove them or use type LoRA")
    return {k: v for k, v in values.items() if k in valid}


def peft_config(config: TrainConfig, model: nn.Module) -> tuple[Any, list[str]]:
    """(the PEFT config object of the run, notes). The `peft` mapping wins; keys it omits come
    from the run (module docstring). Raises UserError for a bad mapping (naming the key)."""
    mapping = dict(config.peft or {})
    name, cls = check_mapping(mapping)
    mapping.pop("type", None)
    valid = {f.name for f in dataclasses.fields(cls)}
    notes: list[str] = []
    filled = {k: v for k, v in _from_run(config, valid, name).items() if k not in mapping}
    if "target_modules" in valid and mapping.get("target_modules") is None:
        targets = resolve_targets(model, config.preset)
        filled["target_modules"] = [t.name for t in targets]
        if any(t.slices for t in targets):
            notes.append(f"peft: preset {config.preset!r} adapts column blocks of a fused "
                         "layer in loralab; PEFT adapts the whole layer "
                         f"({', '.join(sorted(t.name for t in targets if t.slices))[:80]})")
    if "feedforward_modules" in valid and mapping.get("feedforward_modules") is None:
        # IA3 scales the input of feed-forward targets, the output of the others; PEFT's
        # per-architecture default names modules that may not be among our targets, and an
        # adapter whose feedforward_modules are not a subset of target_modules cannot load.
        filled["feedforward_modules"] = _feedforward(model, mapping.get(
            "target_modules") or filled.get("target_modules") or [])
    if "task_type" in valid and mapping.get("task_type") is None:
        filled["task_type"] = "SEQ_CLS" if config.task == "classify" else "CAUSAL_LM"
    if ("modules_to_save" in valid and mapping.get("modules_to_save") is None
            and config.task == "classify"):
        filled["modules_to_save"] = list(task_head_modules(model))
    try:
        return cls(**(filled | mapping)), notes
    except (TypeError, ValueError) as exc:
        raise UserError(f"peft: {cls.__name__} refused the mapping: "
                        f"{' '.join(str(exc).split())[:300]}; fix the peft mapping") from None


def _feedforward(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The feed-forward modules among `targets`: those the `attn-proj-ffn` preset adds to
    `attn-proj` (loralab.lora.targets), so IA3's `feedforward_modules` is always a subset of
    its `target_modules`."""
    if isinstance(targets, str):
        return []
    try:
        ffn = ({t.name for t in resolve_targets(model, "attn-proj-ffn")}
               - {t.name for t in resolve_targets(model, "attn-proj")})
    except UserError:  # an architecture without presets: no module is known as feed-forward
        return []
    return [name for name in targets if name in ffn]


def _head_copies(model: nn.Module) -> set[int]:
    """ids of the parameters of PEFT's trained head copies (`ModulesToSaveWrapper`), by object."""
    from peft.utils import ModulesToSaveWrapper

    return {id(p) for m in model.modules() if isinstance(m, ModulesToSaveWrapper)
            for p in m.modules_to_save.parameters()}


class PEFTAdapters(Strategy):
    """PEFT's adapters injected in place into the frozen body (+ the head for classify)."""

    cpu_speedups: ClassVar[bool] = True

    def __init__(self, spec: StrategySpec, config: TrainConfig) -> None:
        super().__init__(spec, config)
        self.wrapper: Any = None
        """The run's PeftModel (it shares every module with the run's model): for saving."""
        self.n_matmul: int | None = None
        """N of the base model before injection (PEFT's A and B are nn.Linear layers too)."""
        self.adapter_params = 0
        """Trainable parameters of the adapters (the head's trained copy excluded)."""
        self.peft_notes: list[str] = []

    def make_trainable(self, model: nn.Module) -> None:
        from peft import get_peft_model

        cfg, notes = peft_config(self.config, model)
        self.n_matmul = measure.matmul_parameters(model)
        model.requires_grad_(False)
        self.wrapper = get_peft_model(model, cfg)  # adapters go into `model` itself
        heads = _head_copies(model)
        self.adapter_params = sum(p.numel() for p in model.parameters()
                                  if p.requires_grad and id(p) not in heads)
        shown = {k: getattr(cfg, k) for k in ("r", "lora_alpha", "target_modules")
                 if getattr(cfg, k, None) is not None}
        if isinstance(shown.get("target_modules"), (set, list, tuple)):
            shown["target_modules"] = ",".join(sorted(shown["target_modules"]))
        self.peft_notes = notes + [f"PEFT {type(cfg).__name__}: " + ", ".join(
            f"{k}={v}" for k, v in shown.items())[:300]]

    def head_note(self, model: nn.Module) -> str | None:
        """The head PEFT trains as a `modules_to_save` copy (classify), else the default note."""
        from peft.utils import ModulesToSaveWrapper

        saved = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        if not saved:
            return super().head_note(model)
        return f"task head trained fully (PEFT modules_to_save copy): {', '.join(saved)}"

    def prepare(self, model: nn.Module, device_type: str = "cpu") -> list[str]:
        notes = super().prepare(model, device_type)
        return notes + self.peft_notes

    def lora_factors(self, model: nn.Module
                     ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """A and B of PEFT's LoRA layers (`peft.tuners.lora.LoraLayer`), by object."""
        from peft.tuners.lora import LoraLayer

        a: list[nn.Parameter] = []
        b: list[nn.Parameter] = []
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for key, lin in module.lora_A.items():
                    a.append(cast(nn.Parameter, lin.weight))
                    b.append(cast(nn.Parameter, module.lora_B[key].weight))
        return a, b

    def save_artifact(self, model: nn.Module, loaded: Any, out: Path,
                      whole: dict | None = None) -> dict:
        """`out/adapter`: PEFT's `save_pretrained` (adapter_config.json + safetensors; the
        model card PEFT also writes is left out, it holds no weights)."""
        artifacts = super().save_artifact(model, loaded, out, whole)
        target = out / "adapter"
        self.wrapper.save_pretrained(str(target))
        (target / "README.md").unlink(missing_ok=True)
        artifacts["adapter"] = str(target)
        return artifacts

    def flops_formula(self, n_matmul: int, *, lora_params: int = 0, head_params: int = 0,
                      lora_fraction: float = 1.0) -> tuple[str, float]:
        """LoRA's 4 N + 6 A with N the base's matmul weights before injection and A the
        adapter parameters PEFT trains (what `make_trainable` counted)."""
        if self.n_matmul is not None:
            n_matmul, lora_params = self.n_matmul, self.adapter_params
        return super().flops_formula(n_matmul, lora_params=lora_params,
                                     head_params=head_params, lora_fraction=lora_fraction)

    def rebuild_recorded(self, model: nn.Module, adapter: str | os.PathLike,
                         scheme_name: str | None) -> nn.Module:
        """`PeftModel.from_pretrained(model, adapter)`: the adapters go into `model` in place."""
        from peft import PeftModel

        PeftModel.from_pretrained(model, str(adapter))
        return model

    def float_export(self, model: nn.Module, scheme_name: str | None
                     ) -> tuple[nn.Module, str | None]:
        """The model with PEFT's adapters merged into their base layers and unwrapped (as
        `merge_and_unload`), the head's trained copy in place of the original; in place."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper

        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                set_submodule(model, name, module.get_base_layer())
            elif isinstance(module, ModulesToSaveWrapper):
                set_submodule(model, name, next(iter(module.modules_to_save.values())))
        return model, None
