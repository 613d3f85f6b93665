"""Sizes of a (quantized) model: logical parameter counts, bytes in memory and on disk, and
saving its state dict with quantized tensors kept packed."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from loralab.quant.tensors import logical_numel, tensor_bytes


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameter counts; shared (tied) tensors once. Quantized
    weights (torchao tensor subclasses, bitsandbytes packed 4-bit) count the parameters they
    stand for, not their packed storage elements (`logical_numel`)."""
    trainable = total = 0
    for p in model.parameters():  # de-duplicates shared tensors
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors once)."""
    seen: set[int] = set()
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += tensor_bytes(t)
    return n


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """torch.save of the state dict (quantized tensors keep their packed form), written
    atomically. safetensors cannot hold torchao tensor subclasses; torch.load(weights_only=True)
    reads this back once torchao is imported."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(model.state_dict(), fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def disk_bytes(model: nn.Module) -> int:
    """Size of the model's state dict as `save_model` writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes
