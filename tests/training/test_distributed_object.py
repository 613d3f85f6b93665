"""The distribution object (loralab.training.distributed) in one process: which kind a config
gets, and that the single-process object wraps nothing, syncs nothing and keeps states as they
are. DDP and FSDP run for real under torchrun in test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2
from loralab.errors import UserError
from loralab.training.config import TrainConfig
from loralab.training.distributed import (
    DDP,
    FSDP,
    Dist,
    EvalOnly,
    SingleProcess,
    distribution_for,
    parallel_mode,
)


def test_parallel_mode_per_method_and_world_size():
    """auto: FSDP for full fine-tuning only; one process is always 'single'."""
    two = Dist(rank=0, world=2)
    modes = {(m, p): parallel_mode(TrainConfig(method=m, parallel=p), two)
             for m, p in [("full", "auto"), ("full", "fsdp"), ("full", "ddp"), ("lora", "auto"),
                          ("head", "ddp"), ("none", "auto")]}
    assert modes == {("full", "auto"): "fsdp", ("full", "fsdp"): "fsdp", ("full", "ddp"): "ddp",
                     ("lora", "auto"): "ddp", ("head", "ddp"): "ddp", ("none", "auto"): "eval"}
    assert parallel_mode(TrainConfig(method="full"), Dist()) == "single"


def test_factory_picks_one_kind_per_config_and_world():
    two = Dist(rank=1, world=2)
    kinds = {(m, p): type(distribution_for(TrainConfig(method=m, parallel=p), two))
             for m, p in [("full", "auto"), ("full", "ddp"), ("lora", "auto"), ("none", "auto")]}
    assert kinds == {("full", "auto"): FSDP, ("full", "ddp"): DDP, ("lora", "auto"): DDP,
                     ("none", "auto"): EvalOnly}
    assert type(distribution_for(TrainConfig(method="lora"), Dist())) is SingleProcess
    assert distribution_for(TrainConfig(method="none"), Dist()).name == "eval"
    fsdp = distribution_for(TrainConfig(method="full"), two)
    assert fsdp.evaluates and not fsdp.main and not fsdp.allows_compile
    assert not distribution_for(TrainConfig(method="lora"), two).evaluates
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        distribution_for(TrainConfig(batch_size=4), Dist(world=3))


def test_single_process_wraps_nothing_and_keeps_states():
    torch.manual_seed(0)
    model = tiny_gpt2()
    single = distribution_for(TrainConfig(method="full"), Dist())
    assert (single.rank, single.world, single.main, single.evaluates) == (0, 1, True, True)
    prepared = single.prepare(model, model)
    assert prepared is model and single.wrap(prepared) is model
    assert single.eval_module(model, prepared) is model
    with single.micro_batch_sync(model, last=False):
        pass
    x = torch.tensor([2.0])
    assert single.all_reduce_sum(x) is x and x.item() == 2.0
    single.barrier()
    norm = torch.tensor(3.0)
    assert single.full_norm(norm) is norm
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    assert single.local_view(model, optimizer) == (model, optimizer)
    assert single.whole_model_state(model) is None

    def trained(m):
        return {k: v.clone() for k, v in m.state_dict().items()}

    tensors, optim = single.gather_state(model, optimizer, trained)
    assert optim == optimizer.state_dict()
    assert EvalOnly(Dist(rank=1, world=2)).gather_state(model, None, trained) is None

    fresh = tiny_gpt2()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    single.restore_state(fresh, fresh_opt, tensors, optim,
                         lambda m, t: m.load_state_dict(t, strict=False))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
    assert fresh_opt.state_dict()["state"].keys() == optim["state"].keys()


def test_single_process_tracker_skips_the_parameters():
    model = tiny_gpt2()
    single = SingleProcess(Dist())
    tracker = single.saved_tensor_tracker(model, model)
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert ptrs <= tracker.skip
    with tracker.track():
        model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum()
    assert tracker.peak > 0
