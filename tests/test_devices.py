"""Issue 22: defaults that stay right on a GPU. The device decision (loralab.devices) is one
pure function, tested here for CPU and CUDA (no GPU on this machine: the decision is what is
tested, and prepare_model / the training loop are shown to follow it); training batches come
through a DataLoader in exactly the old order (loralab.training.batching); the package metadata
uses an SPDX license string."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from loralab import devices
from loralab.training import batching
from loralab.training.batching import StepBatchSampler, StepCollate, epoch_order, training_loader

ROOT = Path(__file__).resolve().parents[1]


# --- the device decision ----------------------------------------------------------------------

def test_cpu_uses_every_cpu_measured_speedup_and_no_loader_workers():
    cpu = devices.device_defaults("cpu", cpu_count=2)
    assert cpu.seeded_dropout and cpu.seeded_dropout_attention and cpu.lean_mlps
    assert cpu.tcmalloc and cpu.fused_loss
    assert cpu.loader_workers == 0 and not cpu.pin_memory


@pytest.mark.parametrize(("cpus", "workers"), [(1, 0), (2, 1), (8, 4), (64, 4)])
def test_cuda_keeps_sdpa_and_dropout_and_loads_with_pinned_workers(cpus, workers):
    """On CUDA only the device-neutral fused loss stays; SDPA (flash / memory-efficient),
    nn.Dropout and the model's MLPs are left as shipped, and tcmalloc is not preloaded."""
    cuda = devices.device_defaults("cuda", cpu_count=cpus)
    assert not (cuda.seeded_dropout or cuda.seeded_dropout_attention or cuda.lean_mlps
                or cuda.tcmalloc)
    assert cuda.fused_loss and cuda.pin_memory and cuda.loader_workers == workers
    assert not devices.device_defaults("mps", cpu_count=cpus).pin_memory  # CUDA only


def test_gpu_host_is_recognised_without_torch(tmp_path):
    driver = tmp_path / "version"
    assert not devices.gpu_host({}, [driver])
    driver.write_text("NVRM version: 550")
    assert devices.gpu_host({}, [driver])
    assert devices.gpu_host({"CUDA_VISIBLE_DEVICES": "0,1"}, [driver])
    for hidden in ("", "-1"):  # every device hidden: torch trains on the CPU
        assert not devices.gpu_host({"CUDA_VISIBLE_DEVICES": hidden}, [driver])


@pytest.mark.parametrize(("argv", "command"), [
    (["loralab", "train", "--method", "lora"], "train"), (["loralab", "--help"], None),
    (["/x/loralab/__main__.py", "compare", "study.yaml"], "compare"), (["loralab"], None)])
def test_subcommand(argv, command):
    assert devices.subcommand(argv) == command


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_prepare_model_installs_cpu_speedups_on_the_cpu_only(device):
    """The old prepare_model put the seeded-dropout attention (a materialised T x T path) in
    place of SDPA on every device; for a CUDA run the model now keeps SDPA, nn.Dropout and its
    own MLPs. prepare_model does no device work itself, so the CUDA decision runs on a CPU."""
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    from loralab.kernels.attention import NAME
    from loralab.kernels.lean_mlp import LeanGeluMLP
    from loralab.lora.dropout import SeededDropout
    from loralab.training.config import make_config
    from loralab.training.strategies.base import strategy_for

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                       n_positions=32, attn_implementation="sdpa"))
    strategy_for(make_config(model="tiny", task="lm", data="synthetic", method="lora",
                             out="unused")).prepare(model, device)
    kinds = {type(m) for m in model.modules()}
    on_cpu = device == "cpu"
    assert (SeededDropout in kinds) == on_cpu and (nn.Dropout in kinds) != on_cpu
    assert (LeanGeluMLP in kinds) == on_cpu
    assert model.config._attn_implementation == (NAME if on_cpu else "sdpa")


# --- training batches through a DataLoader --------------------------------------------------

def _old_loop_order(n, seed, batch_size, grad_accum, steps_per_epoch, epoch, step_in_epoch,
                    steps):
    """The micro-batches the training loop built on its main thread before issue 22."""
    out, order, order_epoch = [], None, -1
    global_batch = batch_size * grad_accum
    for _ in range(steps):
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        if order_epoch != epoch:
            order, order_epoch = epoch_order(n, seed, epoch), epoch
        start = step_in_epoch * global_batch
        idx = order[start:start + global_batch].tolist()
        out += [idx[k * batch_size:(k + 1) * batch_size] for k in range(grad_accum)]
        step_in_epoch += 1
    return out


@pytest.mark.parametrize(("n", "bs", "acc"), [(50, 4, 3), (37, 8, 1), (16, 2, 4)])
def test_sampler_gives_the_old_order_and_resumes_mid_epoch(n, bs, acc):
    spe = n // (bs * acc)
    total = 3 * spe + 1  # crosses epoch boundaries, remainder rows skipped
    whole = list(StepBatchSampler(n, 5, bs, acc, spe, 0, 0, total))
    assert whole == _old_loop_order(n, 5, bs, acc, spe, 0, 0, total)
    assert len(whole) == len(StepBatchSampler(n, 5, bs, acc, spe, 0, 0, total))
    for done in range(total):  # resumed after `done` steps at the state the loop saved
        epoch, in_epoch = divmod(done, spe)
        if in_epoch == 0 and done:  # the loop saves step_in_epoch == spe at an epoch's end
            epoch, in_epoch = epoch - 1, spe
        tail = list(StepBatchSampler(n, 5, bs, acc, spe, epoch, in_epoch, total - done))
        assert tail == whole[done * acc:], done


def _collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = [r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]
    mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
    labels = [r["input_ids"] + [-100] * (width - len(r["input_ids"])) for r in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels)}


def test_collate_counts_the_whole_micro_batch_and_slices_per_rank():
    rows = [{"input_ids": list(range(1, 2 + i))} for i in range(4)]  # lengths 1..4
    whole = StepCollate(_collate, "lm", 0, 1)(rows)
    assert whole["targets"] == float(0 + 1 + 2 + 3) and whole["tokens"] == 10
    rank1 = StepCollate(_collate, "lm", 1, 2)(rows)
    assert rank1["targets"] == whole["targets"] and rank1["tokens"] == whole["tokens"]
    torch.testing.assert_close(rank1["batch"]["input_ids"], _collate(rows[2:])["input_ids"])


def test_loader_leaves_the_global_rng_alone():
    """The DataLoader draws a base seed when its iterator starts; from torch's global generator
    that would shift every later dropout mask. It draws from a private generator instead."""
    rows = [{"input_ids": [i + 1]} for i in range(8)]
    torch.manual_seed(3)
    before = torch.get_rng_state()
    loader = training_loader(rows, StepBatchSampler(8, 0, 2, 1, 4, 0, 0, 4),
                             StepCollate(_collate, "lm", 0, 1), workers=0, pin_memory=False)
    got = [b["batch"]["input_ids"].flatten().tolist() for b in loader]
    assert torch.equal(torch.get_rng_state(), before)
    assert got == [[i + 1 for i in m] for m in _old_loop_order(8, 0, 2, 1, 4, 0, 0, 4)]


def test_training_reads_its_batches_through_the_dataloader(tmp_path, monkeypatch):
    """train() builds its batches with training_loader, with the CPU's defaults (no workers,
    no pinned memory: see devices.device_defaults)."""
    from test_train import run

    calls = []
    build = batching.training_loader

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return build(*args, **kwargs)

    monkeypatch.setattr(batching, "training_loader", spy)
    rec = run(tmp_path, max_steps=2, grad_accum=2, batch_size=2)
    assert rec["status"] == "finished" and len(rec["curves"]["train_loss"]) == 2
    assert calls == [{"workers": 0, "pin_memory": False}]


# --- packaging ------------------------------------------------------------------------------

def test_license_is_an_spdx_string_and_setuptools_can_read_it():
    """A TOML-table license is deprecated (setuptools warned on every install); an SPDX string
    needs setuptools >= 77 (PEP 639)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    requires = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert requires == ["setuptools>=77"]
