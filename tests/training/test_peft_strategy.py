"""Method `peft` (loralab.training.strategies.peft): PEFT's own implementation through loralab's
loop. PEFT LoRA against loralab LoRA with the same A (the loop's curves agree), the PEFT config
filled from the run's fields, classify with the head as modules_to_save, the saved adapter
rebuilt with PeftModel.from_pretrained, merged export, LoRA+ on PEFT's factors, resume, other
PEFT types, and one-line errors for bad mappings (exit 2 via the CLI)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_bert, tiny_llama
from loralab.errors import ConfigError, UserError
from loralab.lora.config import LoRAConfig
from loralab.lora.inject import apply_lora, lora_modules
from loralab.training import loop
from loralab.training.config import TrainConfig, make_config
from loralab.training.strategies import peft as peft_strategy
from loralab.training.strategies.base import strategy_for, strategy_named
from test_train import Loaded, lm_data, run


def _peft_lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_config_is_filled_from_the_run_fields():
    model = tiny_llama()
    config = TrainConfig(method="peft", task="lm", rank=4, alpha=8, dropout=0.1, rslora=True,
                         preset="attn", peft={"lora_alpha": 2})
    cfg, _ = peft_strategy.peft_config(config, model)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora) == (4, 2, 0.1, True)
    assert sorted(cfg.target_modules) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv")
    assert str(cfg.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    variant, _ = peft_strategy.peft_config(
        TrainConfig(method="peft", task="lm", dora=True, init="gaussian"), model)
    assert variant.use_dora is True and variant.init_lora_weights == "gaussian"
    ia3, _ = peft_strategy.peft_config(
        TrainConfig(method="peft", task="classify", peft={"type": "ia3"}), tiny_bert())
    assert type(ia3).__name__ == "IA3Config" and ia3.modules_to_save == ["classifier"]


@pytest.mark.slow
def test_peft_lora_matches_loralab_lora_given_the_same_a(tmp_path, monkeypatch):
    """PEFT's LoRA draws A from the same kaiming law but consumes more random numbers, so the
    same seed gives other A matrices. Given loralab's A (B = 0 in both), the loop's loss
    curves agree to float rounding: the same function, gradients and AdamW steps."""
    reference = tiny_llama()
    torch.manual_seed(0)  # as train() seeds right before the strategy adds the adapters
    reference = apply_lora(reference, LoRAConfig(rank=4, alpha=8, targets="qv"))
    a_of = {n: m.lora_A.detach().clone() for n, m in lora_modules(reference)}
    original = peft_strategy.PEFTAdapters.make_trainable

    def with_loralab_a(self, model):
        original(self, model)
        layers = _peft_lora_layers(model)
        assert sorted(layers) == sorted(a_of)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A["default"].weight.copy_(a_of[name])

    monkeypatch.setattr(peft_strategy.PEFTAdapters, "make_trainable", with_loralab_a)
    kw = dict(max_steps=5, rank=4, alpha=8, preset="qv", seed=0)
    ours = run(tmp_path, model=tiny_llama(), name="lora", method="lora", **kw)
    theirs = run(tmp_path, model=tiny_llama(), name="peft", method="peft", **kw)
    a = [v for _, v in ours["curves"]["train_loss"]]
    b = [v for _, v in theirs["curves"]["train_loss"]]
    assert a[0] == pytest.approx(b[0], abs=1e-6)
    assert a == pytest.approx(b, rel=1e-5)
    assert a[-1] != a[0]  # it trained
    assert ours["costs"]["trainable_params"] == theirs["costs"]["trainable_params"]
    assert (ours["estimates"]["flops_per_token"] == theirs["estimates"]["flops_per_token"])


@pytest.mark.slow
def test_classify_run_saves_a_peft_adapter_that_rebuilds_the_model(tmp_path):
    model = tiny_bert()
    base = copy.deepcopy(model.state_dict())
    rec = run(tmp_path, model=model, task="classify", method="peft", rank=4, alpha=8,
              max_steps=4)
    adapter = tmp_path / "run" / "adapter"
    assert rec["artifacts"]["adapter"] == str(adapter)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    assert "classifier" in saved["modules_to_save"]
    assert not (adapter / "README.md").exists()
    assert rec["costs"]["artifact_bytes"] > 0 and rec["costs"]["tokens_per_second"] > 0
    assert any("modules_to_save" in n for n in rec["notes"])
    x = {"input_ids": torch.randint(1, 128, (3, 10))}
    model.eval()
    with torch.no_grad():
        trained = model(**x).logits
    fresh = tiny_bert()
    fresh.load_state_dict(base)
    rebuilt = strategy_named("peft").rebuild_recorded(fresh, adapter, None)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**x).logits, trained, atol=1e-5, rtol=1e-5)
        head = copy.deepcopy(base)
        assert not torch.equal(trained, _logits(head, x))  # the adapter and head changed it
        merged, note = strategy_named("peft").float_export(rebuilt, None)
        assert note is None and not _peft_lora_layers(merged)
        torch.testing.assert_close(merged(**x).logits, trained, atol=1e-4, rtol=1e-4)


def _logits(state, x):
    model = tiny_bert()
    model.load_state_dict(state)
    model.eval()
    return model(**x).logits


def test_lora_plus_selects_peft_factors_by_object(tmp_path):
    config = TrainConfig(method="peft", task="lm", rank=4, lr_ratio=8.0)
    strategy = strategy_for(config)
    model = tiny_llama()
    strategy.prepare(model)
    a, b = strategy.lora_factors(model)
    layers = _peft_lora_layers(model)
    assert len(a) == len(b) == len(layers) == 4
    assert all(p.shape[0] == 4 for p in a) and all(p.shape[1] == 4 for p in b)
    rec = run(tmp_path, model=tiny_llama(), method="peft", lr_ratio=8.0, max_steps=2)
    groups = torch.load(tmp_path / "run" / "checkpoints" / "last.pt",
                        weights_only=False)["optimizer"]["param_groups"]
    assert sorted(g["lr_multiplier"] for g in groups) == [1.0, 8.0]
    assert rec["status"] == "finished"


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_peft_run_resumes_bit_identically(tmp_path, monkeypatch):
    cfg = dict(model="tiny", task="lm", method="peft", max_steps=5, batch_size=4, lr=1e-2,
               checkpoint_every=2, keep_best=False, warmup_steps=1, dropout=0.1,
               schedule="cosine", precision="fp32")

    def go(name: str, resume: bool = False) -> dict:
        config = TrainConfig(out=str(tmp_path / name), **cfg)
        return loop.train(config, resume=resume, loaded=Loaded(tiny_llama()),
                          task_data=lm_data(n=40))

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
    assert a["model"].keys() == b["model"].keys() and any("lora_B" in k for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert ref["curves"]["train_loss"] == rec["curves"]["train_loss"]


def test_other_peft_types_train(tmp_path):
    rec = run(tmp_path, model=tiny_bert(), task="classify", method="peft", max_steps=2,
              peft={"type": "IA3"})
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"
    # IA3: one scaling vector per adapted layer (4 layers of width 32) + the head's copy
    head = sum(p.numel() for p in tiny_bert().classifier.parameters())
    assert rec["costs"]["trainable_params"] == 4 * 32 + head
    # the artefact loads: IA3's feedforward_modules must be a subset of its target_modules
    # (PEFT's BERT default names output.dense, not among the attention targets)
    assert set(saved["feedforward_modules"]) <= set(saved["target_modules"])
    from peft import PeftModel

    PeftModel.from_pretrained(tiny_bert(), tmp_path / "run" / "adapter")


def test_ia3_feedforward_modules_follow_the_targets():
    ia3, _ = peft_strategy.peft_config(TrainConfig(
        method="peft", task="classify", preset="attn-proj-ffn", peft={"type": "ia3"}),
        tiny_bert())
    assert ia3.feedforward_modules and set(ia3.feedforward_modules) < set(ia3.target_modules)
    assert all(name.endswith(("intermediate.dense", "output.dense"))
               for name in ia3.feedforward_modules)


@pytest.mark.parametrize("mapping,match", [
    ({"rr": 8}, "unknown key 'rr' for LoraConfig; did you mean 'r'"),
    ({"type": "LoRAA"}, "unknown PEFT type 'LoRAA'.*did you mean LORA"),
    ({"type": "AdaLoRA"}, "'AdaLoRA' is not supported.*update_and_allocate"),
    ({"type": "prompt_tuning"}, "not supported.*virtual tokens"),
])
def test_bad_mappings_are_one_line_errors(mapping, match):
    with pytest.raises(UserError, match=match) as exc:
        peft_strategy.check_mapping(mapping)
    assert "\n" not in str(exc.value)


def test_variants_peft_cannot_express_are_refused():
    with pytest.raises(UserError, match="IA3 has no 'use_dora'"):
        peft_strategy.peft_config(
            TrainConfig(method="peft", dora=True, peft={"type": "IA3"}), tiny_bert())
    with pytest.raises(UserError, match="init 'pissa' with method peft"):
        peft_strategy.peft_config(TrainConfig(method="peft", init="pissa"), tiny_bert())


def test_peft_field_coercion_and_checks():
    assert make_config(method="peft", peft='{"r": 4, "type": "IA3"}').peft == {
        "r": 4, "type": "IA3"}
    assert make_config(method="peft", peft="{r: 4}").peft == {"r": 4}
    config = TrainConfig(method="peft", peft={"r": 4})
    assert hash(config) == hash(TrainConfig(method="peft", peft={"r": 8}))  # hashable
    assert config.to_dict()["peft"] == {"r": 4} and TrainConfig().to_dict()["peft"] is None
    with pytest.raises(ConfigError, match="must be a mapping") as exc:
        make_config(method="peft", peft="[1, 2]")
    assert exc.value.key == "peft"
    with pytest.raises(ConfigError, match="applies to method peft"):
        TrainConfig(method="lora", peft={"r": 4})


def test_cli_bad_mapping_exits_2(tmp_path, capsys):
    from loralab.cli.main import main

    code = main(["train", "--model", "minilm-l6", "--method", "peft", "--peft", '{"rr": 8}',
                 "--max-steps", "1", "--out", str(tmp_path / "run"), "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key 'rr'" in err and "Traceback" not in err
    code = main(["train", "--method", "peft", "--peft", "[1]", "--out", str(tmp_path / "r2")])
    assert code == 2 and "must be a mapping" in capsys.readouterr().err



# --- in a study ------------------------------------------------------------------------------

PEFT_STUDY = """\
name: peft-rows
model: minilm-l6
task: classify
num_labels: 2
data: {name: rt-snippets, fraction: 0.02}
eval: [{name: rt-snippets, data: rt-snippets, max_examples: 32}]
budget: {max_steps: 2, batch_size: 8, seq_len: 32, lr: 1.0e-3, eval_max_examples: 16}
strategies:
  - {name: lora-r2, method: lora, preset: qv, rank: 2, alpha: 4}
  - {name: peft-lora, method: peft, preset: qv, rank: 2, alpha: 4}
  - {name: peft-ia3, method: peft, peft: {type: IA3}}
"""


def test_study_peft_key_checks_and_config_hash():
    from pathlib import Path

    from loralab.study.plan import run_config, to_train_config
    from loralab.study.spec import parse_study

    study = parse_study(PEFT_STUDY, source="s.yaml")
    by = {s.name: s for s in study.strategies}
    assert by["peft-ia3"].peft == {"type": "IA3"} and by["lora-r2"].peft is None
    configs = {s.name: run_config(study, s, 0, Path("x")) for s in study.strategies}
    assert "peft" not in configs["lora-r2"] and "peft" not in configs["peft-lora"]
    assert configs["peft-ia3"]["peft"] == {"type": "IA3"}
    assert to_train_config(configs["peft-ia3"]).peft == {"type": "IA3"}
    for bad, match in [
        ("{name: x, method: lora, peft: {r: 4}}", "s.yaml:12: strategy 'x': 'peft' only applies"),
        ("{name: x, method: peft, peft: {rr: 4}}", "s.yaml:12: strategy 'x': peft: unknown key"),
        ("{name: x, method: peft, peft: {type: adalora}}", "s.yaml:12: .*not supported"),
    ]:
        with pytest.raises(UserError, match=match):
            parse_study(PEFT_STUDY + f"  - {bad}\n", source="s.yaml")


@pytest.mark.slow
def test_study_puts_peft_rows_next_to_loralab_rows(tmp_path):
    """A MiniLM study through `loralab compare`: loralab LoRA, PEFT LoRA at the same rank,
    alpha and targets, and PEFT IA3, trained and measured alike; the report marks each row's
    implementation."""
    import csv

    from loralab.cli.main import main
    from loralab.results.database import ResultsDB

    path = tmp_path / "s.yaml"
    path.write_text(PEFT_STUDY)
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 0
    root = tmp_path / "out" / "peft-rows"
    with ResultsDB(root / "results.sqlite") as db:
        rows = {r["strategy"]: r for r in db.list_runs()}
    assert {r["status"] for r in rows.values()} == {"finished"}
    lora, peft_lora, ia3 = rows["lora-r2"], rows["peft-lora"], rows["peft-ia3"]
    assert lora["costs"]["trainable_params"] == peft_lora["costs"]["trainable_params"]
    assert ia3["costs"]["trainable_params"] < lora["costs"]["trainable_params"]
    for r in (lora, peft_lora, ia3):
        assert r["costs"]["artifact_bytes"] > 0 and r["costs"]["tokens_per_second"] > 0
        assert 0.0 <= r["metrics"]["rt-snippets"]["f1"] <= 1.0
    md = (root / "report.md").read_text()
    assert "| lora-r2 | lora | loralab |" in md and "| peft-lora | peft | PEFT LoRA |" in md
    assert "| peft-ia3 | peft | PEFT IA3 |" in md
    with open(root / "results.csv", newline="") as f:
        marks = {r["strategy"]: r["implementation"] for r in csv.DictReader(f)}
    assert marks == {"untuned": "–", "lora-r2": "loralab", "peft-lora": "PEFT LoRA",
                     "peft-ia3": "PEFT IA3"}
