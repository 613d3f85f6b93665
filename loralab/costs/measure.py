"""What a training run costs: parameters, bytes on disk, time, memory and FLOPs.

Everything here is a small pure function or a context manager that the training loop wraps
around its work; nothing keeps global state. The cost model (EleutherAI "Transformer Math
101", the LoRA paper), by what a run trains:

    training FLOPs per token  every weight      ~ 6 N   (2N forward, 2N grad wrt activations,
                                                          2N wrt weights)
                              adapters in body  ~ 4 N + sum over adapted layers 6 r (d_in + d_out)
                              the head only     ~ 2 N + 4 N_head   (the body runs forward only)

where N counts the weights that take part in a matmul per token (linear / Conv1D layers; an
embedding lookup costs no FLOPs). Model FLOPs utilisation (MFU) divides achieved FLOP/s by
the machine's matmul peak, measured at the model's own shapes and checked against every run
(loralab.costs.peak).
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import psutil
import torch
from torch import nn

from loralab.kernels import hostmem
from loralab.quant.tensors import is_quantized_tensor, tensor_bytes

# --- parameters and bytes ------------------------------------------------------------------

def parameter_bytes(params: list[nn.Parameter] | Iterator[nn.Parameter]) -> int:
    """Bytes held by the given parameters (each distinct storage once)."""
    seen: set[int] = set()
    n = 0
    for p in params:
        key = id(p) if is_quantized_tensor(p) else p.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        n += tensor_bytes(p)  # packed data + scales for quantized weights
    return n


class _Flattenable(Protocol):
    """A wrapper tensor subclass (a torchao quantized weight): names its inner tensors."""

    def __tensor_flatten__(self) -> tuple[list[str], object]: ...


def storage_pointers(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> set[int]:
    """Data pointers of the storages behind the tensors; a tensor subclass (a quantized weight)
    contributes the storages of its inner tensors, since the wrapper itself has none."""
    out: set[int] = set()
    for t in tensors:
        if is_quantized_tensor(t):
            names, _ = cast(_Flattenable, t).__tensor_flatten__()
            out |= storage_pointers([getattr(t, n) for n in names])
        else:
            out.add(t.untyped_storage().data_ptr())
    return out


def path_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a file or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- FLOPs and MFU ------------------------------------------------------------------------

def _is_matmul_layer(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matmul_parameters(model: nn.Module) -> int:
    """N of the cost model: weights of linear/Conv1D layers, each distinct tensor once.

    A LoRA layer's frozen base is itself a Linear/Conv1D module and is counted there; the
    adapter matrices (LoRA A and B) are costed separately (`flops_per_token`).
    """
    seen: set[int] = set()
    n = 0
    for module in model.modules():
        if not _is_matmul_layer(module):
            continue
        weight = cast(torch.Tensor | None, module.weight)
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        n += weight.numel()
    return n


def flops_per_token(n_matmul: int, *, trains: bool = True, trains_all: bool = False,
                    body_backward: bool = True, lora_params: int = 0,
                    head_params: int = 0) -> float:
    """Training FLOPs per token from what a run trains (the cost model of the module docstring).

    trains_all (every weight trains): 6N. body_backward (the gradient flows back through the
    frozen body to adapters in it): 4N (forward + gradient wrt activations; no weight gradients
    for the frozen base) plus 6 r (d_in + d_out) per adapted layer, which summed over layers is
    6 x the adapter parameters (A is r x d_in, B is d_out x r). Neither (only the head trains,
    the body runs forward only): 2N forward plus 4 N_head for the head's two backward matmuls.
    Not `trains`: 0. N = `n_matmul` (`matmul_parameters`); FLOPs, not FLOP/s.
    """
    return flops_formula(n_matmul, trains=trains, trains_all=trains_all,
                         body_backward=body_backward, lora_params=lora_params,
                         head_params=head_params)[1]


def flops_formula(n_matmul: int, *, trains: bool = True, trains_all: bool = False,
                  body_backward: bool = True, lora_params: int = 0,
                  head_params: int = 0) -> tuple[str, float]:
    """(the rule written out with the run's numbers, its value) for `flops_per_token`, e.g.
    ("4 N + 6 A = 4 x 1,000 + 6 x 10", 4060.0), so a record's figure can be checked by hand."""
    if not trains:
        return "0 (no training)", 0.0
    if trains_all:
        return f"6 N = 6 x {n_matmul:,}", 6.0 * n_matmul
    if body_backward:
        return (f"4 N + 6 A = 4 x {n_matmul:,} + 6 x {lora_params:,}",
                4.0 * n_matmul + 6.0 * lora_params)
    return (f"2 N + 4 N_head = 2 x {n_matmul:,} + 4 x {head_params:,}",
            2.0 * n_matmul + 4.0 * head_params)


FLOPS_WHERE = ("N = weights in linear/Conv1D layers, A = LoRA adapter parameters, N_head = task "
               "head parameters")
"""What the symbols of `flops_formula` stand for, appended to a record's formula."""


def flops_per_token_formula(text: str, value: float) -> str:
    """A record's `flops_per_token_formula`: `text = value (where the symbols are defined)`."""
    return f"{text} = {value:,.0f} ({FLOPS_WHERE})"


def mixed_flops_formula(parts: list[tuple[float, str, float]], shares: str
                        ) -> tuple[str, float]:
    """A run whose steps fall into phases with different rules: per token
    sum_i f_i x FLOPs_i, where f_i is phase i's share of the steps. `parts` holds
    (f_i, formula text, value) per phase, `shares` names what the fractions are; returns (the
    record's formula, the mixed value)."""
    total = sum(f * value for f, _, value in parts)
    terms = " + ".join(f"{f:.4g} x ({text})" for f, text, _ in parts)
    return f"{terms} = {total:,.0f} ({FLOPS_WHERE}; the fractions are {shares})", total


def native_bf16(device: torch.device | str, cpu: CPUInfo | None = None) -> bool:
    """Whether bf16 matmuls run natively here, so bf16 autocast can be faster than fp32.

    CUDA: `torch.cuda.is_bf16_supported()` (Ampere and later). CPU: only with AVX512-BF16 or
    AMX-BF16, read from the CPU's flags (`cpu_info`, the same reading every record and
    benchmark reports; torch's own CPUID check where the flags cannot be read). Without them
    PyTorch emulates bf16 matmuls in generic kernels that convert to fp32 as they go, several
    times slower than fp32 (figures in BENCHMARKS.md). There autocast only costs time."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        flags = (cpu or cpu_info()).native_bf16
        if flags is not None:
            return flags
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True  # other backends: no claim either way


def mfu(train_flops: float, seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the measured peak."""
    if seconds <= 0 or peak_flops_per_second <= 0:
        return 0.0
    return train_flops / seconds / peak_flops_per_second


# --- memory -------------------------------------------------------------------------------

def memory_estimate(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    activation_bytes: int) -> dict[str, int]:
    """Memory breakdown in bytes: weights, gradients, optimizer state, activations.

    Weights and gradients come from the parameters (gradients only for trainable ones), the
    optimizer state from its tensors (AdamW: two fp32 moments per trainable parameter, i.e.
    8 bytes/param; before the first step it is computed from that rule), activations from the
    measured saved-for-backward bytes.
    """
    params = list(model.parameters())
    weights = parameter_bytes(params)
    trainable = [p for p in params if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    opt += v.numel() * v.element_size()
        if opt == 0:
            opt = sum(2 * p.numel() * 4 for p in trainable)
    return {"weights": weights, "gradients": grads, "optimizer_state": opt,
            "activations": int(activation_bytes),
            "total": weights + grads + opt + int(activation_bytes)}


class RSSSampler:
    """Peak resident set size of this process, sampled by a background thread.

    `peak_delta` is the highest RSS seen while running minus the RSS at `start`: the memory
    the training itself added on top of what was loaded before.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        return int(psutil.Process().memory_info().rss)

    def start(self) -> RSSSampler:
        hostmem.release_free_memory()  # the baseline counts live memory, not the heap's cache
        self.baseline = self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())
        return self.peak_delta

    @property
    def peak_delta(self) -> int:
        return max(0, self.peak - self.baseline)


@dataclass
class SavedTensorTracker:
    """Peak bytes of tensors autograd saves for backward within one forward pass.

    Installed with `torch.autograd.graph.saved_tensors_hooks`: each tensor saved for backward
    passes through `pack`; distinct storages are counted once and parameters (already counted
    as weights) are skipped. `peak` is the largest total over the forward passes tracked, i.e.
    the activation memory held at the turn from forward to backward.
    """

    skip: set[int] = field(default_factory=set)
    current: int = 0
    peak: int = 0
    _seen: set[int] = field(default_factory=set)

    @contextmanager
    def track(self) -> Iterator[None]:
        self.current = 0
        self._seen = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                ptr = t.untyped_storage().data_ptr()
                nbytes = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses
                return t
            if ptr not in self._seen and ptr not in self.skip:
                self._seen.add(ptr)
                self.current += nbytes
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak = max(self.peak, self.current)


def static_tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors that live through training: parameters, buffers, gradients and
    optimizer state (distinct storages once)."""
    seen: set[int] = set()
    n = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal n
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        if is_quantized_tensor(t):  # a wrapper without one storage: its inner tensors' bytes
            if id(t) not in seen:
                seen.add(id(t))
                n += tensor_bytes(t)
            return
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            return
        seen.add(st.data_ptr())
        n += st.nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                add(v if isinstance(v, torch.Tensor) else None)
    return n


def peak_cuda_bytes() -> int:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


# --- the processor ----------------------------------------------------------------------

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""The x86 flags that decide matmul speed here: AVX2 + FMA for the fp32 kernels, AVX-512, and
bf16 in hardware (AVX512-BF16 dot products, AMX tiles with their bf16 multiply)."""
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""Either one makes bf16 matmuls native; without both they are emulated (`native_bf16`)."""


@dataclass(frozen=True)
class CPUInfo:
    """The processor a run or benchmark ran on: the same code is ~30x faster or slower in bf16
    and differs in the last bits of fp32 between an AVX2 EPYC and an AMX Xeon."""

    model: str
    """Model name, e.g. "AMD EPYC 7B13" or "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"."""
    flags: tuple[str, ...] | None
    """Which of CPU_FLAGS it has, in that order; None where the flags cannot be read."""

    @property
    def native_bf16(self) -> bool | None:
        """AVX512-BF16 or AMX-BF16 present; None when the flags are unknown."""
        return None if self.flags is None else any(f in self.flags for f in BF16_FLAGS)

    def to_dict(self) -> dict:
        return {"model": self.model, "flags": None if self.flags is None else list(self.flags),
                "native_bf16": self.native_bf16}

    def line(self) -> str:
        """One line for logs: model, the flags that matter, and what that means for bf16."""
        if self.flags is None:
            return f"{self.model} (flags unknown)"
        bf16 = ("bf16 native" if self.native_bf16
                else f"bf16 emulated: no {'/'.join(BF16_FLAGS)}")
        return f"{self.model} ({' '.join(self.flags) or 'no ' + '/'.join(CPU_FLAGS)}; {bf16})"


def parse_cpuinfo(text: str) -> CPUInfo:
    """A CPUInfo from the text of /proc/cpuinfo (what `lscpu` reads too): the first processor's
    `model name` and which of CPU_FLAGS its `flags` line lists. Without a flags line (ARM
    lists `Features`) the flags are unknown, not absent."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: all cores are alike here
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or ""
    flags = None
    if "flags" in fields:
        have = set(fields["flags"].split())
        flags = tuple(f for f in CPU_FLAGS if f in have)
    return CPUInfo(model=model or "unknown CPU", flags=flags)


def cpu_info(path: str | os.PathLike = "/proc/cpuinfo") -> CPUInfo:
    """This machine's CPUInfo: /proc/cpuinfo on Linux; elsewhere the platform's processor
    name with unknown flags."""
    try:
        info = parse_cpuinfo(Path(path).read_text(errors="replace"))
    except OSError:
        return CPUInfo(model=platform.processor() or platform.machine() or "unknown CPU",
                       flags=None)
    if info.model == "unknown CPU" and (platform.processor() or platform.machine()):
        info = CPUInfo(model=platform.processor() or platform.machine(), flags=info.flags)
    return info


def describe_device(device: torch.device | str = "cpu", cpu: CPUInfo | None = None) -> str:
    """One line naming where the work runs, printed at the start of every benchmark: the CPU
    with its flags and thread count, and the GPU on CUDA."""
    cpu = cpu or cpu_info()
    line = f"cpu: {cpu.line()}, {torch.get_num_threads()} threads"
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        line = (f"gpu: {torch.cuda.get_device_name(device)} (bf16 "
                f"{'native' if native_bf16(device) else 'emulated'}); host {line}")
    return line


# --- environment --------------------------------------------------------------------------

def environment(device: str) -> dict:
    """Library versions, device, thread count, the CPU (model, flags that matter, native bf16;
    `cpu_info`), the GPU on CUDA, and the project's git revision."""
    env: dict = {"python": platform.python_version(), "torch": torch.__version__,
                 "device": device, "threads": torch.get_num_threads(),
                 "platform": platform.platform(), "cpu": cpu_info().to_dict(),
                 "huge_pages": hostmem.huge_pages_active(os.environ),
                 "allocator": hostmem.allocator_in_use()}
    for lib in ("transformers", "datasets", "numpy", "peft"):
        try:
            env[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - optional libraries
            env[lib] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "loralab"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        env["git_revision"] = (rev + ("-dirty" if dirty else "")) if rev else None
    except (OSError, subprocess.SubprocessError):
        env["git_revision"] = None
    return env
