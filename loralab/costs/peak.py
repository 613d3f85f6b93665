"""The matmul peak that model FLOPs utilisation (MFU) divides by: measured, cached, checked.

    MFU = (training FLOPs / training seconds) / peak FLOP/s

The peak is an achieved rate on this machine, not a datasheet figure: the best of several timed
`F.linear(x, W)` calls, x of shape (tokens, d_in) and W of shape (d_out, d_in) (2 tokens d_in
d_out FLOPs each), at the shapes of the model's own largest linear layers, in the run's dtype
and at its thread count. Why each part:

- best-of-k (k >= 5, after one warm-up call): other work on the machine only ever slows a call
  down, so the fastest call is the least disturbed one. One timing taken while the machine was
  busy is too low, and an MFU above 100% follows (issue 23: a cached 118 GFLOP/s against 180
  measured idle printed "MFU 138%").
- the model's own shapes: a square 1024^3 matmul is not what the run multiplies; its shapes
  are, and a few of them cost well under a second to time.
- the cache key holds everything that moves the peak: the processor (CPU model name and the
  flags that select kernels, `measure.cpu_info`, or the GPU name), dtype, thread count, torch
  version and the shapes. A cache copied to, or shared with, another CPU is not reused.
- a cached peak that a run beats (its model FLOP/s exceed it) is known to be too low: it is
  re-measured and replaced by the higher of the two, and the run says so in its notes.
- an MFU that would still exceed 100% is never stored: the record holds None and the reason.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from loralab.bundled import cache_dir
from loralab.costs import measure

CACHE_FILE = "matmul_peak.json"
Shape = tuple[int, int, int]
"""(tokens, d_in, d_out) of one timed call: x (tokens, d_in) @ W^T, W (d_out, d_in)."""

MAX_SHAPES = 3
"""The largest distinct linear-layer shapes timed: for SmolLM2 the tied 576 x 49,152 head and
the two MLP matrices, which carry most of its FLOPs."""
CPU_CALL_FLOPS = 2e9
"""Tokens per timed call are cut so one call is at most this much work on a CPU (~11 ms at 180
GFLOP/s, ~0.1 s in emulated bf16): the whole measurement stays within ~2 s."""
MIN_TOKENS = 16
REPEATS = 5
"""Timed calls per shape at least (after the warm-up)."""
MIN_SECONDS = 0.1
"""More calls per shape, up to MAX_REPEATS, while a shape has been timed for less than this."""
MAX_REPEATS = 100


@dataclass(frozen=True)
class MatmulPeak:
    """The peak a run divides by and where it came from (stored in the run record)."""

    flops_per_second: float
    measured_at: str
    """When it was measured (UTC, ISO 8601)."""
    how: str
    """What was timed: shapes, dtype, threads, best of how many calls."""
    key: str
    """The cache key: processor, dtype, threads, torch version, shapes."""
    source: str
    """"cache" (read from the cache), "measured" (none cached) or "re-measured" (the cached
    value was beaten by the run)."""
    replaced: float | None = None
    """The cached FLOP/s a re-measurement replaced."""
    note: str | None = None
    """What a re-measurement found, for the run's notes."""

    def to_dict(self) -> dict:
        return asdict(self)


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a Linear (also quantized subclasses: logical sizes) or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":  # weight (d_in, d_out) = (nx, nf)
        weight = cast(torch.Tensor, module.weight)
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def matmul_shapes(model: nn.Module, tokens: int, device: str = "cpu",
                  limit: int = MAX_SHAPES) -> tuple[Shape, ...]:
    """The shapes to time: the `limit` largest distinct (d_in, d_out) of the model's linear
    layers, each with `tokens` rows (the run's micro-batch x seq_len), cut on a CPU to at most
    CPU_CALL_FLOPS per call (but not below MIN_TOKENS rows)."""
    dims = {d for m in model.modules() if (d := _linear_dims(m)) is not None}
    ranked = sorted(dims, key=lambda d: (-d[0] * d[1], d))[:limit] or [(256, 256)]
    shapes = []
    for d_in, d_out in ranked:
        t = max(1, int(tokens))
        if not str(device).startswith("cuda"):
            t = min(t, max(MIN_TOKENS, int(CPU_CALL_FLOPS // (2 * d_in * d_out))))
        shapes.append((t, d_in, d_out))
    return tuple(shapes)


def benchmark_shapes(shapes: tuple[Shape, ...], dtype: torch.dtype = torch.float32,
                     device: str = "cpu") -> tuple[float, int]:
    """(best FLOP/s over all shapes, fewest timed calls of any shape). Each shape: one warm-up
    call (thread pool, kernel choice, first-touch page faults), then at least REPEATS timed
    calls, more while under MIN_SECONDS; its rate is 2 t d_in d_out over its fastest call."""
    cuda = str(device).startswith("cuda")
    best_rate, fewest = 0.0, MAX_REPEATS
    for t, d_in, d_out in shapes:
        x = torch.randn(t, d_in, dtype=dtype, device=device)
        w = torch.randn(d_out, d_in, dtype=dtype, device=device)
        F.linear(x, w)
        best, spent, n = float("inf"), 0.0, 0
        while n < REPEATS or (spent < MIN_SECONDS and n < MAX_REPEATS):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            F.linear(x, w)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            best, spent, n = min(best, dt), spent + dt, n + 1
        best_rate = max(best_rate, 2.0 * t * d_in * d_out / max(best, 1e-12))
        fewest = min(fewest, n)
    return best_rate, fewest


def device_description(device: str = "cpu") -> str:
    """The processor, as the cache key names it: the GPU's name, or the CPU's model name with
    the flags that select matmul kernels (`measure.cpu_info`)."""
    if str(device).startswith("cuda"):
        return f"gpu: {torch.cuda.get_device_name(device)}"
    cpu = measure.cpu_info()
    flags = "flags unknown" if cpu.flags is None else " ".join(cpu.flags)
    return f"cpu: {cpu.model} [{flags}]"


def peak_cache_key(processor: str, dtype: torch.dtype, threads: int,
                   shapes: tuple[Shape, ...]) -> str:
    """One cache entry per processor, dtype, thread count, torch version and shape set."""
    sizes = ",".join(f"{t}x{i}x{o}" for t, i, o in shapes)
    return f"{processor}|{dtype}|threads={threads}|torch={torch.__version__}|shapes={sizes}"


def _cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    # entries of the old format (a bare number, taken once whatever the load) are dropped
    return {k: v for k, v in cache.items() if isinstance(v, dict)
            and isinstance(v.get("flops_per_second"), (int, float))}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def _g(flops: float) -> str:
    return f"{flops / 1e9:.1f} GFLOP/s"


def matmul_peak(shapes: tuple[Shape, ...], dtype: torch.dtype = torch.float32,
                device: str = "cpu", *, beaten_by: float = 0.0) -> MatmulPeak:
    """The peak for these shapes: from the cache, else measured (`benchmark_shapes`) and cached.

    `beaten_by` is the run's achieved model FLOP/s: a cached peak below it cannot be a peak, so
    it is re-measured and the cache keeps the higher of the old and new values (a peak is a
    maximum: a lower new reading only means the machine is busier now). `note` says what
    happened."""
    threads = torch.get_num_threads()
    key = peak_cache_key(device_description(device), dtype, threads, shapes)
    path = _cache_path()
    cache = _read_cache(path)
    entry = cache.get(key)
    if entry is not None and entry["flops_per_second"] >= beaten_by:
        return MatmulPeak(float(entry["flops_per_second"]), str(entry.get("measured_at", "")),
                          str(entry.get("how", "")), key, "cache")
    rate, calls = benchmark_shapes(shapes, dtype, device)
    sizes = ", ".join(f"{t}x{i}x{o}" for t, i, o in shapes)
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    how = (f"best of >= {calls} timed F.linear calls per shape after a warm-up, "
           f"(tokens x d_in x d_out) {sizes}, {dtype}, {threads} threads, on {device}")
    new: dict[str, Any] = {"flops_per_second": rate, "measured_at": measured_at, "how": how}
    if entry is None:
        cache[key] = new
        _write_cache(path, cache)
        return MatmulPeak(rate, measured_at, how, key, "measured")
    old = float(entry["flops_per_second"])
    kept = new if rate > old else entry
    cache[key] = kept
    _write_cache(path, cache)
    note = (f"matmul peak re-measured: this run's {_g(beaten_by)} of model FLOPs beat the "
            f"cached peak {_g(old)} (measured {entry.get('measured_at', '?')}); the new "
            f"measurement gives {_g(rate)}, " + ("which replaces it in the cache" if rate > old
                                                 else "lower still, so the cached one stays"))
    return MatmulPeak(float(kept["flops_per_second"]), str(kept.get("measured_at", "")),
                      str(kept.get("how", "")), key, "re-measured", old, note)


def mfu_figure(train_flops: float, seconds: float, peak_flops_per_second: float, *,
               steady_flops_per_second: float = 0.0) -> tuple[float | None, str | None]:
    """(MFU, None), or (None, why) when the run's model FLOP/s, over all its steps or over the
    steady steps after the first, exceed the peak: utilisation above 100% is impossible, so
    such a figure says the peak (or the FLOP count) is wrong, not the run."""
    value = measure.mfu(train_flops, seconds, peak_flops_per_second)
    achieved = max(train_flops / seconds if seconds > 0 else 0.0, steady_flops_per_second)
    if peak_flops_per_second <= 0 or achieved <= peak_flops_per_second:
        return value, None
    return None, (f"MFU unreliable, not stored: the run's {_g(achieved)} of model FLOPs exceed "
                  f"the measured matmul peak {_g(peak_flops_per_second)} "
                  f"({100 * achieved / peak_flops_per_second:.0f}%); the peak was likely "
                  "measured while the machine was busier than during the run")


def run_mfu(shapes: tuple[Shape, ...], dtype: torch.dtype, device: str, train_flops: float,
            seconds: float, steady_flops_per_second: float) -> tuple[dict, dict, list[str]]:
    """A training run's MFU entries: (costs, estimates, notes) for its record.

    The run's achieved model FLOP/s, over all steps and over the steady ones after the first,
    go to `matmul_peak` as `beaten_by`, so a cached peak the run beats is re-measured; an MFU
    that would still exceed 100% is stored as None with the reason (costs.mfu_unreliable and a
    note). The estimates hold the peak used (value, when and how measured, source) and the
    division written out."""
    achieved = max(train_flops / seconds if seconds > 0 else 0.0, steady_flops_per_second)
    found = matmul_peak(shapes, dtype, device, beaten_by=achieved)
    value, why = mfu_figure(train_flops, seconds, found.flops_per_second,
                            steady_flops_per_second=steady_flops_per_second)
    costs: dict = {"mfu": value}
    estimates = {"peak_flops_per_second": found.flops_per_second, "peak": found.to_dict(),
                 "mfu_formula": f"train_flops / train_seconds / peak = {train_flops:.6g} / "
                                f"{seconds:.6g} s / {found.flops_per_second:.6g} FLOP/s"}
    notes = [found.note] if found.note else []
    if why:
        costs["mfu_unreliable"] = why
        notes.append(why)
    return costs, estimates, notes
