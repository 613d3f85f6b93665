"""LoRA+ parameter groups (loralab.training.optim.param_groups): rates by object, the schedule
keeping the ratio, lr_ratio 1 being today's optimizer, one AdamW step against a naive
reference, resume with the extra groups, and the config check."""

from __future__ import annotations

import pytest
import torch

from conftest import randomise_adapters, tiny_bert, tiny_gpt2, token_ids
from loralab.errors import ConfigError, UserError
from loralab.lora.config import LoRAConfig
from loralab.lora.inject import apply_lora, lora_modules
from loralab.training import loop
from loralab.training.config import TrainConfig
from loralab.training.optim import (
    decay_groups,
    lr_factor,
    make_optimizer,
    param_groups,
)
from test_train import Loaded, cls_data, run

CPU = torch.device("cpu")


def _factors(model):
    layers = [m for _, m in lora_modules(model)]
    return [m.lora_A for m in layers], [m.lora_B for m in layers]


def _lora_bert():
    model = tiny_bert()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="qv", train_head=True))
    return model


def test_groups_give_b_the_ratio_and_everything_else_the_base_rate():
    model = _lora_bert()
    a, b = _factors(model)
    groups = param_groups(model, 0.01, 1e-3, 16.0, (a, b))
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups)  # each parameter once
    assert set(by_id) == {id(p) for p in model.parameters() if p.requires_grad}
    for p in b:
        assert by_id[id(p)]["lr"] == pytest.approx(16e-3) and by_id[id(p)]["lr_multiplier"] == 16
    for p in a:
        assert by_id[id(p)]["lr"] == 1e-3
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in
            {id(q) for q in a + b}]
    assert head and all(by_id[id(p)]["lr"] == 1e-3 for p in head)
    # the decay split is kept: the head's bias has no decay, its weight and A, B have
    decayed = {id(p) for g in decay_groups(model, 0.01) if g["weight_decay"] for p in g["params"]}
    for p in model.parameters():
        if p.requires_grad:
            assert (by_id[id(p)]["weight_decay"] == 0.01) == (id(p) in decayed)
    optimizer = make_optimizer(groups, 1e-3, CPU)
    assert optimizer.param_groups[0]["lr_multiplier"] == 1.0  # the recorded lr is the base's


def test_ratio_one_is_exactly_the_decay_groups():
    model = _lora_bert()
    assert param_groups(model, 0.01, 1e-3, 1.0, _factors(model)) == decay_groups(model, 0.01)


def test_ratio_without_b_matrices_is_a_user_error():
    model = tiny_bert()
    model.requires_grad_(True)
    with pytest.raises(UserError, match="lr_ratio 16"):
        param_groups(model, 0.0, 1e-3, 16.0, ([], []))


def test_one_adamw_step_moves_b_by_ratio_times_lr_times_sign_of_its_gradient():
    """AdamW's first step is lr x g / (|g| + eps) (bias-corrected moments m = g, v = g^2)
    after the decoupled decay p (1 - lr wd): B moves lr_ratio times as far as A would."""
    model = tiny_gpt2()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="qv"))
    randomise_adapters(model)
    a, b = _factors(model)
    lr, ratio, wd, eps = 1e-3, 16.0, 0.01, 1e-8
    before = [p.detach().clone() for p in a + b]
    loss = model(**token_ids(), labels=token_ids()["input_ids"]).loss
    loss.backward()
    grads = [p.grad.detach().clone() for p in a + b]
    optimizer = make_optimizer(param_groups(model, wd, lr, ratio, (a, b)), lr, CPU)
    optimizer.step()
    for i, p in enumerate(a + b):
        rate = lr * (ratio if i >= len(a) else 1.0)
        g = grads[i]
        expected = before[i] * (1 - rate * wd) - rate * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    assert all(g.abs().max() > 0 for g in grads)  # every factor moved (the test can fail)


def test_the_schedule_keeps_the_ratio_at_every_step():
    model = _lora_bert()
    optimizer = make_optimizer(param_groups(model, 0.0, 1e-2, 4.0, _factors(model)), 1e-2, CPU)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 10, 3, "cosine"))
    for step in range(10):
        factor = lr_factor(step, 10, 3, "cosine")
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(1e-2 * group["lr_multiplier"] * factor)
        optimizer.step()
        sched.step()


@pytest.mark.slow
def test_ratio_one_run_has_the_bit_identical_losses_of_the_old_optimizer(tmp_path, monkeypatch):
    """The loop with lr_ratio 1 against the loop building today's optimizer from
    `decay_groups` alone: the same losses, bit for bit, and the same groups."""
    new = run(tmp_path, name="new", max_steps=3, weight_decay=0.1)

    def old_groups(model, weight_decay, lr, lr_ratio=1.0, factors=((), ())):
        return decay_groups(model, weight_decay)

    monkeypatch.setattr(loop, "param_groups", old_groups)
    old = run(tmp_path, name="old", max_steps=3, weight_decay=0.1)
    assert new["curves"]["train_loss"] == old["curves"]["train_loss"]
    groups = [torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=False)
              ["optimizer"]["param_groups"] for name in ("new", "old")]
    assert groups[0] == groups[1] and "lr_multiplier" not in groups[0][0]


def test_lora_plus_trains_differently_and_records_the_base_lr(tmp_path):
    base = run(tmp_path, name="plain", max_steps=3)
    plus = run(tmp_path, name="plus", max_steps=3, lr_ratio=16.0)
    assert plus["curves"]["lr"] == base["curves"]["lr"]
    assert plus["curves"]["train_loss"][0] == base["curves"]["train_loss"][0]  # B starts at 0
    assert plus["curves"]["train_loss"][1:] != base["curves"]["train_loss"][1:]
    assert plus["config"]["lr_ratio"] == 16.0


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_lora_plus_resume_is_bit_identical(tmp_path, monkeypatch):
    """Stopped after step 3 (checkpoint at step 2) and resumed: the weights, the optimizer
    state of its six-way groups and the curves are those of an uninterrupted run."""
    cfg = dict(model="tiny", task="classify", method="lora", max_steps=5, batch_size=4, lr=1e-2,
               lr_ratio=8.0, checkpoint_every=2, keep_best=False, warmup_steps=1,
               schedule="cosine", precision="fp32", dropout=0.1)

    def go(name: str, resume: bool = False) -> dict:
        torch.manual_seed(0)
        config = TrainConfig(out=str(tmp_path / name), **cfg)
        return loop.train(config, resume=resume, loaded=Loaded(tiny_bert()), task_data=cls_data())

    ref = go("ref")
    monkeypatch.setenv("LORALAB_FAULT_KILL_AT_STEP", "3")

    def kill(pid, sig):
        raise _Killed

    monkeypatch.setattr(loop.os, "kill", kill)
    with pytest.raises(_Killed):
        go("cut")
    monkeypatch.delenv("LORALAB_FAULT_KILL_AT_STEP")
    rec = go("cut", resume=True)
    assert any("resumed from step 2" in n for n in rec["notes"])
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)
    assert len(a["optimizer"]["param_groups"]) == len(b["optimizer"]["param_groups"]) >= 4
    assert sorted({g["lr_multiplier"] for g in b["optimizer"]["param_groups"]}) == [1.0, 8.0]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ref["curves"]["train_loss"] == rec["curves"]["train_loss"]


def test_lr_ratio_only_for_lora_methods():
    TrainConfig(method="lora", lr_ratio=16.0)
    TrainConfig(method="qlora", lr_ratio=16.0)
    with pytest.raises(ConfigError, match="lr_ratio") as exc:
        TrainConfig(method="full", lr_ratio=16.0)
    assert exc.value.key == "lr_ratio"
    TrainConfig(method="full", lr_ratio=1.0)

