"""Cost measurement: parameter counts, FLOPs against torch's FLOP counter, memory trackers
(the matmul peak and MFU: test_peak.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_gpt2, tiny_llama
from loralab.costs import measure
from loralab.quant import count_parameters


def test_count_parameters_counts_tied_weights_once():
    model = tiny_llama()  # lm_head tied to the embeddings
    naive = {id(p): p.numel() for p in model.parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.model.norm.weight.requires_grad_(False)
    trainable, total = count_parameters(model)
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
    # what full fine-tuning and LoRA train, as their strategies pass it (test_strategies.py)
    facts = {"full": {"trains_all": True}, "lora": {}}[method]
    """The 6N / 4N + 6 r (d_in + d_out) rules vs FLOPs counted over forward + backward."""
    from loralab.lora.config import LoRAConfig
    from loralab.lora.inject import apply_lora, lora_parameters

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
    estimate = measure.flops_per_token(measure.matmul_parameters(model), lora_params=lora_n,
                                       **facts) * b * t
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.12)


def test_flops_rules():
    """The rules by what trains (per method: test_strategies.py)."""
    assert measure.flops_per_token(100, trains_all=True) == 600
    assert measure.flops_per_token(100, lora_params=10) == 460
    assert measure.flops_per_token(100, body_backward=False, head_params=5) == 220
    assert measure.flops_per_token(100, trains=False) == 0
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


def test_native_bf16_follows_the_cpu_flags():
    """The CPU answer agrees with the kernel's own flag list (AVX512-BF16 or AMX-BF16), read
    here independently, and with torch's CPUID check (a peer that reads the hardware)."""
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo here")
    flags = set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert measure.native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert measure.native_bf16("cpu") == bool(torch.cpu._is_avx512_bf16_supported()
                                              or torch.cpu._is_amx_tile_supported())
    assert measure.native_bf16(torch.device("cpu")) == measure.native_bf16("cpu")
    if not torch.cuda.is_available():
        assert measure.native_bf16("cuda") is False


# /proc/cpuinfo of the two CPUs this project runs on (flags lines shortened; the first block of
# the AMD one is followed by a second processor, which must not be read)
AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mmx fxsr sse sse2 ht syscall nx mmxext \
fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq \
pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand \
hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext \
fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt \
xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip vaes vpclmulqdq rdpid fsrm
bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2

processor\t: 1
model name\t: Some Other CPU
flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile
"""
INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx \
fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc \
cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes \
xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch ssbd ibrs ibpb stibp fsgsbase bmi1 \
hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb \
avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 arat \
avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg \
avx512_vpopcntdq la57 rdpid cldemote movdiri movdir64b fsrm md_clear serialize tsxldtrk \
amx_bf16 avx512_fp16 amx_tile amx_int8 arch_capabilities
"""


def test_cpu_info_parses_amd_avx2_and_intel_amx_cpuinfo():
    amd = measure.parse_cpuinfo(AMD_CPUINFO)
    assert amd == measure.CPUInfo(model="AMD EPYC 7B13", flags=("avx2", "fma"))
    assert amd.native_bf16 is False
    assert amd.to_dict() == {"model": "AMD EPYC 7B13", "flags": ["avx2", "fma"],
                             "native_bf16": False}
    assert amd.line() == "AMD EPYC 7B13 (avx2 fma; bf16 emulated: no avx512_bf16/amx_bf16)"
    intel = measure.parse_cpuinfo(INTEL_CPUINFO)
    assert intel.model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert intel.flags == measure.CPU_FLAGS  # every flag that matters, in CPU_FLAGS order
    assert intel.native_bf16 is True and intel.line().endswith("; bf16 native)")
    # native_bf16 decides from the given CPU's flags, without asking the hardware
    assert measure.native_bf16("cpu", cpu=intel) is True
    assert measure.native_bf16("cpu", cpu=amd) is False
    # an ARM machine lists "Features", not "flags": unknown, and torch's own check decides
    arm = measure.parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\n")
    assert arm.flags is None and arm.native_bf16 is None and "flags unknown" in arm.line()
    assert measure.native_bf16("cpu", cpu=arm) == bool(torch.cpu._is_avx512_bf16_supported()
                                                       or torch.cpu._is_amx_tile_supported())


def test_cpu_info_reads_this_machine_and_falls_back_without_proc(tmp_path):
    missing = measure.cpu_info(tmp_path / "no-cpuinfo")
    assert missing.flags is None and missing.model
    (tmp_path / "cpuinfo").write_text(AMD_CPUINFO)
    assert measure.cpu_info(tmp_path / "cpuinfo") == measure.parse_cpuinfo(AMD_CPUINFO)
    line = measure.describe_device("cpu", cpu=measure.parse_cpuinfo(INTEL_CPUINFO))
    assert line == (f"cpu: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (avx2 fma avx512f "
                    f"avx512_bf16 amx_tile amx_bf16; bf16 native), {torch.get_num_threads()} "
                    "threads")


def test_path_bytes_and_environment(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 5)
    assert measure.path_bytes(tmp_path) == 15 and measure.path_bytes(tmp_path / "a") == 10
    env = measure.environment("cpu")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["cpu"] == measure.cpu_info().to_dict()  # model, flags that matter, native bf16
    assert env["git_revision"] is None or len(env["git_revision"]) >= 40
