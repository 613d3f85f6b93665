"""Cost measurement: parameter counts, FLOPs against torch's FLOP counter, memory trackers,
the cached matmul peak."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_gpt2, tiny_llama
from loralab import measure


def test_count_parameters_counts_tied_weights_once():
    model = tiny_llama()  # lm_head tied to the embeddings
    naive = {id(p): p.numel() for p in model.parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.model.norm.weight.requires_grad_(False)
    trainable, total = measure.count_parameters(model)
    assert total == sum(naive.values())
    assert trainable == total - model.model.norm.weight.numel()


def test_matmul_parameters_and_forward_flops_match_torch_flop_counter():
    """2 N FLOPs per token for the linear layers + attention's two (T x T) products."""
    model = tiny_llama(n_layer=2, hidden=32, heads=4)
    model.set_attn_implementation("eager")  # plain matmuls, which the counter sees
    n = measure.matmul_parameters(model)
    expected_n = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, torch.nn.Linear))  # lm_head shares the embedding tensor
    assert n == expected_n
    b, t = 2, 8
    ids = torch.randint(0, 128, (b, t))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    attention = 2 * 2 * b * t * t * 32 * 2  # QK^T and AV, per layer (2 layers)
    assert counter.get_total_flops() == 2 * n * b * t + attention


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_flops_estimate_close_to_counted(method):
    """The 6N / 4N + 6 r (d_in + d_out) rules vs FLOPs counted over forward + backward."""
    from loralab.lora import LoRAConfig, apply_lora, lora_parameters

    model = tiny_gpt2(n_layer=2, n_embd=64).train()
    if method == "lora":
        apply_lora(model, LoRAConfig(rank=4, targets="attn-proj-ffn"))
    else:
        model.requires_grad_(True)
    b, t = 4, 4  # short sequences: attention FLOPs are negligible next to the matmuls
    ids = torch.randint(0, 128, (b, t))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    lora_n = sum(p.numel() for p in lora_parameters(model))
    estimate = measure.flops_per_token(method, measure.matmul_parameters(model),
                                       lora_params=lora_n) * b * t
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.12)


def test_flops_rules():
    assert measure.flops_per_token("full", 100) == 600
    assert measure.flops_per_token("lora", 100, lora_params=10) == 460
    assert measure.flops_per_token("head", 100, head_params=5) == 220
    assert measure.flops_per_token("none", 100) == 0
    assert measure.mfu(1e9, 2.0, 1e9) == 0.5


def test_saved_tensor_tracker_counts_activation_bytes():
    w = torch.nn.Parameter(torch.randn(100, 100))
    x = torch.randn(10, 100)
    tracker = measure.SavedTensorTracker(skip=measure.storage_pointers([w]))
    with tracker.track():
        y = (x @ w).exp()  # mm saves x (and w, skipped); exp saves its output (10 x 100)
    y.sum().backward()
    assert tracker.peak == 2 * 10 * 100 * 4
    with tracker.track():
        with torch.no_grad():
            (x @ w).exp()
    assert tracker.current == 0 and tracker.peak == 8000


def test_rss_sampler_sees_a_large_allocation():
    sampler = measure.RSSSampler(interval=0.005).start()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    big += 1
    peak = sampler.stop()
    del big
    assert peak >= 48 * 2**20


def test_memory_estimate_adamw_state_is_8_bytes_per_trainable_param():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
    model[1].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(3, 10)).sum().backward()
    opt.step()
    est = measure.memory_estimate(model, opt, activation_bytes=123)
    assert est["weights"] == 4 * (110 + 22)
    assert est["gradients"] == 4 * 110
    assert est["optimizer_state"] == 8 * 110
    assert est["total"] == sum(est[k] for k in ("weights", "gradients", "optimizer_state",
                                                 "activations"))


def test_matmul_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(measure, "benchmark_matmul",
                        lambda dtype, device: calls.append(dtype) or 1.5e11)
    assert measure.matmul_peak(torch.float32) == 1.5e11
    assert measure.matmul_peak(torch.float32) == 1.5e11
    assert measure.matmul_peak(torch.bfloat16) == 1.5e11
    assert calls == [torch.float32, torch.bfloat16]
    assert (tmp_path / "matmul_peak.json").exists()


def test_benchmark_matmul_is_plausible():
    flops = measure.benchmark_matmul(torch.float32, n=256, iters=2)
    assert 1e8 < flops < 1e14


def test_native_bf16_follows_the_cpu_flags():
    """The CPU answer agrees with the kernel's own flag list (AVX512-BF16 or AMX tiles)."""
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo here")
    flags = set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert measure.native_bf16("cpu") == bool({"avx512_bf16", "amx_tile"} & flags)
    assert measure.native_bf16(torch.device("cpu")) == measure.native_bf16("cpu")
    if not torch.cuda.is_available():
        assert measure.native_bf16("cuda") is False


def test_path_bytes_and_environment(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 5)
    assert measure.path_bytes(tmp_path) == 15 and measure.path_bytes(tmp_path / "a") == 10
    env = measure.environment("cpu")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["git_revision"] is None or len(env["git_revision"]) >= 40
