"""Atomic writes survive SIGKILL; RNG states round-trip."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from loralab.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def test_atomic_torch_save_roundtrip(tmp_path):
    state = {"w": torch.randn(3, 4), "step": 7}
    ckpt.atomic_torch_save(state, tmp_path / "c.pt")
    back = ckpt.load(tmp_path / "c.pt")
    assert torch.equal(back["w"], state["w"]) and back["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left


def test_atomic_torch_save_streams_to_disk_without_an_in_memory_copy(tmp_path):
    """A 64 MB tensor is written without the checkpoint ever being held as Python bytes
    (tracemalloc sees the BytesIO buffer and its getvalue() copy, not the tensor's storage);
    the file loads back equal."""
    import tracemalloc

    big = torch.arange(16 * 2**20, dtype=torch.float32)
    tracemalloc.start()
    try:
        ckpt.atomic_torch_save({"w": big, "step": 3}, tmp_path / "big.pt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB of Python allocations for a 64 MB tensor"
    back = ckpt.load(tmp_path / "big.pt")
    assert back["step"] == 3 and torch.equal(back["w"], big)
    assert [p.name for p in tmp_path.iterdir()] == ["big.pt"]  # no temporary file left


def test_sigkill_during_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "last.pt"
    ckpt.atomic_torch_save({"step": 1}, target)
    code = ("from loralab.training import checkpoint as c\n"
            f"c.atomic_torch_save({{'step': 2}}, {str(target)!r}, _fault='before-rename')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          timeout=120)
    assert proc.returncode == -9
    assert ckpt.load(target)["step"] == 1


def test_atomic_write_json(tmp_path):
    ckpt.atomic_write_json(tmp_path / "r.json", {"a": 1})
    ckpt.atomic_write_json(tmp_path / "r.json", {"a": 2})
    assert (tmp_path / "r.json").read_text().strip().endswith("}")
    assert '"a": 2' in (tmp_path / "r.json").read_text()


def test_rng_state_roundtrip():
    ckpt.seed_everything(5)
    state = ckpt.rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    ckpt.set_rng_state(state)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_unreadable_checkpoint_is_a_user_error(tmp_path):
    import pytest

    from loralab.errors import UserError

    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        ckpt.load(tmp_path / "bad.pt")
