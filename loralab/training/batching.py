"""Training batches through `torch.utils.data.DataLoader`, in exactly the run's data order.

The order is a pure function of (seed, epoch) (`epoch_order`), so a run resumed mid-epoch
reads the same examples as one that never stopped. `StepBatchSampler` yields the micro-batches
of optimizer steps `[step, total)` in that order: step s of an epoch reads positions
[s G, (s + 1) G) of the epoch's permutation, G = batch_size x grad_accum the global batch, cut
into grad_accum micro-batches of batch_size rows. `StepCollate` turns one micro-batch's rows
into what a training step needs: the step's loss is normalised by the target count of the
*whole* micro-batch (every process computes it, so no communication is needed), while under
DDP/FSDP each process forwards only its slice of batch_size / world rows.

`training_loader` builds the DataLoader: rows are read and collated in `workers` processes
(`loralab.devices.device_defaults`: none on the CPU, some on a GPU host) and pinned for
non-blocking host-to-device copies on CUDA. The loader draws its workers' base seed from its
own generator, never from torch's global one, so creating it leaves the dropout masks (seeded
from the global generator) and hence every number of a run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation seeded by (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def target_count(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Positions that contribute to the loss: shifted non-ignored tokens, or examples."""
    if task == "classify":
        return torch.tensor(labels.shape[0], dtype=torch.float64)
    return (labels[..., 1:] != -100).sum().to(torch.float64)


class StepBatchSampler(Sampler[list[int]]):
    """Row indices of each micro-batch of optimizer steps `[start, start + steps)`, resuming at
    (`epoch`, `step_in_epoch`); an epoch has `steps_per_epoch` steps (the remainder rows of the
    permutation are skipped, as a drop_last loader does)."""

    def __init__(self, n: int, seed: int, batch_size: int, grad_accum: int,
                 steps_per_epoch: int, epoch: int, step_in_epoch: int, steps: int) -> None:
        self.n, self.seed, self.batch_size, self.grad_accum = n, seed, batch_size, grad_accum
        self.steps_per_epoch, self.epoch, self.step_in_epoch = steps_per_epoch, epoch, step_in_epoch
        self.steps = max(0, steps)

    def __len__(self) -> int:
        return self.steps * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        epoch, step_in_epoch = self.epoch, self.step_in_epoch
        global_batch = self.batch_size * self.grad_accum
        order, order_epoch = None, -1
        for _ in range(self.steps):
            if step_in_epoch >= self.steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            if order_epoch != epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            assert order is not None  # set on the first pass: order_epoch starts at -1
            start = step_in_epoch * global_batch
            step_idx = order[start:start + global_batch].tolist()
            for k in range(self.grad_accum):
                yield step_idx[k * self.batch_size:(k + 1) * self.batch_size]
            step_in_epoch += 1


class _Rows(Dataset):
    """Row access by index only: hides a `datasets.Dataset`'s batched `__getitems__`, so the
    loader reads `rows[i]` one by one exactly as the collate function has always received them."""

    def __init__(self, rows: Sequence[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.rows[i]


class StepCollate:
    """rows -> {"batch": this process's collated slice, "targets": the whole micro-batch's
    target count (float), "tokens": its non-padding tokens (int)}. A class, not a closure, so
    it pickles into worker processes under any start method."""

    def __init__(self, collate: Callable[[list], dict], task: str, rank: int, world: int) -> None:
        self.collate, self.task, self.rank, self.world = collate, task, rank, world

    def __call__(self, rows: list) -> dict:
        whole = self.collate(rows)
        mask = whole.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else whole["input_ids"].numel()
        part = len(rows) // self.world
        local = whole if self.world == 1 else self.collate(
            rows[self.rank * part:(self.rank + 1) * part])
        return {"batch": local, "targets": float(target_count(whole["labels"], self.task)),
                "tokens": tokens}


def training_loader(rows: Sequence[Any], sampler: StepBatchSampler, collate: StepCollate, *,
                    workers: int, pin_memory: bool) -> DataLoader:
    """The DataLoader over `rows` in `sampler`'s order; its base seed comes from a private
    generator (see the module docstring), so the global RNG stream is untouched."""
    return DataLoader(_Rows(rows), batch_sampler=sampler, collate_fn=collate,
                      num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))
