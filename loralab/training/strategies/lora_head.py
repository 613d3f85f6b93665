"""`lora-head`: LoRA first, then the adapters frozen and the head alone for the last
`head_epochs` epochs.

Steps 1..head_start train the adapters (+ the whole head for `classify`), the remaining ones
the head only, with the body under no_grad. Both phases share one AdamW and one schedule: every
parameter that may ever train is in the optimizer, which skips those without a gradient.
FLOPs per token mix the two rules by the phases' shares of the steps, f (4 N + 6 A) +
(1 - f) (2 N + 4 N_head)."""

from __future__ import annotations

from torch import nn

from loralab.costs import measure
from loralab.lora.inject import lora_parameters
from loralab.models.heads import head_parameters, task_head_modules
from loralab.training.strategies.head import untie_for_head
from loralab.training.strategies.lora import LoRA

LORA_PHASE = "lora"
HEAD_PHASE = "head"


class LoRAThenHead(LoRA):
    """LoRA, then the head alone (phases `lora` and `head`)."""

    def prepare_base(self, model: nn.Module) -> list[str]:
        return untie_for_head(model, self.config)

    def make_trainable(self, model: nn.Module) -> None:
        super().make_trainable(model)
        for p in head_parameters(model):  # in the optimizer from the start
            p.requires_grad_(True)

    def head_phase_words(self) -> str:
        return " (in the head phase)" if self.config.task != "classify" else ""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = super().trainable_parameters(model)
        seen = {id(p) for p in params}
        return params + [p for p in list(lora_parameters(model)) + head_parameters(model)
                         if id(p) not in seen]

    def head_start(self, total_steps: int, steps_per_epoch: int) -> int:
        head_steps = min(total_steps - 1, round(self.config.head_epochs * steps_per_epoch))
        return total_steps - max(1, head_steps)

    def phase_note(self, head_start: int, total_steps: int) -> str | None:
        return (f"lora-head: LoRA for steps 1-{head_start}, head only for "
                f"{head_start + 1}-{total_steps}")

    def phase_at(self, step: int, head_start: int) -> str:
        return HEAD_PHASE if step >= head_start else LORA_PHASE

    def set_phase(self, model: nn.Module, phase: str) -> None:
        """`lora` trains adapters (+ the whole head for classify), `head` the head only."""
        for p in lora_parameters(model):
            p.requires_grad_(phase == LORA_PHASE)
        for p in head_parameters(model):
            p.requires_grad_(phase == HEAD_PHASE or self.config.task == "classify")

    def body_frozen(self, phase: str) -> bool:
        return phase == HEAD_PHASE

    def no_grad_heads(self, model: nn.Module) -> list[nn.Module]:
        return list(task_head_modules(model).values())

    def flops_formula(self, n_matmul: int, *, lora_params: int = 0, head_params: int = 0,
                      lora_fraction: float = 1.0) -> tuple[str, float]:
        """f (4 N + 6 A) + (1 - f) (2 N + 4 N_head), f = `lora_fraction`."""
        lora = measure.flops_formula(n_matmul, lora_params=lora_params, head_params=head_params)
        head = measure.flops_formula(n_matmul, body_backward=False, lora_params=lora_params,
                                     head_params=head_params)
        return measure.mixed_flops_formula(
            [(lora_fraction, *lora), (1 - lora_fraction, *head)],
            "the LoRA and head-only shares of the steps")

