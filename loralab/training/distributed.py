"""How a run is spread over processes: one `Distribution` object the loop talks to.

The loop never asks which backend runs; it calls the object `distribution_for(config)` picks
(in the spirit of litgpt's Fabric-based `fit()`):

    SingleProcess  one process (`torchrun` not used, or WORLD_SIZE=1)
    EvalOnly       nothing trains (method `none`): no wrapping; rank 0 evaluates and writes
    DDP            every rank holds the whole model; gradients are all-reduced (averaged over
                   the N ranks) once per optimizer step, `no_sync` on the other micro-batches
    FSDP           FSDP2 `fully_shard` (strategies whose spec is `shardable`, i.e. full
                   fine-tuning, with `parallel` auto or fsdp): each transformer block, then a
                   root holding the rest, sharded along dim 0, so a rank holds 1/N of the
                   weights, gradients and AdamW state

What differs between them, and so lives here: wrapping or sharding the module a training forward
calls, the per-micro-batch gradient-sync context, the gradient norm over shards, the all-reduce
of the step loss, barriers, gathering the whole state for a checkpoint and restoring it, which
module evaluation calls, which ranks evaluate and write, and which storages the saved-tensor
tracker skips. Processes join through `torchrun --nproc-per-node N` (gloo on CPU, NCCL on GPU),
on one machine or several (`--nnodes M`: global rank 0 alone writes the run directory, which
must be on storage every node reads, `check_shared`; each process uses GPU `LOCAL_RANK`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as tdist
from torch import nn

from loralab.costs import measure
from loralab.errors import UserError
from loralab.training.config import TrainConfig
from loralab.training.strategies.registry import get_spec

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import OptimizerStateType
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

StateDicts = tuple[dict[str, torch.Tensor], dict | None]
"""(model tensors, optimizer state in `optimizer.state_dict()`'s layout or None)."""

SHARED_WAIT_SECONDS = 120.0
"""How long a process waits to see a file rank 0 wrote before `check_shared` fails: NFS
clients cache a name's absence for up to `acdirmax` (60 s by default), so a shared file may
appear late on another node; a node with its own disk never sees it."""


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo")
    rank = tdist.get_rank() if world > 1 else 0
    return Dist(rank=rank, world=world, device=device)


def parallel_mode(config: TrainConfig, d: Dist) -> str:
    """single (one process), eval (method none), fsdp (a shardable method, i.e. full
    fine-tuning, unless --parallel ddp) or ddp."""
    if d.world == 1:
        return "single"
    spec = get_spec(config.method)
    if not spec.trains:
        return "eval"
    if spec.shardable and config.parallel in ("auto", "fsdp"):
        return "fsdp"
    return "ddp"


# --- the object the loop uses ------------------------------------------------------------------

class Distribution:
    """Single-process behaviour; the subclasses change what differs under DDP and FSDP.

    `name` is what the record's `env.parallel` says. Collectives (`barrier`, `all_reduce_sum`)
    are no-ops in one process and real in a process group of any backend.
    """

    name = "single"
    allows_compile = True
    """Whether regional compilation may be used (FSDP runs eager here)."""

    def __init__(self, dist: Dist) -> None:
        self.dist = dist

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def main(self) -> bool:
        """This process logs and writes (records, checkpoints, artefacts)."""
        return self.dist.main

    @property
    def evaluates(self) -> bool:
        """This process runs the evaluation forwards (FSDP: every rank; else rank 0 only)."""
        return self.dist.main

    # set-up
    def prepare(self, model: nn.Module, step_module: nn.Module) -> nn.Module:
        """The module a training forward calls, before the optimizer is made (FSDP shards the
        parameters here, so the optimizer must hold the sharded ones)."""
        return step_module

    def wrap(self, step_module: nn.Module) -> nn.Module:
        """The prepared module ready for training steps (DDP wraps it). Call again when the set
        of trainable parameters changes: DDP registers it at construction."""
        return step_module

    def eval_module(self, model: nn.Module, prepared: nn.Module) -> nn.Module:
        """What evaluation calls: the model (FSDP: the sharded root, whose hooks gather)."""
        return model

    def saved_tensor_tracker(self, model: nn.Module,
                             prepared: nn.Module) -> measure.SavedTensorTracker:
        """A tracker of activation bytes that skips the storages of this rank's parameters."""
        return measure.SavedTensorTracker(skip=measure.storage_pointers(model.parameters()))

    # one optimizer step
    def micro_batch_sync(self, wrapped: nn.Module, last: bool) -> AbstractContextManager:
        """The context of one micro-batch's forward and backward: gradients are synchronised
        across ranks only at the step's `last` micro-batch."""
        return nullcontext()

    def full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The global gradient norm from what `clip_grad_norm_` returned."""
        return norm

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over all ranks in place (and return it)."""
        if self.world > 1:
            tdist.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def check_shared(self, path: Path, wait: float | None = None) -> None:
        """Check that every process reads `path`, a file rank 0 wrote before the call (every
        rank must call it): the run directory is on storage all nodes share. Only rank 0
        writes the run directory, but every process reads its checkpoints on resume and,
        under FSDP, the best checkpoint; with a directory per node the other nodes would
        resume nothing, or restore nothing while rank 0 restores, and train or evaluate a
        different model without an error. A process that does not see `path` polls for up to
        `wait` seconds (`SHARED_WAIT_SECONDS` when None). Raises UserError on every rank
        when some process cannot see it; a no-op in one process."""
        if self.world == 1:
            return
        self.barrier()  # rank 0's write is done
        wait = SHARED_WAIT_SECONDS if wait is None else wait
        deadline = time.monotonic() + wait
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        missing = torch.tensor([0 if path.exists() else 1], device=self.device)
        tdist.all_reduce(missing)
        if int(missing.item()):
            raise UserError(
                f"{int(missing.item())} of {self.world} processes cannot read {path}, which rank "
                f"0 wrote: put the run directory (--out) on storage every node sees (NFS, "
                "Lustre, ...), since all processes read its checkpoints")

    # checkpoints
    def gather_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     trained_state: Callable[[nn.Module], dict[str, torch.Tensor]]
                     ) -> StateDicts | None:
        """What a checkpoint stores: `trained_state(model)` and the optimizer state, on the
        writing process; None elsewhere. Every rank must call it (FSDP gathers)."""
        if not self.main:
            return None
        return trained_state(model), optimizer.state_dict() if optimizer is not None else None

    def restore_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      tensors: dict[str, torch.Tensor], optim: dict | None,
                      load_trained: Callable[[nn.Module, dict[str, torch.Tensor]], None]
                      ) -> None:
        """Load a checkpoint's tensors (and optimizer state, when both are given)."""
        load_trained(model, tensors)
        if optimizer is not None and optim is not None:
            optimizer.load_state_dict(optim)

    def whole_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole state dict to save the final model from, when the parameters are shards
        (FSDP; collective); None: the model's own tensors are whole."""
        return None

    def local_view(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                   ) -> tuple[nn.Module, Any]:
        """(module, optimizer) whose tensors are what this process holds, for byte counts."""
        return model, optimizer


class SingleProcess(Distribution):
    """One process: nothing wrapped, nothing communicated."""

    name = "single"


class EvalOnly(Distribution):
    """Nothing trains (`none`): no wrapping; rank 0 evaluates and writes, the others wait."""

    name = "eval"


class DDP(Distribution):
    """DistributedDataParallel: whole model per rank, one gradient all-reduce per step."""

    name = "ddp"

    def wrap(self, step_module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(step_module, device_ids=ids)

    def micro_batch_sync(self, wrapped: nn.Module, last: bool) -> AbstractContextManager:
        return nullcontext() if last else cast("DistributedDataParallel", wrapped).no_sync()


class FSDP(Distribution):
    """FSDP2: parameters, gradients and optimizer state sharded along dim 0 over the ranks.

    A block's weights are all-gathered for its forward and again for its backward; gradients
    are reduce-scattered at the last micro-batch of a step (`set_requires_gradient_sync`).
    Evaluation runs the sharded forward on every rank; only rank 0 logs and writes.
    Checkpoints gather whole tensors to rank 0's CPU (full_state_dict + cpu_offload) in the
    single-process layout (a run stopped under FSDP can finish in one process); on resume and
    for the best-checkpoint restore every rank reads the file (a filesystem all ranks see) and
    keeps its shards. Limits: a gathered checkpoint must fit in rank 0's CPU memory; no CPU
    offload of parameters, no mixed-precision policy beyond bf16 autocast, no hybrid (HSDP)
    sharding; memory figures are per process (this rank's shards).
    """

    name = "fsdp"
    allows_compile = False

    @property
    def evaluates(self) -> bool:
        return True

    def prepare(self, model: nn.Module, step_module: nn.Module) -> nn.Module:
        return shard(model, step_module, self.dist)

    def wrap(self, step_module: nn.Module) -> nn.Module:
        return step_module

    def eval_module(self, model: nn.Module, prepared: nn.Module) -> nn.Module:
        return prepared

    def saved_tensor_tracker(self, model: nn.Module,
                             prepared: nn.Module) -> measure.SavedTensorTracker:
        tracker = measure.SavedTensorTracker(
            skip=measure.storage_pointers(local_view(model, None)[0].parameters()))
        skip_gathered(prepared, tracker)
        return tracker

    def micro_batch_sync(self, wrapped: nn.Module, last: bool) -> AbstractContextManager:
        # no reduce-scatter until the last micro-batch
        cast("FSDPModule", wrapped).set_requires_gradient_sync(last)
        return nullcontext()

    def full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor

    def gather_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     trained_state: Callable[[nn.Module], dict[str, torch.Tensor]]
                     ) -> StateDicts | None:
        state = full_state(model, optimizer)  # collective: rank 0 gets the whole tensors
        return state if self.main else None

    def restore_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      tensors: dict[str, torch.Tensor], optim: dict | None,
                      load_trained: Callable[[nn.Module, dict[str, torch.Tensor]], None]
                      ) -> None:
        set_full_state(model, optimizer, tensors, optim)

    def whole_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return full_state(model, None)[0]

    def local_view(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                   ) -> tuple[nn.Module, Any]:
        return local_view(model, optimizer)


_KINDS: dict[str, type[Distribution]] = {"single": SingleProcess, "eval": EvalOnly,
                                         "ddp": DDP, "fsdp": FSDP}


def distribution_for(config: TrainConfig, dist: Dist | None = None) -> Distribution:
    """The distribution of a run of `config` from this process's place in the job (joined
    from the torchrun environment by `setup_distributed` when `dist` is None). A method that
    trains nothing is `EvalOnly` in any world size. Raises UserError when the batch cannot be
    split evenly over the processes."""
    dist = dist if dist is not None else setup_distributed()
    if config.batch_size % dist.world:
        raise UserError(f"batch_size {config.batch_size} is not divisible by the {dist.world} "
                        "processes; choose a multiple so every process gets an equal share")
    mode = "eval" if not get_spec(config.method).trains else parallel_mode(config, dist)
    return _KINDS[mode](dist)


# --- FSDP2 pieces ------------------------------------------------------------------------------

class FSDPRoot(nn.Module):
    """The module FSDP shards last (the root): one forward for both uses, so every call runs
    the root's hooks, which all-gather what no block owns (embeddings, final norm, the tied
    lm_head) before the call and reduce-scatter its gradients after backward.

    forward(input_ids, attention_mask, labels) -> the fused loss (training, causal LMs);
    forward(input_ids=..., attention_mask=...) -> the model's output (evaluation, or training
    without the fused loss).
    """

    loss: nn.Module | None  # in __dict__, not a submodule (see __init__)

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
        if lists:
            largest = max(lists, key=len)
            blocks = list(largest)
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return [b for b in blocks if not any(id(p) in tied for p in b.parameters())]


def shard(model: nn.Module, step_module: nn.Module, d: Dist) -> FSDPRoot:
    """FSDP2 in place: `fully_shard` each block, then the root `FSDPRoot(model, loss)`.

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
    root = FSDPRoot(model, step_module if step_module is not model else None)
    fully_shard(root, mesh=mesh)
    return root


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> StateDicts:
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
    # full_state_dict: whole tensors (no DTensor shards) keyed by parameter/buffer name
    tensors = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
    optim: dict[str, Any] | None = get_optimizer_state_dict(model, optimizer, options=options) \
        if optimizer is not None else None
    if not tensors:
        return {}, None
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in tensors:
            tensors[name] = tensors[first[id(p)]]
        first.setdefault(id(p), name)
    if optim is not None and optimizer is not None:
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


def set_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
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
        by_name: OptimizerStateType = {
            "state": {names[i]: dict(v) for i, v in optim["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in optim["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=options)


def skip_gathered(root: nn.Module, tracker: measure.SavedTensorTracker) -> None:
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


def local_view(model: nn.Module, optimizer: torch.optim.Optimizer | None
               ) -> tuple[nn.Module, Any]:
    """FSDP: this rank's shards as plain tensors (parameters with their gradient shards, the
    optimizer state), for loralab.costs.measure's byte counts: what this process holds."""
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

