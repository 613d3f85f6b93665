"""Where a run's processes stand (single process, DDP, FSDP) and the collectives it needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loralab.costs import measure
from loralab.training.batching import epoch_order, target_count  # noqa: F401  (epoch_order re-exported)
from loralab.training.config import TrainConfig


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo
    on CPU. Each process uses GPU `LOCAL_RANK` when GPUs exist."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank=rank, world=world, device=device)


def _all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _parallel_mode(config: TrainConfig, d: Dist) -> str:
    """single (one process), eval (method none), fsdp (full fine-tuning unless --parallel
    ddp) or ddp."""
    if d.world == 1:
        return "single"
    if config.method == "none":
        return "eval"
    if config.method == "full" and config.parallel in ("auto", "fsdp"):
        return "fsdp"
    return "ddp"


class _FSDPRoot(nn.Module):
    """The module FSDP shards last (the root): one forward for both uses, so every call runs
    the root's hooks, which all-gather what no block owns (embeddings, final norm, the tied
    lm_head) before the call and reduce-scatter its gradients after backward.

    forward(input_ids, attention_mask, labels) -> the fused loss (training, causal LMs);
    forward(input_ids=..., attention_mask=...) -> the model's output (evaluation, or training
    without the fused loss).
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.__dict__["loss"] = loss  # shares self.model: kept out of the module tree

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        if labels is not None and self.loss is not None:
            return self.loss(input_ids, attention_mask, labels)
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one: transformers' `_no_split_modules`
    classes (GPT2Block, LlamaDecoderLayer, BertLayer, ...), else the children of the largest
    ModuleList. A module holding a tied parameter (BertEmbeddings, whose word embeddings a
    masked-LM head shares) is left to the root group, so the tied pair stays one parameter in
    one group."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return [b for b in blocks if not any(id(p) in tied for p in b.parameters())]


def _shard(model: nn.Module, step_module: nn.Module, d: Dist) -> nn.Module:
    """FSDP2 in place: `fully_shard` each block, then the root `_FSDPRoot(model, loss)`.

    Each parameter becomes a DTensor holding this rank's rows (dim-0 shard, padded). A block's
    weights are all-gathered just before its forward and freed after it (gathered again for
    backward); its gradients are reduce-scattered (averaged over the N ranks, as DDP does).
    The rest (embeddings, final norm, lm_head) belongs to the root group, so a tied
    embedding/lm_head pair is one parameter in one group: gathered once, its two gradient
    contributions summed before one reduce-scatter.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    root = _FSDPRoot(model, step_module if step_module is not model else None)
    fully_shard(root, mesh=mesh)
    return root


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None
                ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """FSDP: the whole model state dict and optimizer state gathered to rank 0's CPU (empty on
    the other ranks; every rank must call it). Tied names share one tensor, and the optimizer
    state is given in `optimizer.state_dict()`'s layout, so the checkpoint is the one a
    single-process run writes."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tensors = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options) \
        if optimizer is not None else None
    if not tensors:
        return {}, None
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in tensors:
            tensors[name] = tensors[first[id(p)]]
        first.setdefault(id(p), name)
    if optim is not None:
        index = {n: i for i, n in enumerate(_optimizer_names(model, optimizer))}
        optim = {"state": {index[n]: v for n, v in sorted(optim["state"].items(),
                                                          key=lambda kv: index[kv[0]])},
                 "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                  for g in optim["param_groups"]]}
    return tensors, optim


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _set_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    tensors: dict[str, torch.Tensor], optim: dict | None) -> None:
    """FSDP: load a whole state dict (and `optimizer.state_dict()`-layout optimizer state)
    that every rank has read; each rank keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, dict(tensors), options=options)
    if optimizer is not None and optim is not None:
        names = _optimizer_names(model, optimizer)
        by_name = {"state": {names[i]: dict(v) for i, v in optim["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in optim["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _skip_gathered(root: nn.Module, tracker: measure.SavedTensorTracker) -> None:
    """FSDP: the all-gathered weights autograd saves in a forward are parameters (FSDP frees
    them after the forward and gathers them again for backward), not activations. A pre-forward
    hook on each FSDP module, run after FSDP's own (which gathers), adds their storages to the
    tracker's skip set; the root's hook, first in every forward, starts the set afresh."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    base = set(tracker.skip)

    def gathered(module: nn.Module) -> set[int]:
        return {p.untyped_storage().data_ptr() for p in module.parameters()
                if not isinstance(p, DTensor)}

    def root_hook(module: nn.Module, args: Any) -> None:
        tracker.skip = base | gathered(module)

    def block_hook(module: nn.Module, args: Any) -> None:
        tracker.skip |= gathered(module)

    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.register_forward_pre_hook(root_hook if m is root else block_hook)


def _local_view(model: nn.Module, optimizer: torch.optim.Optimizer | None
                ) -> tuple[nn.Module, Any]:
    """FSDP: this rank's shards as plain tensors (parameters with their gradient shards, the
    optimizer state), for loralab.costs.measure's byte counts: what this process holds."""
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    def local(t: Any) -> Any:
        return t.to_local() if isinstance(t, DTensor) else t

    view = nn.Module()
    view.shards = nn.ParameterList()
    for p in model.parameters():
        q = nn.Parameter(local(p).detach(), requires_grad=p.requires_grad)
        q.grad = local(p.grad).detach() if p.grad is not None else None
        view.shards.append(q)
    for i, b in enumerate(model.buffers()):
        view.register_buffer(f"b{i}", local(b))
    state = {k: {n: local(v) for n, v in s.items()} for k, s in optimizer.state.items()} \
        if optimizer is not None else {}
    return view, SimpleNamespace(state=state)


def _wrap(model: nn.Module, config: TrainConfig, d: Dist, mode: str = "ddp"
          ) -> tuple[nn.Module, str]:
    """DDP when distributed; the model itself otherwise (or the FSDP root, already sharded by
    `_shard`)."""
    if d.world == 1:
        return model, "single"
    if mode == "fsdp":
        return model, "fsdp"
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(model, device_ids=ids), "ddp"
