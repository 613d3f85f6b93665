"""Which speed-ups and data-loading defaults a run uses, decided per device type in one place.

Project rule: a speed-up measured only on the CPU is used on the CPU only, until a measurement
on a GPU shows that it helps there too. Every such decision lives in `device_defaults`, a pure
function of the device type (and the CPU count), so it is unit tested without a GPU.

Two kinds of item are kept apart:

- CPU-measured speed-ups (seeded dropout masks, the seeded-dropout attention, lean MLPs,
  tcmalloc): each fixes a cost measured on the 2-core CPUs loralab is developed on (a slow
  Mersenne-Twister `bernoulli_`, SDPA's math path when dropout is on, page faults from glibc's
  fresh mmaps). On CUDA the costs they remove are different or absent (Philox masks are cheap,
  flash / memory-efficient SDPA supports dropout without a T x T probability matrix, device
  memory does not come from malloc), and replacing SDPA there would be a regression. Off on CUDA.
- device-neutral savings: the fused cross-entropy (loralab.kernels.losses) never materialises the
  N x V logits, an algorithmic memory saving that holds on any device (Liger-Kernel does the
  same on GPUs), so it stays on everywhere; `--fused-loss false` turns it off.

The `compile` setting is not decided here: `--compile auto` weighs the estimated work of a run
(loralab.kernels.compiling; the threshold was measured on the CPU and is conservative on a
GPU, where compiled blocks typically gain more), and `on` / `off` are the user's choice on
every device.

This module imports nothing heavy (no torch), so the `loralab` command can ask it before
torch loads (the tcmalloc decision, loralab.kernels.hostmem).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_TRAINING_COMMANDS = frozenset({"train", "compare"})
"""`loralab` subcommands that train models: the only ones tcmalloc is preloaded for."""

GPU_MARKERS: tuple[Path, ...] = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidia0"),
                                 Path("/dev/kfd"))
"""Files whose presence says the host has a GPU torch can use: the NVIDIA kernel driver and its
first device node, and AMD's ROCm compute device (ROCm torch uses the "cuda" device type too)."""


@dataclass(frozen=True)
class DeviceDefaults:
    """What a training run on one device type uses (see `device_defaults`)."""

    seeded_dropout: bool
    """The model's own nn.Dropout layers become `loralab.lora.dropout.SeededDropout`. Measured
    on the CPU: `bernoulli_` draws one Mersenne-Twister number per element, a large share of a
    step with attention dropout; CUDA's Philox masks cost little."""
    seeded_dropout_attention: bool
    """Attention with dropout runs `loralab.kernels.attention` instead of SDPA. Measured on the
    CPU, where SDPA's fused kernels refuse dropout and fall back to the math path. On CUDA, flash /
    memory-efficient SDPA handles dropout without materialising the T x T probabilities, which
    this path stores: it must not replace them."""
    lean_mlps: bool
    """Frozen MLPs store fewer activations (`loralab.kernels.lean_mlp`). Measured on the CPU
    only."""
    tcmalloc: bool
    """The `loralab` command restarts itself with tcmalloc preloaded (`loralab.kernels.hostmem`).
    Measured on the CPU: it removes the page faults of glibc's fresh mmaps for activation
    buffers; on CUDA activations live in device memory (PyTorch's own caching allocator)."""
    fused_loss: bool
    """The fused cross-entropy (`loralab.kernels.losses`) is allowed: device-neutral, it never
    materialises the logits (an algorithmic memory saving, not a CPU-measured speed-up)."""
    loader_workers: int
    """DataLoader worker processes for training batches."""
    pin_memory: bool
    """Page-locked host batches (with non-blocking copies) for fast host-to-device transfer."""


def device_defaults(device_type: str, cpu_count: int | None = None) -> DeviceDefaults:
    """The defaults for a run on `device_type` ("cpu", "cuda", ...), on a host with `cpu_count`
    CPUs (os.cpu_count() when None).

    CPU: every CPU-measured speed-up on; no loader workers, because reading and collating a
    batch takes milliseconds against seconds per step, while a worker process would take a
    core from the training step's threads; no pinned memory (there is no device copy).
    Any other device (CUDA, ROCm as "cuda", MPS, XPU): the CPU-measured speed-ups off (SDPA and
    nn.Dropout as the model ships them), the fused loss on, loader workers = half the CPUs
    (at most 4, so the step keeps cores for its own launches), pinned memory on CUDA only.
    """
    cpus = os.cpu_count() if cpu_count is None else cpu_count
    if device_type == "cpu":
        return DeviceDefaults(seeded_dropout=True, seeded_dropout_attention=True, lean_mlps=True,
                              tcmalloc=True, fused_loss=True, loader_workers=0, pin_memory=False)
    return DeviceDefaults(seeded_dropout=False, seeded_dropout_attention=False, lean_mlps=False,
                          tcmalloc=False, fused_loss=True,
                          loader_workers=max(0, min(4, (cpus or 1) // 2)),
                          pin_memory=device_type == "cuda")


def gpu_host(environ: Mapping[str, str], markers: Sequence[Path] = GPU_MARKERS) -> bool:
    """Whether torch would train on a GPU here, judged without importing torch (the `loralab`
    command asks before torch loads, and importing it costs seconds): a GPU driver's files
    exist (`markers`) and `CUDA_VISIBLE_DEVICES` does not hide every device ("" or "-1")."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in {"", "-1"}:
        return False
    return any(path.exists() for path in markers)


def subcommand(argv: Sequence[str]) -> str | None:
    """The `loralab` subcommand in `argv` (argv[0] is the program): its first argument that is
    not an option (the command has no global options that take a value), or None."""
    return next((arg for arg in argv[1:] if not arg.startswith("-")), None)
