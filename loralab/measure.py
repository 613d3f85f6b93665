"""What a training run costs: parameters, bytes on disk, time, memory and FLOPs.

Everything here is a small pure function or a context manager that the training loop wraps
around its work; nothing keeps global state. The cost model follows DESIGN section 5
(EleutherAI "Transformer Math 101", the LoRA paper):

    training FLOPs per token  full  ~ 6 N        (2N forward, 2N grad wrt activations, 2N wrt weights)
                              lora  ~ 4 N + sum over adapted layers 6 r (d_in + d_out)
                              head  ~ 2 N + 6 N_head   (the body runs forward only)

where N counts the weights that take part in a matmul per token (linear / Conv1D layers; an
embedding lookup costs no FLOPs). Model FLOPs utilisation (MFU) divides achieved FLOP/s by
the machine's measured matmul peak, which is benchmarked once and cached.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from loralab import hostmem


# --- parameters and bytes ------------------------------------------------------------------

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameter counts; tied weights are counted once. Quantized
    weights (torchao tensor subclasses, bitsandbytes packed 4-bit) count the parameters they
    stand for, not their packed storage elements (loralab.quant.count_parameters)."""
    from loralab.quant import count_parameters as _count

    return _count(model)


def parameter_bytes(params: list[nn.Parameter] | Iterator[nn.Parameter]) -> int:
    """Bytes held by the given parameters (each distinct storage once)."""
    from loralab.quant import is_quantized_tensor, tensor_bytes

    seen: set[int] = set()
    n = 0
    for p in params:
        key = id(p) if is_quantized_tensor(p) else p.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        n += tensor_bytes(p)  # packed data + scales for quantized weights
    return n


def storage_pointers(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> set[int]:
    """Data pointers of the storages behind the tensors; a tensor subclass (a quantized weight)
    contributes the storages of its inner tensors, since the wrapper itself has none."""
    from loralab.quant import is_quantized_tensor

    out: set[int] = set()
    for t in tensors:
        if is_quantized_tensor(t):
            names, _ = t.__tensor_flatten__()
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
        weight = module.weight
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        n += weight.numel()
    return n


def flops_per_token(method: str, n_matmul: int, *, lora_params: int = 0,
                    head_params: int = 0) -> float:
    """Training FLOPs per token for one strategy (DESIGN section 5).

    full: 6N. lora: 4N (forward + gradient wrt activations; no weight gradients for the frozen
    base) plus 6 r (d_in + d_out) per adapted layer, which summed over layers is 6 x the number
    of adapter parameters (A is r x d_in, B is d_out x r). head: 2N forward plus 4 N_head for
    the head's two backward matmuls. none: 0 (no training).
    """
    if method == "full":
        return 6.0 * n_matmul
    if method in ("lora", "qat-lora", "qlora", "lora-ptq"):
        return 4.0 * n_matmul + 6.0 * lora_params
    if method == "head":
        return 2.0 * n_matmul + 4.0 * head_params
    if method == "none":
        return 0.0
    raise ValueError(f"unknown method {method!r}")


def _cache_dir() -> Path:
    root = os.environ.get("LORALAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loralab")
    return Path(root)


def benchmark_matmul(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 1024,
                     iters: int = 3) -> float:
    """Best achieved FLOP/s of an n x n x n matmul (2 n^3 FLOPs each) over a few repetitions."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: thread pool, kernels
    best = float("inf")
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """The machine's matmul peak in FLOP/s, measured once and cached on disk.

    The cache key holds device, dtype, thread count and torch version, since each changes it.
    """
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    key = f"{name}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = _cache_dir() / "matmul_peak.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    peak = benchmark_matmul(dtype, device)
    cache[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return peak


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively here, so bf16 autocast can be faster than fp32.

    CUDA: `torch.cuda.is_bf16_supported()` (Ampere and later). CPU: only with AVX512-BF16 or
    AMX tiles. Without them PyTorch emulates bf16 matmuls in generic kernels that convert to
    fp32 as they go: on an AVX2 EPYC ~19 GFLOP/s for `x @ W^T` and ~1.25 for a plain `a @ b`,
    against 125-180 in fp32 (BENCHMARKS.md). There autocast only costs time."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
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
        import psutil

        return int(psutil.Process().memory_info().rss)

    def start(self) -> "RSSSampler":
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

    from loralab.quant import is_quantized_tensor, tensor_bytes

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


# --- environment --------------------------------------------------------------------------

def environment(device: str) -> dict:
    """Library versions, device, thread count and the project's git revision."""
    import platform
    import subprocess

    env: dict = {"python": platform.python_version(), "torch": torch.__version__,
                 "device": device, "threads": torch.get_num_threads(),
                 "platform": platform.platform(),
                 "huge_pages": hostmem.huge_pages_active(os.environ),
                 "allocator": hostmem.allocator_in_use()}
    for lib in ("transformers", "datasets", "numpy", "peft"):
        try:
            env[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - optional libraries
            env[lib] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    repo = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "loralab"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        env["git_revision"] = (rev + ("-dirty" if dirty else "")) if rev else None
    except (OSError, subprocess.SubprocessError):
        env["git_revision"] = None
    return env
