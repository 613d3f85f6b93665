"""Regional `torch.compile` of a transformer's repeated blocks, and when it is worth it.

Why compile: in a LoRA step the matmuls are the same work in any framework; what differs is the
rest — RMSNorm/LayerNorm, rotary embeddings, SiLU x up, softmax scaling, residual adds, the LoRA
dropout and scaling — dozens of elementwise passes over (tokens x width) tensors per block, each
a separate kernel reading and writing memory in eager PyTorch. Inductor fuses them into a few
loops and its partitioner stores fewer intermediates for backward, so compiled blocks are much
leaner and slightly faster.

Why regional (per block, not the whole model): the N decoder blocks run the same code, and with
dynamo's inlined nn.Modules (the default) the parameters are graph inputs, so one compiled
forward/backward serves every block: compile time is that of one block, not of N, and the
model's state_dict keys stay unchanged (no `_orig_mod.` prefix), so checkpoints, adapters and
DDP are unaffected. The fused cross-entropy head (loralab.kernels.losses) stays eager.

Compile time is paid once per process and graph (train mode with grad, and again for the
no-grad evaluation graph; inductor's on-disk cache makes later processes much cheaper), so
`auto` compiles only runs with enough work to win it back; the record reports the first step's
seconds either way (`costs.first_step_seconds`).
"""

from __future__ import annotations

from torch import nn

COMPILE_SETTINGS = ("auto", "on", "off")

AUTO_MIN_FLOPS = 3e14
"""`auto` compiles runs whose training work, estimated as 6 x parameters x tokens (the dense
forward + backward count), is at least this (300 TFLOP). Compile time hardly depends on the
model (one block is compiled), while the gain per step grows with the work per step: compiled
steps are a few percent faster and keep much less for backward, while a cold compile costs
tens of seconds (figures in BENCHMARKS.md), so hundreds of SmolLM2-sized steps are needed to
pay it back in time. A 20-step study run or a small MiniLM classifier stays eager;
`--compile on` buys the memory saving at any length."""


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's stack of identical blocks: the largest `nn.ModuleList` (by parameters) whose
    entries all have one class (decoder layers of GPT-2/LLaMA, encoder layers of BERT)."""
    best: list[nn.Module] = []
    best_size = -1
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(block) for block in module}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = list(module), size
    return best


def compile_blocks(model: nn.Module, *, backend: str = "inductor",
                   dynamic: bool | None = None) -> int:
    """Compile each repeated block in place (`nn.Module.compile`); returns how many.

    Compilation itself is lazy: it happens at the first forward/backward of each graph.
    """
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(backend=backend, dynamic=dynamic)
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> int:
    """Undo `compile_blocks`: the blocks run eagerly again (used after training, so decoding
    with a growing KV cache does not trigger a recompile per length). Returns how many."""
    n = 0
    for block in repeated_blocks(model):
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None  # what nn.Module.compile set; None = eager again
            n += 1
    return n


def should_compile(setting: str, *, trains: bool, total_steps: int, tokens_per_step: int = 0,
                   params: int = 0) -> tuple[bool, str]:
    """(compile?, why) for a run: never when nothing `trains`; `on`/`off` as asked; `auto`
    compiles runs whose estimated work 6 * params * tokens_per_step * total_steps reaches
    AUTO_MIN_FLOPS. Raises ValueError for a setting not in COMPILE_SETTINGS."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile must be one of {COMPILE_SETTINGS}, got {setting!r}")
    if not trains:
        return False, "not compiled: nothing trains"
    if setting == "on":
        return True, "blocks compiled with torch.compile (--compile on)"
    if setting == "off":
        return False, "not compiled (--compile off)"
    work = 6.0 * params * tokens_per_step * total_steps
    if work >= AUTO_MIN_FLOPS:
        return True, (f"blocks compiled with torch.compile (~{work / 1e12:.0f} TFLOP of training "
                      "pays back the compile time)")
    return False, (f"not compiled: ~{work / 1e12:.1f} TFLOP of training is too little to win "
                   "back the compile time (--compile on forces it)")
