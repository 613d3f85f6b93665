"""The training loop: configs, schedules, decay groups, loss normalisation, strategies, logging,
NaN handling, resume after SIGKILL. Tiny random models and synthetic token data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab.costs import measure
from loralab.errors import UserError
from loralab.training.batching import epoch_order
from loralab.training.config import TrainConfig, config_from_yaml, make_config
from loralab.training.loop import TrainingDiverged, train
from loralab.training.optim import decay_groups, lr_factor
from loralab.training.strategies.base import frozen_body

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


# --- synthetic pieces (also used by the subprocess scripts) ---------------------------------

@dataclass
class Loaded:
    model: object
    tokenizer: object = None
    notes: tuple = ()


@dataclass
class Data:
    splits: dict
    collate_fn: object


def collate(rows: list[dict]) -> dict:
    """Right-pad to the longest row: input ids with 0, labels with -100 (as loralab.data.tasks)."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        out["input_ids"].append(list(r["input_ids"]) + [0] * pad)
        out["attention_mask"].append(list(r["attention_mask"]) + [0] * pad)
        lab = r["labels"]
        out["labels"].append(lab if isinstance(lab, int) else list(lab) + [-100] * pad)
    return {k: torch.tensor(v) for k, v in out.items()}


def lm_data(n: int = 48, length: int = 12, vocab: int = 128, seed: int = 1, ragged: bool = True,
            n_val: int = 8) -> Data:
    """Random token rows of varying length whose labels mask a prompt prefix with -100 (so
    micro-batches hold different numbers of target tokens)."""
    import datasets

    g = torch.Generator().manual_seed(seed)

    def split(k: int):
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        for _ in range(k):
            t = int(torch.randint(4, length + 1, (), generator=g)) if ragged else length
            ids = torch.randint(1, vocab, (t,), generator=g).tolist()
            prompt = int(torch.randint(0, t - 2, (), generator=g)) if ragged else 0
            rows["input_ids"].append(ids)
            rows["attention_mask"].append([1] * t)
            rows["labels"].append([-100] * prompt + ids[prompt:])
        return datasets.Dataset.from_dict(rows)

    return Data({"train": split(n), "validation": split(n_val)}, collate)


def cls_data(n: int = 48, length: int = 10, vocab: int = 128, seed: int = 1) -> Data:
    import datasets

    g = torch.Generator().manual_seed(seed)

    def split(k):
        ids = torch.randint(1, vocab, (k, length), generator=g)
        labels = (ids[:, 0] > vocab // 2).long()  # learnable: the first token decides
        return datasets.Dataset.from_dict({"input_ids": ids.tolist(),
                                           "attention_mask": [[1] * length] * k,
                                           "labels": labels.tolist()})

    return Data({"train": split(n), "validation": split(16)}, collate)


def run(tmp_path: Path, model=None, data=None, name: str = "run", **kw) -> dict:
    """A tiny run. fp32 unless asked otherwise: the default, auto, is bf16 on an AMX machine,
    and these tests compare fp32 numerics (against peers, resumed runs, other paths)."""
    cfg = dict(model="tiny", task="lm", method="lora", out=str(tmp_path / name), max_steps=4,
               batch_size=4, lr=1e-2, warmup_steps=0, precision="fp32")
    cfg.update(kw)
    config = TrainConfig(**cfg)
    model = model if model is not None else tiny_gpt2()
    data = data if data is not None else (cls_data() if config.task == "classify" else lm_data())
    return train(config, loaded=Loaded(model), task_data=data)


# --- config -------------------------------------------------------------------------------

def test_config_unknown_key_names_valid_ones():
    with pytest.raises(UserError, match="unknown config key.*bogus.*valid keys:.*batch_size"):
        make_config({"bogus": 1})


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: minilm-l6\nmethod: full\nlr: 1e-3\nbatch_size: 16\n"
                    "eval_data: [a, b]\ngrad_checkpointing: true\n")
    c = config_from_yaml(path, lr=5e-4, max_steps="7", method=None)
    assert (c.model, c.method, c.lr, c.batch_size, c.max_steps) == ("minilm-l6", "full", 5e-4,
                                                                    16, 7)
    assert c.eval_data == ("a", "b") and c.grad_checkpointing is True
    path.write_text("- not a mapping\n")
    with pytest.raises(UserError, match="mapping"):
        config_from_yaml(path)
    with pytest.raises(UserError, match="batch_size"):
        make_config(batch_size="many")


@pytest.mark.parametrize("bad", [{"method": "prefix"}, {"task": "qa"}, {"schedule": "step"},
                                 {"precision": "fp16"}, {"batch_size": 0}, {"rank": 0},
                                 {"parallel": "zero3"}, {"parallel": "fsdp", "method": "lora"}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(UserError):
        TrainConfig(**bad)


# --- pieces of the loop ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_factor_matches_transformers_schedules(schedule):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    make = get_linear_schedule_with_warmup if schedule == "linear" else \
        get_cosine_schedule_with_warmup
    sched = make(opt, num_warmup_steps=3, num_training_steps=11)
    for step in range(11):
        assert lr_factor(step, 11, 3, schedule) == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
        opt.step()
        sched.step()
    assert lr_factor(5, 11, 3, "constant") == 1.0


def test_decay_groups_exclude_biases_and_norm_layers():
    for model in (tiny_llama(), tiny_bert(), tiny_gpt2()):
        model.requires_grad_(True)
        decay, plain = decay_groups(model, 0.1)
        no_decay = {id(p) for p in plain["params"]}
        for module in model.modules():
            norm = "Norm" in type(module).__name__
            for name, p in module.named_parameters(recurse=False):
                expected = norm or name == "bias"
                assert (id(p) in no_decay) == expected, (type(module).__name__, name)
        assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
        assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))


def test_frozen_body_stores_no_body_activations_and_keeps_head_gradients():
    from loralab.costs.measure import SavedTensorTracker

    batch = collate([lm_data(n=4, ragged=False).splits["train"][i] for i in range(4)])
    results = {}
    for frozen in (False, True):
        model = tiny_gpt2().train()
        model.requires_grad_(False)
        from loralab.models.heads import untie_head
        untie_head(model)
        head = model.lm_head
        head.requires_grad_(True)
        tracker = SavedTensorTracker(skip={p.untyped_storage().data_ptr()
                                           for p in model.parameters()})
        ctx = frozen_body(model, [head]) if frozen else torch.enable_grad()
        with ctx, tracker.track():
            logits = model(input_ids=batch["input_ids"]).logits
        assert torch.is_grad_enabled()
        logits.float().logsumexp(-1).sum().backward()
        results[frozen] = (tracker.peak, head.weight.grad.clone())
    # same head gradient either way; under frozen_body only the head's input (and what follows
    # the head) is saved
    torch.testing.assert_close(results[True][1], results[False][1])
    hidden_bytes = 4 * 12 * 32 * 4  # the head's input: (B, T, d) fp32
    assert results[True][0] <= results[False][0]
    assert results[True][0] >= hidden_bytes


# --- the loss and its normalisation ---------------------------------------------------------

def test_first_step_equals_naive_reference_with_label_smoothing(tmp_path):
    """One full fine-tuning step vs a hand-written one: mean smoothed CE over all target tokens
    of the global batch, AdamW with decay groups, same lr."""
    data = lm_data(n=8)
    rec = run(tmp_path, data=data, method="full", max_steps=1, batch_size=4, grad_accum=2,
              label_smoothing=0.1, grad_clip=0.0, weight_decay=0.0, eval_every=0,
              keep_best=False)
    ref = tiny_gpt2().train()
    order = epoch_order(8, 0, 0).tolist()
    batch = collate([data.splits["train"][i] for i in order])
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                           label_smoothing=0.1)
    assert rec["curves"]["train_loss"][0][1] == pytest.approx(loss.item(), abs=1e-5)
    assert rec["curves"]["lr"][0][1] == 1e-2
    loss.backward()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    opt.step()
    from safetensors.torch import load_file

    trained = load_file(str(Path(rec["artifacts"]["model"]) / "model.safetensors"))
    for name, p in ref.state_dict().items():
        if name in trained:
            # Adam's first step is ~lr * sign(g): gradients at the 1e-8 scale (eps) amplify
            # rounding differences, so compare to 2% of one step
            torch.testing.assert_close(trained[name], p, atol=2e-4, rtol=0)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """batch 8 x accum 1 == batch 4 x accum 2 == batch 2 x accum 4, with ragged target counts."""
    data = lm_data(n=32)
    curves, weights = [], []
    for i, (bs, acc) in enumerate([(8, 1), (4, 2), (2, 4)]):
        rec = run(tmp_path, data=data, name=f"r{i}", method="lora", max_steps=3, batch_size=bs,
                  grad_accum=acc, keep_best=False, eval_every=0)
        curves.append([v for _, v in rec["curves"]["train_loss"]])
        from safetensors.torch import load_file

        weights.append(load_file(str(Path(rec["artifacts"]["adapter"]) /
                                     "adapter_model.safetensors")))
    # other micro-batch shapes sum in another order: losses (~4.8, log space) and adapter
    # weights agree to ~1e-7..1e-6 after 3 Adam steps; these keep >10x margin (checked with
    # OMP_NUM_THREADS=1 and with MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default)
    for c, w in zip(curves[1:], weights[1:], strict=True):
        assert c == pytest.approx(curves[0], abs=1e-5)
        for k in weights[0]:
            torch.testing.assert_close(w[k], weights[0][k], atol=1e-5, rtol=1e-4)


# --- strategies ----------------------------------------------------------------------------

def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_head_only_changes_only_the_head(tmp_path):
    model = tiny_gpt2()
    before = _params(model)
    rec = run(tmp_path, model=model, method="head", max_steps=3)
    after = _params(model)
    before["lm_head.weight"] = before["transformer.wte.weight"]  # tied before the run
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed == {"lm_head.weight"}
    assert rec["costs"]["trainable_params"] == 128 * 32
    assert Path(rec["artifacts"]["head"], "head.safetensors").exists()
    assert any("untied" in n for n in rec["notes"])
    assert "task head trained fully: lm_head (Linear, 4,096 parameters)" in rec["notes"]


@pytest.mark.parametrize("method,note", [
    ("none", None),
    ("full", None),
    ("lora", "task head frozen: lm_head (Linear, 4,096 parameters)"),
    ("lora-head",
     "task head trained fully (in the head phase): lm_head (Linear, 4,096 parameters)"),
])
def test_notes_say_exactly_which_head_modules_train(tmp_path, method, note):
    """The head note is read from the parameters that train: never a claim of a trained head
    for `none` or LoRA without the head."""
    rec = run(tmp_path, model=tiny_gpt2(), method=method, max_steps=2, eval_every=0,
              keep_best=False)
    heads = [n for n in rec["notes"] if n.startswith("task head")]
    assert heads == ([note] if note else [])


def test_lora_trains_adapters_and_saves_a_peft_adapter(tmp_path):
    model = tiny_llama()
    base = _params(model)
    rec = run(tmp_path, model=model, method="lora", preset="qv", rank=4, alpha=8, max_steps=3)
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad
        else:
            key = n.replace(".base.", ".")
            assert torch.equal(p, base[key]), n
    adapter = Path(rec["artifacts"]["adapter"])
    assert (adapter / "adapter_config.json").exists()
    # 2 layers x (q: 4*(32+32), v: 4*(32+16)); kv heads = 2 -> v_proj is 32 -> 16
    assert rec["costs"]["trainable_params"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert rec["costs"]["artifact_bytes"] > 0


def test_lora_head_switches_phase(tmp_path):
    model = tiny_gpt2()
    data = lm_data(n=32)
    rec = run(tmp_path, model=model, data=data, method="lora-head", epochs=2, max_steps=None,
              batch_size=8, head_epochs=1, keep_best=False)
    assert len(rec["curves"]["train_loss"]) == 8
    assert any("head only for 5-8" in n for n in rec["notes"])


def test_none_only_evaluates(tmp_path):
    model = tiny_gpt2()
    before = _params(model)
    rec = run(tmp_path, model=model, method="none")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert rec["curves"]["train_loss"] == [] and rec["costs"]["trainable_params"] == 0
    assert rec["metrics"]["validation"]["perplexity"] == pytest.approx(
        math.exp(rec["metrics"]["validation"]["loss"]))


def test_full_classification_learns_and_reports_metrics(tmp_path):
    rec = run(tmp_path, model=tiny_bert(), task="classify", method="full", epochs=6,
              max_steps=None, batch_size=8, lr=3e-3, eval_every=0)
    m = rec["metrics"]["validation"]
    assert set(m) >= {"loss", "accuracy", "precision", "recall", "f1"}
    assert m["accuracy"] >= 0.8
    assert rec["curves"]["train_loss"][-1][1] < rec["curves"]["train_loss"][0][1]


# --- precision and gradient checkpointing ------------------------------------------------------

def test_bf16_and_grad_checkpointing(tmp_path):
    data = lm_data(n=16)
    fp32 = run(tmp_path, data=data, name="a", max_steps=2, keep_best=False)
    ckpt = run(tmp_path, data=data, name="b", max_steps=2, keep_best=False,
               grad_checkpointing=True)
    bf16 = run(tmp_path, data=data, name="c", max_steps=2, keep_best=False, precision="bf16")
    a = [v for _, v in fp32["curves"]["train_loss"]]
    assert [v for _, v in ckpt["curves"]["train_loss"]] == pytest.approx(a, abs=1e-6)
    # recomputation runs the same kernels on the same inputs (1e-6 only for safety); bf16
    # (ulp 0.4%, native on AMX, emulated on AVX2) moved a loss of ~4.8 by < 5e-3 (measured):
    # 0.05 is 1%
    assert [v for _, v in bf16["curves"]["train_loss"]] == pytest.approx(a, abs=0.05)
    assert [v for _, v in bf16["curves"]["train_loss"]] != a
    # a CPU without native bf16 gets told that fp32 is the faster choice; fp32 runs are not
    emulated = [n for n in bf16["notes"] if n.startswith("bf16 on this cpu is emulated")]
    assert len(emulated) == (0 if measure.native_bf16("cpu") else 1)
    assert not [n for n in fp32["notes"] if "emulated" in n]


def test_resolve_precision_decisions():
    """auto -> bf16 only where bf16 is native; an explicit precision is kept either way."""
    from loralab.training.precision import resolve_precision

    assert TrainConfig().precision == "auto"
    for device in ("cpu", "cuda", torch.device("cpu")):
        assert resolve_precision("auto", device, native_bf16=True) == "bf16"
        assert resolve_precision("auto", device, native_bf16=False) == "fp32"
        for native in (True, False):
            assert resolve_precision("fp32", device, native_bf16=native) == "fp32"
            assert resolve_precision("bf16", device, native_bf16=native) == "bf16"
    # without a given answer the device is asked (measure.native_bf16, the CPU's flags here)
    assert resolve_precision("auto", "cpu") == ("bf16" if measure.native_bf16("cpu") else "fp32")
    with pytest.raises(UserError, match="unknown precision 'fp16'; use auto, fp32 or bf16"):
        resolve_precision("fp16", "cpu")


def test_precision_note_names_the_cpu_and_its_flags():
    from loralab.training.precision import precision_note

    amd = measure.CPUInfo(model="AMD EPYC 7B13", flags=("avx2", "fma"))
    amx = measure.CPUInfo(model="Intel Xeon 8481C", flags=measure.CPU_FLAGS)
    assert precision_note("auto", "fp32", "cpu", cpu=amd) == (
        "precision auto -> fp32: this CPU (AMD EPYC 7B13) has no native bf16 (no "
        "avx512_bf16/amx_bf16)")
    assert precision_note("auto", "bf16", "cpu", cpu=amx) == (
        "precision auto -> bf16: this CPU (Intel Xeon 8481C) has native bf16 "
        "(avx512_bf16/amx_bf16)")
    assert precision_note("fp32", "fp32", "cpu", cpu=amd) is None
    assert precision_note("auto", "bf16", "cuda") == "precision auto -> bf16: this cuda device " \
        "supports bf16"


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_run_records_both_and_computes_in_the_resolved_one(tmp_path, monkeypatch,
                                                                          native):
    """A run with precision auto records what was asked (config) and what it computed in (env),
    the CPU, and why; its losses and metrics are those of the explicit resolved precision
    (autocast and evaluation both follow it). The machine's answer is patched so both branches
    run here; bf16 on a CPU without it is emulated, slower but the same arithmetic."""
    from loralab.training.precision import precision_note

    monkeypatch.setattr(measure, "native_bf16", lambda device, cpu=None: native)
    resolved = "bf16" if native else "fp32"
    data = lm_data(n=16)
    auto = run(tmp_path, data=data, name="auto", max_steps=2, keep_best=False, precision="auto")
    same = run(tmp_path, data=data, name="same", max_steps=2, keep_best=False,
               precision=resolved)
    assert auto["config"]["precision"] == "auto" and auto["env"]["precision"] == resolved
    assert same["config"]["precision"] == same["env"]["precision"] == resolved
    assert auto["env"]["cpu"] == measure.cpu_info().to_dict()
    assert set(auto["env"]["cpu"]) == {"model", "flags", "native_bf16"}
    assert [n for n in auto["notes"] if n.startswith("precision auto")] == [
        precision_note("auto", resolved, "cpu")]
    assert not [n for n in same["notes"] if n.startswith("precision auto")]
    assert auto["curves"]["train_loss"] == same["curves"]["train_loss"]  # the same arithmetic
    assert auto["metrics"] == same["metrics"]
    assert auto["estimates"]["peak_flops_per_second"] == \
        same["estimates"]["peak_flops_per_second"]  # the MFU peak of the resolved dtype


def test_resumed_auto_run_keeps_the_precision_it_started_in(tmp_path, monkeypatch):
    """A run stopped under auto -> fp32 and resumed where auto would say bf16 finishes in fp32
    (one computation, not two halves in different precisions)."""
    monkeypatch.setattr(measure, "native_bf16", lambda device, cpu=None: False)
    monkeypatch.setenv("LORALAB_FAULT_NAN_AT_STEP", "3")
    data = lm_data(n=24)
    with pytest.raises(TrainingDiverged):
        run(tmp_path, data=data, max_steps=4, checkpoint_every=1, keep_best=False,
            precision="auto")
    monkeypatch.delenv("LORALAB_FAULT_NAN_AT_STEP")
    monkeypatch.setattr(measure, "native_bf16", lambda device, cpu=None: True)
    config = TrainConfig(model="tiny", task="lm", method="lora", out=str(tmp_path / "run"),
                         max_steps=4, batch_size=4, lr=1e-2, checkpoint_every=1,
                         keep_best=False)  # precision: the default, auto
    rec = train(config, resume=True, loaded=Loaded(tiny_gpt2()), task_data=data)
    assert rec["status"] == "finished" and rec["env"]["precision"] == "fp32"
    assert "precision auto -> fp32: kept from the run's start" in rec["notes"]


def test_evaluate_resolves_auto_for_its_device(monkeypatch):
    """evaluate() with precision auto equals evaluate() at the precision auto resolves to."""
    from dataclasses import replace

    from loralab.training.evaluate import evaluate

    model = tiny_gpt2().eval()
    data = lm_data(n=4, n_val=8)
    results = {}
    for native, resolved in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(measure, "native_bf16", lambda device, cpu=None, n=native: n)
        config = TrainConfig(model="tiny", task="lm", batch_size=4)
        auto = evaluate(model, data.splits["validation"], data.collate_fn, config)
        explicit = evaluate(model, data.splits["validation"], data.collate_fn,
                            replace(config, precision=resolved))
        assert auto == explicit
        results[resolved] = auto["loss"]
    assert results["bf16"] != results["fp32"]  # the two branches really differ


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_evaluate_scores_causal_lms_without_building_full_logits(make):
    """Evaluation takes a causal LM's loss from hidden states in chunks: the output head module
    is never called (no N x V logits), and loss and perplexity equal the logits path's, on
    ragged, padded, prompt-masked rows and with a LoRA-adapted head."""
    from dataclasses import replace

    from loralab.lora.config import LoRAConfig
    from loralab.lora.inject import apply_lora
    from loralab.training.evaluate import evaluate

    model = make()
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets="all"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    head_calls: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_calls.append(tuple(out.shape)))
    data = lm_data(n=4, n_val=11)
    config = TrainConfig(model="tiny", task="lm", batch_size=4, precision="fp32")
    fused = evaluate(model, data.splits["validation"], data.collate_fn, config)
    assert head_calls == []
    plain = evaluate(model, data.splits["validation"], data.collate_fn,
                     replace(config, fused_loss=False))
    assert head_calls and head_calls[0][-1] == model.config.vocab_size
    assert fused["targets"] == plain["targets"] > 0
    # chunked hidden-state loss vs full logits: other reduction order, ~1e-7 relative; the
    # perplexity is compared relatively (rel 1e-5 on exp(loss) = abs 1e-5 on the loss), not
    # absolutely (its size, ~128, would make an absolute tolerance CPU-dependent)
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert fused["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)


def test_final_evaluation_reuses_a_complete_evaluation_of_the_same_weights(tmp_path,
                                                                           monkeypatch):
    """The validation pass of the last step (or of the restored best step) is not run again at
    the end when it read every example; a partial one (eval_batches) is, over every example.
    The reused metrics equal a fresh evaluation of the final weights."""
    import loralab.training.evaluate as evaluate_module

    calls: list[tuple[int, int]] = []
    real = evaluate_module.evaluate

    def counting(model, dataset, collate_fn, config, device=None, max_batches=0,
                 progress=None):
        calls.append((len(dataset), max_batches))
        return real(model, dataset, collate_fn, config, device, max_batches, progress)

    monkeypatch.setattr(evaluate_module, "evaluate", counting)
    data = lm_data(n=16, n_val=40)  # 40 rows: two evaluation batches of 32
    model = tiny_gpt2()
    rec = run(tmp_path, model=model, data=data, name="a", max_steps=3, eval_every=1)
    assert calls == [(40, 0)] * 3  # steps 1, 2, 3; the final evaluation reused one of them
    best = min(rec["curves"]["val_loss"], key=lambda sv: sv[1])
    assert rec["metrics"]["validation"]["loss"] == best[1]  # exact: the same number, reused
    config = TrainConfig(model="tiny", task="lm", batch_size=4, precision="fp32")
    fresh = real(model, data.splits["validation"], data.collate_fn, config)
    # the same kernels on the same weights and batches: equal in practice; rel 1e-6 (not
    # exact) as the run's evaluation and this one are separate calls of evaluate
    assert fresh == pytest.approx(rec["metrics"]["validation"], rel=1e-6)

    calls.clear()
    run(tmp_path, data=data, name="b", max_steps=2, eval_every=1, eval_batches=1)
    assert calls == [(40, 1), (40, 1), (40, 0)]  # partial passes, then a complete final one
    calls.clear()
    run(tmp_path, data=lm_data(n=16, n_val=20), name="c", max_steps=2, eval_every=1,
        eval_batches=1)
    assert calls == [(20, 1), (20, 1)]  # one batch held every row: complete, reused


# --- the record, logging, evaluation schedule ------------------------------------------------

SCHEMA_COSTS = {"trainable_params", "total_params", "trainable_pct", "artifact_bytes",
                "train_seconds", "eval_seconds", "data_seconds", "tokens_per_second",
                "peak_memory_bytes", "peak_tensor_bytes", "train_flops", "mfu"}


def test_record_schema_tensorboard_and_eval_schedule(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = run(tmp_path, max_steps=None, epochs=2, batch_size=8, eval_every=4, data=lm_data(n=48))
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert on_disk == json.loads(json.dumps(rec, default=str))
    assert rec["status"] == "finished" and set(rec["costs"]) >= SCHEMA_COSTS
    assert set(rec) >= {"run_id", "config", "metrics", "curves", "artifacts", "env", "notes"}
    assert rec["config"]["method"] == "lora" and rec["env"]["torch"] == torch.__version__
    assert "git_revision" in rec["env"]
    # 6 steps per epoch: evaluations every 4 steps and at each epoch end
    assert [s for s, _ in rec["curves"]["val_loss"]] == [4, 6, 8, 12]
    c = rec["costs"]
    assert c["train_flops"] > 0 and 0 < c["mfu"] < 1 and c["tokens_per_second"] > 0
    assert c["peak_tensor_bytes"] > 0
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [s for s, _ in rec["curves"]["train_loss"]]
    assert [e.value for e in events] == pytest.approx(
        [v for _, v in rec["curves"]["train_loss"]], rel=1e-6)  # TensorBoard stores float32
    assert {"train/lr", "train/tokens_per_second", "val/loss",
            "memory/peak_rss_delta_bytes"} <= set(acc.Tags()["scalars"])
    hp = EventAccumulator(str(tmp_path / "run" / "tb" / "hparams"))
    hp.Reload()
    assert "hparams" in hp.PluginTagToContent("hparams") or hp.PluginTagToContent("hparams")


def test_existing_run_needs_resume(tmp_path):
    run(tmp_path, max_steps=1)
    with pytest.raises(UserError, match="--resume"):
        run(tmp_path, max_steps=1)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_gpt2()
    calls = {"n": 0}

    def poison(module, args, output):  # the 4th training forward (step 4) produces NaN
        if module.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return output * float("nan")
        return output

    model.transformer.h[0].mlp.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4.*last good checkpoint"):
        run(tmp_path, model=model, max_steps=6, checkpoint_every=2, eval_every=0)
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["status"] == "failed" and "nan" in rec["notes"][-1]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert saved["state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


# --- resume after SIGKILL --------------------------------------------------------------------

SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {tests!r} + "/training"]
from test_train import resumable_run
resumable_run({out!r}, {method!r}, {resume})
"""


def resumable_run(out: str, method: str, resume: bool) -> dict:
    """9 steps, 5 per epoch, evaluation every 4 and checkpoints every 2 steps, LoRA dropout."""
    config = TrainConfig(model="tiny", task="lm", method=method, out=str(out), max_steps=9,
                         batch_size=4, grad_accum=2, lr=1e-2, dropout=0.1, eval_every=4,
                         checkpoint_every=2, keep_best=False, warmup_steps=2, schedule="cosine",
                         precision="fp32")
    return train(config, resume=resume, loaded=Loaded(tiny_gpt2()), task_data=lm_data(n=40))


def _killed_run(out: Path, method: str, env: dict):
    """The run in a child process that SIGKILLs itself where the fault hook says."""
    script = SCRIPT.format(tests=str(REPO / "tests"), out=str(out), method=method, resume=False)
    return subprocess.run([PY, "-c", script], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def _final(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("method,fault,survivor", [
    ("lora", {"LORALAB_FAULT_KILL_AT_STEP": "7"}, 6),
    ("full", {"LORALAB_FAULT_KILL_IN_SAVE": "6"}, 5)])
def test_resume_after_sigkill_is_bit_identical(tmp_path, method, fault, survivor):
    """A run SIGKILLed mid-way (after step 7, between checkpoints; or inside the checkpoint
    write of step 6, after the temp file is written and before the rename) and resumed ends
    with exactly the weights, optimizer state and curves of an uninterrupted run."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    killed = _killed_run(cut, method, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    record = json.loads((cut / "record.json").read_text())
    assert record["status"] == "running"
    assert _final(cut)["state"]["step"] == survivor  # the last complete checkpoint survived
    resumable_run(ref, method, False)
    rec = resumable_run(cut, method, True)
    a, b = _final(ref), _final(cut)
    assert a["state"]["step"] == b["state"]["step"] == 9
    assert a["model"].keys() == b["model"].keys()
    # exact on purpose: the resumed run repeats the same kernels on the same inputs in the same
    # order on the same CPU, so any difference is a resume bug (RNG, data order, state)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["state"]["curves"]["train_loss"] == b["state"]["curves"]["train_loss"]
    assert rec["status"] == "finished"
    assert any(f"resumed from step {survivor}" in n for n in rec["notes"])
    assert [s for s, _ in rec["curves"]["train_loss"]] == list(range(1, 10))


# --- end to end with the bundled pieces -------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_minilm_lora_on_rt_snippets(tmp_path, capsys):
    """Real model (bundled all-MiniLM-L6), real data (rt-snippets), LoRA for a few steps through
    the CLI; then `loralab eval` on the run directory reproduces the run's validation metrics."""
    from loralab.cli.main import main
    from loralab.models.loading import load_model

    try:
        load_model("minilm-l6", "classify")
    except UserError as exc:
        pytest.skip(f"bundled model not installed: {exc}")
    out = tmp_path / "run"
    code = main(["train", "--model", "minilm-l6", "--task", "classify", "--data", "rt-snippets",
                 "--method", "lora", "--rank", "4", "--max-steps", "4", "--batch-size", "8",
                 "--seq-len", "32", "--data-fraction", "0.05", "--lr", "1e-3",
                 "--out", str(out)])
    assert code == 0
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "finished" and rec["costs"]["data_seconds"] > 0
    assert 0 < rec["costs"]["trainable_pct"] < 1
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    printed = capsys.readouterr().out
    assert rec["notes"] and all(f"note: {note}" in printed for note in rec["notes"])
    assert main(["eval", str(out), "--split", "validation", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["validation"]
    assert again["loss"] == pytest.approx(rec["metrics"]["validation"]["loss"], abs=1e-5)
    assert again["accuracy"] == rec["metrics"]["validation"]["accuracy"]


def test_prepare_model_uses_seeded_dropout_and_attention_for_training_methods():
    """full and LoRA swap the model's nn.Dropout layers for SeededDropout and switch attention
    dropout to loralab's attention function; head-only training (a frozen body run without
    gradients) leaves the model's modules as they are."""
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    from loralab.kernels.attention import NAME
    from loralab.lora.dropout import SeededDropout
    from loralab.training.config import make_config
    from loralab.training.strategies.base import strategy_for

    for method, swapped in (("lora", True), ("full", True), ("head", False)):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                           n_positions=32))
        strategy_for(make_config(model="tiny", task="lm", data="synthetic", method=method,
                                 out="unused")).prepare(model)
        kinds = {type(m) for m in model.modules()}
        assert (SeededDropout in kinds) == swapped and (nn.Dropout in kinds) != swapped, method
        assert (model.config._attn_implementation == NAME) == swapped, method


def test_final_evaluation_is_announced_shown_and_can_be_bounded(tmp_path, capsys):
    """Issue 23: `loralab train` said nothing while its final evaluation ran for minutes. It
    now says up front what the final evaluation covers, shows batches and elapsed time (plain
    lines when stderr is not a terminal), and eval_max_examples bounds every evaluation split
    to the same fixed subset a study takes; the metrics are those of that subset."""
    from loralab.data.tasks import subsample
    from loralab.training.evaluate import evaluate

    data = lm_data(n=16, n_val=40)
    data.splits["test"] = lm_data(n=4, n_val=40, seed=2).splits["validation"]
    rec = run(tmp_path, data=data, method="none", precision="fp32", eval_max_examples=35)
    err = capsys.readouterr().err
    assert ("final evaluation after training: validation 35 examples (2 x 32-row batches), "
            "test 35 examples (2 x 32-row batches); bounded by eval_max_examples=35") in err
    for split in ("validation", "test"):
        assert f"final evaluation, {split}: 1/2 batches, 00:00:" in err
        assert f"final evaluation, {split}: 2/2 batches in " in err
        # the naive reference: the untouched model evaluated on the study's subset. Same
        # kernels and batch order in fp32, so only summation-order noise (rel 1e-5) remains.
        ref = evaluate(tiny_gpt2(), subsample(data.splits[split], 35), collate,
                       TrainConfig(task="lm", batch_size=4, precision="fp32"))
        assert rec["metrics"][split]["targets"] == ref["targets"]
        assert rec["metrics"][split]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    with pytest.raises(UserError, match="eval_max_examples"):
        TrainConfig(eval_max_examples=-1)


# --- heads of several layers are trained, saved and reloaded whole --------------------------

@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
    """Base checkpoints without a classification head, as a user's: tiny random DistilBERT and
    RoBERTa masked LMs (dim 64) with the bundled BERT tokenizer, and a 2-class CSV."""
    import csv
    import random

    from transformers import (
        AutoTokenizer,
        DistilBertConfig,
        DistilBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    from loralab import bundled

    work = tmp_path_factory.mktemp("heads")
    tok = AutoTokenizer.from_pretrained(str(bundled.minilm_dir()))
    torch.manual_seed(0)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tok), dim=64, hidden_dim=128,
                                           n_layers=2, n_heads=2)).save_pretrained(
        work / "distilbert")
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     pad_token_id=tok.pad_token_id,
                                     max_position_embeddings=64)).save_pretrained(
        work / "roberta")
    for name in ("distilbert", "roberta"):
        tok.save_pretrained(work / name)
    rng = random.Random(0)
    with open(work / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(160):
            word = rng.choice(["good", "great", "fine"] if i % 2 else ["bad", "awful", "dull"])
            w.writerow([f"the film {i} was {word} and long", i % 2])
    return work


# model, method, head note, PEFT modules_to_save (None: head-only run, head.safetensors)
DISTILBERT_HEAD = "pre_classifier (Linear, 4,160 parameters) + classifier (Linear, 130 parameters)"
HEAD_RUNS = [
    ("distilbert", "head", DISTILBERT_HEAD, None),
    ("distilbert", "lora-head", DISTILBERT_HEAD, ["pre_classifier", "classifier"]),
    ("roberta", "lora", "classifier (RobertaClassificationHead, 4,290 parameters)",
     ["classifier"]),
]


@pytest.mark.parametrize("model,method,note,to_save", HEAD_RUNS)
def test_multilayer_head_is_trained_saved_and_reproduced(base_checkpoints, tmp_path, model,
                                                         method, note, to_save):
    """The head_multilayer case: every module of the head trains and is saved, and evaluating
    the saved run gives the test loss the run recorded, whatever the torch RNG state (a head
    module left out of the file would be re-drawn at random on each reload)."""
    from safetensors import safe_open

    from loralab.study.runs import evaluate_saved

    out = tmp_path / "run"
    rec = train(make_config({
        "model": str(base_checkpoints / model), "task": "classify",
        "data": str(base_checkpoints / "data.csv"), "method": method, "rank": 4, "max_steps": 6,
        "head_epochs": 0.25, "batch_size": 16, "lr": 1e-2, "seq_len": 16, "out": str(out),
        "compile": "off", "precision": "fp32", "eval_every": 0}))
    if to_save is None:
        assert rec["costs"]["trainable_params"] == 4160 + 130  # pre_classifier + classifier
        path = Path(rec["artifacts"]["head"], "head.safetensors")
        with safe_open(str(path), "pt") as f:
            assert sorted(f.keys()) == ["classifier.bias", "classifier.weight",
                                        "pre_classifier.bias", "pre_classifier.weight"]
    else:
        adapter = Path(rec["artifacts"]["adapter"])
        assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] \
            == to_save
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            heads = {k for k in f.keys() if "lora_" not in k}  # noqa: SIM118 (not a dict)
        prefix = "base_model.model."
        expected = ({f"{prefix}{m}.{p}" for m in to_save for p in ("weight", "bias")}
                    if model == "distilbert" else
                    {f"{prefix}classifier.{m}.{p}" for m in ("dense", "out_proj")
                     for p in ("weight", "bias")})
        assert heads == expected
    recorded = rec["metrics"]["test"]["loss"]
    for seed in (1, 2):
        torch.manual_seed(seed)
        again = evaluate_saved(run_dir=out, splits=("test",))["test"]["loss"]
        # the same fp32 weights on the same batches, in the same process: only the
        # training-time module swaps (seeded dropout, lean MLPs; no-ops in evaluation) differ,
        # so at most fp32 rounding of a mean over the test rows (~1e-7) can separate the two
        # (measured: identical); a head module re-drawn at random moves the loss by ~1e-2
        assert again == pytest.approx(recorded, abs=1e-6)
    assert f"task head trained fully: {note}" in rec["notes"]


def test_frozen_body_gives_every_head_module_its_gradient():
    """DistilBERT's head is pre_classifier -> ReLU -> classifier: grad must start at the first
    head module, or pre_classifier would train on nothing in head-only steps."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from loralab.models.heads import task_head_modules

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=128, dim=32, hidden_dim=64, n_layers=1, n_heads=2, dropout=0.0,
        seq_classif_dropout=0.0)).eval()
    model.requires_grad_(False)
    model.pre_classifier.requires_grad_(True)
    model.classifier.requires_grad_(True)
    x = torch.randint(0, 128, (2, 8))
    grads = []
    for ctx in (torch.enable_grad(), frozen_body(model, list(task_head_modules(model).values()))):
        model.zero_grad()
        with ctx:
            logits = model(input_ids=x).logits
        logits.square().sum().backward()
        grads.append(model.pre_classifier.weight.grad.clone())
    # same graph above pre_classifier either way: bitwise-equal fp32 gradients
    assert torch.equal(grads[0], grads[1]) and grads[1].abs().sum() > 0


# --- the study's hooks: extra costs and results after the final evaluation ---------------------

def test_extra_costs_and_after_evaluation_reach_the_record_and_the_trackers(tmp_path,
                                                                              monkeypatch):
    """`extra_costs` are merged into the record's costs, `after_evaluation` runs once (rank 0)
    after the final evaluation with the trained model, and what it returns is in the record
    written to disk and in the trackers' final values, so nothing patches record.json later."""
    from loralab.training.logger import Logger
    from loralab.training.record import ExtraResults

    closed: list[dict] = []
    real_close = Logger.close

    def close(self, hparams=None, metrics=None):
        closed.append(dict(metrics or {}))
        return real_close(self, hparams, metrics)

    monkeypatch.setattr(Logger, "close", close)
    seen = []

    def after(model, tokenizer, record):
        seen.append((model, tokenizer, record["status"], dict(record["metrics"])))
        return ExtraResults(metrics={"validation": {"bleu": 12.5}, "gen": {"rouge": 0.5}},
                            costs={"generation_seconds": 2.0}, notes=["scored generations"])

    model = tiny_gpt2()
    config = TrainConfig(model="tiny", task="lm", method="lora", out=str(tmp_path / "run"),
                         max_steps=2, batch_size=4, lr=1e-2, warmup_steps=0, precision="fp32")
    rec = train(config, loaded=Loaded(model), task_data=lm_data(n=16),
                extra_costs={"load_seconds": 1.5, "data_seconds": 0.25,
                             "data_from_cache": False},
                after_evaluation=after)
    assert len(seen) == 1 and seen[0][0] is model and seen[0][2] == "finished"
    assert "loss" in seen[0][3]["validation"]
    assert rec["metrics"]["validation"]["bleu"] == 12.5 and "loss" in rec["metrics"]["validation"]
    assert rec["metrics"]["gen"] == {"rouge": 0.5}
    costs = rec["costs"]
    assert (costs["load_seconds"], costs["data_seconds"], costs["data_from_cache"],
            costs["generation_seconds"]) == (1.5, 0.25, False, 2.0)
    assert list(costs)[-3:] == ["load_seconds", "data_from_cache", "generation_seconds"]
    assert rec["notes"][-1] == "scored generations"
    assert json.loads((tmp_path / "run" / "record.json").read_text()) == \
        json.loads(json.dumps(rec))
    final = closed[-1]
    assert final["gen/rouge"] == 0.5 and final["validation/bleu"] == 12.5
    assert final["costs/generation_seconds"] == 2.0 and final["costs/load_seconds"] == 1.5
    # a finished run resumed returns its record untouched: the hook does not run again
    again = train(config, resume=True, loaded=Loaded(tiny_gpt2()), task_data=lm_data(n=16),
                  after_evaluation=after)
    assert len(seen) == 1 and again == json.loads(json.dumps(rec))


def test_a_method_that_leaves_nothing_trainable_is_a_one_line_error(tmp_path, monkeypatch):
    """A method that trains nothing on this model (the CONTRIBUTING example, BitFit, on a
    LLaMA without biases) stops before anything is written, with one line, instead of AdamW's
    'empty parameter list' traceback after record.json exists."""
    from loralab.training.strategies.head import HeadOnly

    monkeypatch.setattr(HeadOnly, "trainable_parameters", lambda self, model: [])
    with pytest.raises(UserError, match="method 'head' leaves no parameter of tiny trainable"):
        run(tmp_path, method="head")
    assert not (tmp_path / "run").exists()
