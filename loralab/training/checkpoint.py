"""Atomic checkpoints and exact resume.

A checkpoint is one `torch.save` file holding everything needed to continue a run as if it had
never stopped: the trained tensors (adapter + head, or the whole model), optimizer and scheduler
state, the RNG states of python, numpy and torch, the data position (epoch, step within the
epoch; the data order itself is a pure function of seed and epoch), curves and counters.

Writes are atomic: the bytes go to a temporary file in the same directory, are flushed and
fsync'ed, then `os.replace` swaps the file in (an atomic rename on POSIX). A process killed at any
moment (SIGKILL included) leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from loralab.errors import UserError

LAST = "last.pt"
BEST = "best.pt"


def injected_fault(name: str) -> int | None:
    """Test hooks (fault injection): the step named by the environment variable
    LORALAB_FAULT_<NAME> (KILL_AT_STEP, KILL_IN_SAVE, NAN_AT_STEP), or None when unset."""
    value = os.environ.get(f"LORALAB_FAULT_{name}")
    return int(value) if value else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                  _fault: str | None = None) -> Path:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename it over
    `path`; on any failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if _fault == "before-rename":  # test hook: die with the temp file written, not renamed
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, _fault: str | None = None) -> Path:
    """Write `data` to `path` via a temporary file + fsync + rename."""
    return _atomic_write(path, lambda f: f.write(data), _fault=_fault)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, _fault: str | None = None) -> Path:
    """`torch.save(obj)` to `path` atomically, streamed straight into the temporary file.

    Why streamed: serialising into memory first held the whole checkpoint twice (a growing
    BytesIO and its `getvalue()` copy). For full fine-tuning that is the weights plus AdamW's
    two moments, ~1.6 GB for SmolLM2-135M, so every checkpoint briefly added ~3 GB to the
    process and, under a caching allocator, left it there."""
    return _atomic_write(path, lambda f: torch.save(obj, f), _fault=_fault)


def load(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by `atomic_torch_save` (CPU tensors)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}; delete it to start over") from exc


def rng_state() -> dict:
    """The RNG states that influence training: python, numpy, torch CPU (and CUDA if present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
