"""The matmul peak MFU divides by (loralab.costs.peak): model-shaped, best-of-k, cached per
processor, re-measured when a run beats it; MFU never above 100%; the FLOPs-per-token formula."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from loralab.costs import measure, peak

AMD = measure.CPUInfo(model="AMD EPYC 7B13", flags=("avx2", "fma"))
INTEL = measure.CPUInfo(model="Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
                        flags=("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"))
SHAPES = ((64, 32, 96), (64, 32, 32))


def _cache(tmp_path) -> dict:
    return json.loads((tmp_path / peak.CACHE_FILE).read_text())


def test_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(peak, "benchmark_shapes",
                        lambda shapes, dtype, device: calls.append((shapes, dtype)) or (1.5e11, 7))
    first = peak.matmul_peak(SHAPES, torch.float32)
    again = peak.matmul_peak(SHAPES, torch.float32)
    other = peak.matmul_peak(SHAPES, torch.bfloat16)
    assert (first.source, again.source, other.source) == ("measured", "cache", "measured")
    assert first.flops_per_second == again.flops_per_second == 1.5e11
    assert calls == [(SHAPES, torch.float32), (SHAPES, torch.bfloat16)]
    assert again.measured_at == first.measured_at and "64x32x96" in first.how
    assert f"threads={torch.get_num_threads()}" in first.key and torch.__version__ in first.key
    assert len(_cache(tmp_path)) == 2


def test_cache_key_separates_cpu_models(tmp_path, monkeypatch):
    """A cache shared between (or copied across) an AVX2 EPYC and an AMX Xeon keeps one entry
    per processor: neither machine ever divides by the other's peak."""
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    rates = {AMD.model: 1.2e11, INTEL.model: 9.0e11}
    cpu = {"now": AMD}
    monkeypatch.setattr(measure, "cpu_info", lambda: cpu["now"])
    monkeypatch.setattr(peak, "benchmark_shapes",
                        lambda shapes, dtype, device: (rates[cpu["now"].model], 5))
    amd = peak.matmul_peak(SHAPES)
    cpu["now"] = INTEL
    intel = peak.matmul_peak(SHAPES)
    assert (amd.source, intel.source) == ("measured", "measured")  # not the AMD entry
    assert amd.key != intel.key and AMD.model in amd.key and INTEL.model in intel.key
    cpu["now"] = AMD
    assert peak.matmul_peak(SHAPES).flops_per_second == 1.2e11  # its own entry, from the cache
    assert {v["flops_per_second"] for v in _cache(tmp_path).values()} == {1.2e11, 9.0e11}
    # same model name, other flags (e.g. AMX disabled in a VM): another processor too
    plain = measure.CPUInfo(model=INTEL.model, flags=("avx2", "fma"))
    keys = {peak.peak_cache_key(f"cpu: {c.model} [{' '.join(c.flags)}]", torch.float32, 2, SHAPES)
            for c in (AMD, INTEL, plain)}
    assert len(keys) == 3


def test_a_beaten_cached_peak_is_re_measured_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    measured = {"rate": 3e9}
    monkeypatch.setattr(peak, "benchmark_shapes",
                        lambda shapes, dtype, device: (measured["rate"], 5))
    key = peak.peak_cache_key(peak.device_description("cpu"), torch.float32,
                              torch.get_num_threads(), SHAPES)
    (tmp_path / peak.CACHE_FILE).write_text(json.dumps(
        {key: {"flops_per_second": 1e9, "measured_at": "2020-01-01T00:00:00Z", "how": "stale"},
         "cpu|torch.float32|threads=2|torch=x": 1.18e11}))  # the old format: dropped
    not_beaten = peak.matmul_peak(SHAPES, beaten_by=0.5e9)
    assert (not_beaten.source, not_beaten.flops_per_second) == ("cache", 1e9)
    found = peak.matmul_peak(SHAPES, beaten_by=2e9)
    assert found.source == "re-measured" and found.replaced == 1e9
    assert found.flops_per_second == 3e9 and _cache(tmp_path) == {key: _cache(tmp_path)[key]}
    assert _cache(tmp_path)[key]["flops_per_second"] == 3e9
    assert "re-measured" in found.note and "replaces it" in found.note
    # a re-measurement lower than the cached value (the machine got busier) keeps the higher
    measured["rate"] = 2e9
    kept = peak.matmul_peak(SHAPES, beaten_by=4e9)
    assert kept.flops_per_second == 3e9 and "cached one stays" in kept.note
    # and the run still beats it: MFU is not stored, the reason is
    value, why = peak.mfu_figure(4e9, 1.0, kept.flops_per_second)
    assert value is None and "unreliable" in why and "133%" in why


def test_mfu_figure_is_never_above_one():
    assert peak.mfu_figure(5e10, 1.0, 1e11) == (0.5, None)
    assert peak.mfu_figure(1e11, 1.0, 1e11) == (1.0, None)
    value, why = peak.mfu_figure(1.3806e11, 1.0, 1e11)  # the 138%
    assert value is None and "138%" in why
    # the steady rate (after the first step) beating the peak makes it unreliable too
    value, why = peak.mfu_figure(5e10, 1.0, 1e11, steady_flops_per_second=1.2e11)
    assert value is None and "120%" in why
    assert peak.mfu_figure(0.0, 0.0, 0.0) == (0.0, None)  # no training: nothing to judge


def test_matmul_shapes_are_the_models_largest_linear_layers():
    model = tiny_llama()
    dims = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)}
    naive = sorted(dims, key=lambda d: d[0] * d[1], reverse=True)[:3]
    shapes = peak.matmul_shapes(model, tokens=4 * 12)
    assert sorted((i, o) for _, i, o in shapes) == sorted(naive)
    assert all(t == 48 for t, _, _ in shapes)
    # a large layer on a CPU: rows cut so one call is <= CPU_CALL_FLOPS, not below MIN_TOKENS
    big = nn.Sequential(nn.Linear(576, 49152, bias=False), nn.Linear(576, 1536, bias=False))
    (t_head, _, _), (t_mlp, _, _) = peak.matmul_shapes(big, tokens=8 * 128)
    assert t_head == int(peak.CPU_CALL_FLOPS // (2 * 576 * 49152)) == 35
    assert t_mlp == 1024  # 1024 x 576 x 1536: 1.8 GFLOP, under the cap
    huge = nn.Linear(16384, 16384, device="meta")  # 2 x 16384^2 FLOPs a row: cap gives 3 rows
    assert peak.matmul_shapes(huge, tokens=1024)[0][0] == peak.MIN_TOKENS == 16
    assert peak.matmul_shapes(big, tokens=8 * 128, device="cuda:0")[0][0] == 1024  # no cap


def test_benchmark_shapes_times_best_of_at_least_five():
    """The measured rate is real (bounded by what any CPU or GPU here can do) and each shape
    got at least REPEATS timed calls."""
    rate, calls = peak.benchmark_shapes(((128, 256, 256),), torch.float32)
    assert 1e8 < rate < 1e15 and calls >= peak.REPEATS


def test_flops_per_token_formula_spells_out_the_value():
    """Method-free rules here; every method's formula: test_strategies.py."""
    for facts in [{"trains_all": True}, {"lora_params": 10},
                  {"body_backward": False, "head_params": 5}, {"trains": False}]:
        text = measure.flops_per_token_formula(*measure.flops_formula(1000, **facts))
        value = measure.flops_per_token(1000, **facts)
        assert text.split(" (N = ")[0].endswith(f"= {value:,.0f}"), text
    assert measure.flops_per_token_formula(*measure.flops_formula(1000, lora_params=10)).startswith(
        "4 N + 6 A = 4 x 1,000 + 6 x 10 = 4,060")
    lora = measure.flops_formula(1000, lora_params=10)
    head = measure.flops_formula(1000, body_backward=False, head_params=5)
    mixed, _ = measure.mixed_flops_formula([(0.75, *lora), (0.25, *head)], "the phases' shares")
    assert "= 3,550 (" in mixed  # 0.75 x 4,060 + 0.25 x 2,020


@pytest.mark.parametrize("bad", ["[1, 2]", "{not json"])
def test_a_corrupt_cache_is_measured_again(tmp_path, monkeypatch, bad):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    (tmp_path / peak.CACHE_FILE).write_text(bad)
    monkeypatch.setattr(peak, "benchmark_shapes", lambda shapes, dtype, device: (2e11, 5))
    assert peak.matmul_peak(SHAPES).source == "measured"


def _tiny_lm_run(out, **kw) -> tuple[dict, tuple]:
    """A few LoRA steps of a tiny random GPT-2 on random token rows."""
    from types import SimpleNamespace

    import datasets

    from conftest import tiny_gpt2
    from loralab.training.config import TrainConfig
    from loralab.training.loop import train

    g = torch.Generator().manual_seed(0)

    def split(n: int):
        ids = torch.randint(1, 128, (n, 12), generator=g).tolist()
        return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * n,
                                           "labels": ids})

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    model = tiny_gpt2()
    shapes = peak.matmul_shapes(model, tokens=4 * 128)
    config = TrainConfig(model="tiny", task="lm", method="lora", out=str(out), max_steps=3,
                         batch_size=4, lr=1e-2, warmup_steps=0, precision="fp32", **kw)
    record = train(config, loaded=SimpleNamespace(model=model, tokenizer=None, notes=()),
                   task_data=SimpleNamespace(splits={"train": split(16), "validation": split(4)},
                                             collate_fn=collate))
    return record, shapes


def test_a_stale_too_low_cached_peak_is_re_measured_and_mfu_stays_below_one(tmp_path,
                                                                            monkeypatch):
    """The issue's failure: a peak cached while the machine was busy (here absurdly low, 1
    FLOP/s) is beaten by the run, so the run re-measures it, replaces it, says so, and stores
    an MFU <= 100% with the peak, how and when it was measured, and the FLOP formula."""
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    from conftest import tiny_gpt2

    shapes = peak.matmul_shapes(tiny_gpt2(), tokens=4 * 128)  # batch_size x seq_len
    key = peak.peak_cache_key(peak.device_description("cpu"), torch.float32,
                              torch.get_num_threads(), shapes)
    stale = {key: {"flops_per_second": 1.0, "measured_at": "2020-01-01T00:00:00Z",
                   "how": "once, under load"}}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / peak.CACHE_FILE).write_text(json.dumps(stale))
    record, _ = _tiny_lm_run(tmp_path / "run")
    used = record["estimates"]["peak"]
    assert used["key"] == key  # the test's premise: the run looked up the stale entry
    assert used["source"] == "re-measured" and used["replaced"] == 1.0
    cached = json.loads((tmp_path / "cache" / peak.CACHE_FILE).read_text())[key]
    assert cached["flops_per_second"] > 1.0 == stale[key]["flops_per_second"]
    assert cached["flops_per_second"] == used["flops_per_second"]
    assert used["measured_at"] == cached["measured_at"] != "2020-01-01T00:00:00Z"
    assert any("matmul peak re-measured" in n for n in record["notes"])
    costs = record["costs"]
    assert costs["mfu"] is not None and 0 < costs["mfu"] <= 1.0
    assert "mfu_unreliable" not in costs
    est = record["estimates"]
    assert costs["mfu"] == pytest.approx(costs["train_flops"] / costs["train_seconds"]
                                         / est["peak_flops_per_second"], rel=1e-12)
    assert costs["train_flops"] == est["flops_per_token"] * est["tokens"]
    assert est["flops_per_token_formula"].startswith("4 N + 6 A = 4 x ")
    assert est["flops_per_token_formula"].split(" (N = ")[0].endswith(
        f"= {est['flops_per_token']:,.0f}")
