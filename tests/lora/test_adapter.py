"""Adapters in PEFT's format: loralab -> PEFT and PEFT -> loralab give the same logits."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab import LoRAConfig, apply_lora, load_adapter, save_adapter
from loralab.errors import UserError
from loralab.lora.inject import lora_modules
from loralab.lora.layer import LoRALinear
from loralab.lora.peft_fields import FIELDS, check_lora_config, is_off

warnings.filterwarnings("ignore", category=UserWarning)


def _trained(make, preset: str, train_head: bool = False, rank: int = 4, rslora=False):
    """A model with adapters whose B is non-zero (as after training) and a perturbed head."""
    model = make()
    apply_lora(model, LoRAConfig(rank=rank, alpha=32, targets=preset, train_head=train_head,
                                 rslora=rslora))
    torch.manual_seed(3)
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    if train_head:
        head = model.get_output_embeddings() if hasattr(model, "lm_head") else model.classifier
        with torch.no_grad():
            head.weight.add_(torch.randn_like(head.weight) * 0.1)
    return model.eval()


def _fresh(make):
    """The base model as a user would load it again; a classifier head is re-initialised
    differently, so the adapter must carry it."""
    model = make()
    if hasattr(model, "classifier"):
        torch.manual_seed(99)
        model.classifier.reset_parameters()
    return model


CASES = [
    (tiny_gpt2, "qv", False), (tiny_gpt2, "attn-proj-ffn", True), (tiny_gpt2, "all", False),
    (tiny_llama, "qv", False), (tiny_llama, "attn-proj-ffn", True), (tiny_llama, "all", False),
    (tiny_bert, "qv", False), (tiny_bert, "attn-proj", True), (tiny_bert, "all", False),
]


@pytest.mark.parametrize("make,preset,train_head", CASES)
def test_peft_loads_loralab_adapter(tmp_path, make, preset, train_head):
    model = _trained(make, preset, train_head)
    x = torch.randint(0, 128, (2, 12))
    expected = model(x).logits
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(_fresh(make), tmp_path).eval()
    got = peft_model(x).logits
    # PEFT's composition vs loralab's kernel: fp32 sums in another order; logits |.| <= 4 here,
    # measured <= 7.8e-7 apart (also with MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default),
    # >10x inside 1e-5; an adapter left out or mis-scaled moves them by ~1e-2..1
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("make,preset,train_head", CASES)
def test_loralab_round_trip(tmp_path, make, preset, train_head):
    model = _trained(make, preset, train_head, rslora=True)
    x = torch.randint(0, 128, (2, 12))
    expected = model(x).logits
    save_adapter(model, tmp_path)
    loaded = load_adapter(_fresh(make), tmp_path).eval()
    # the same loralab kernels on the same weights: 0 measured; 1e-5 as for PEFT above
    assert (loaded(x).logits - expected).abs().max().item() <= 1e-5
    # the fused c_attn comes back in its compact sliced form (same parameter count)
    assert [m.slices for _, m in lora_modules(loaded)] == [m.slices for _, m in lora_modules(model)]
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("make,targets,to_save", [
    (tiny_gpt2, ["c_attn", "c_proj"], None),
    (tiny_llama, ["q_proj", "v_proj", "down_proj"], ["lm_head"]),
    (tiny_bert, ["query", "value"], ["classifier"]),
])
def test_loralab_loads_peft_adapter(tmp_path, make, targets, to_save):
    base = make()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, modules_to_save=to_save,
                        fan_in_fan_out=make is tiny_gpt2, rank_pattern={targets[0]: 8},
                        alpha_pattern={targets[-1]: 4})
    peft_model = get_peft_model(base, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.eval()
    x = torch.randint(0, 128, (2, 12))
    expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(_fresh(make), tmp_path).eval()
    assert (loaded(x).logits - expected).abs().max().item() <= 1e-5
    ranks = {n.split(".")[-1]: m.rank for n, m in lora_modules(loaded)}
    assert ranks[targets[0]] == 8


def test_saved_files_use_peft_names(tmp_path):
    model = _trained(tiny_gpt2, "qv")
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["r"] == 4 and config["rank_pattern"]["transformer.h.0.attn.c_attn"] == 8
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (96, 8)
    assert torch.count_nonzero(b[32:64]) == 0          # no update on k
    assert not (tmp_path / "adapter_model.bin").exists()


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(tiny_gpt2(), tmp_path / "nope")


def test_pickle_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UserError, match="pickle"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_corrupt_weights(tmp_path):
    save_adapter(_trained(tiny_gpt2, "qv"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_malformed_config(tmp_path):
    save_adapter(_trained(tiny_gpt2, "qv"), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_adapter_for_another_model(tmp_path):
    save_adapter(_trained(tiny_gpt2, "qv"), tmp_path)
    with pytest.raises(UserError, match="does not fit"):
        load_adapter(tiny_llama(), tmp_path)


def test_wrong_shapes(tmp_path):
    save_adapter(_trained(tiny_llama, "qv"), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(UserError, match="does not fit"):
        load_adapter(wider, tmp_path)


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    """Writes are atomic: a crash mid-save leaves the earlier adapter intact and loadable."""
    model = _trained(tiny_gpt2, "qv")
    save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("loralab.lora.adapter.save_file", boom)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    load_adapter(tiny_gpt2(), tmp_path)


def test_dora_is_refused(tmp_path):
    save_adapter(_trained(tiny_llama, "qv"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="DoRA"):
        load_adapter(tiny_llama(), tmp_path)


def test_no_lora_tensors(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="no lora_A"):
        load_adapter(tiny_llama(), tmp_path)


def test_loaded_adapter_is_trainable(tmp_path):
    save_adapter(_trained(tiny_llama, "qv"), tmp_path)
    model = load_adapter(tiny_llama(), tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(isinstance(m, LoRALinear) for _, m in lora_modules(model))


# --- issue 19: an allow-list of PEFT LoraConfig fields (peft_fields.FIELDS) --------------------

def _peft_adapter(tmp_path, config: LoraConfig, make=tiny_llama):
    """(base, PEFT model with non-zero A and B, adapter directory) saved by real PEFT."""
    base = make()
    peft_model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(tmp_path)
    return base, peft_model.eval(), tmp_path


def test_alora_adapter_is_refused(tmp_path):
    """The case alora_adapter.py: an Activated-LoRA adapter loaded as a plain LoRA changed the
    positions before the invocation tokens (up to 0.76 in the logits against PEFT)."""
    x = torch.randint(0, 128, (1, 12))
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj"],
                        alora_invocation_tokens=x[0, 6:8].tolist())
    base, peft_model, directory = _peft_adapter(tmp_path, config)
    with torch.no_grad():
        change = (peft_model(input_ids=x).logits - base(input_ids=x).logits).abs()
    # PEFT's aLoRA: exactly the base model before the invocation, adapted from it on
    assert change[0, :6].max().item() == 0.0 and change[0, 6:].max().item() > 1e-3
    with pytest.raises(UserError, match="alora_invocation_tokens") as info:
        load_adapter(copy.deepcopy(base), directory)
    assert "\n" not in str(info.value) and "load it with PEFT" in str(info.value)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LoraConfig)])
def test_every_peft_lora_field_is_classified(field):
    """A field a new PEFT adds fails here until it is classified in peft_fields.FIELDS; PEFT's
    default value of every field (what a plain LoRA adapter writes) is accepted."""
    assert field in FIELDS, f"classify LoraConfig.{field} in loralab/lora/peft_fields.py"
    rule = FIELDS[field]
    default = LoraConfig().to_dict().get(field)  # runtime_config is not saved: None
    if field == "target_modules":
        default = ["q_proj"]
    assert rule.accepts(json.loads(json.dumps(default, default=list)))
    if rule.kind == "unsupported":
        assert is_off(default)


@pytest.mark.parametrize("field", [n for n, r in FIELDS.items() if r.kind == "unsupported"])
def test_unsupported_variants_are_refused(field):
    """Any non-off value of a variant field is refused, naming the field (arrow, KaSA, ...
    that need data or extra packages to build through PEFT are checked on the config)."""
    for value in (True, [1, 2], {"x": 1}):
        with pytest.raises(UserError, match=rf"adapter uses {field}="):
            check_lora_config({"peft_type": "LORA", "r": 4, field: value}, "adapter_config.json")


@pytest.mark.parametrize("name,kwargs", [
    ("lora_bias", {"lora_bias": True}),
    ("target_parameters", {"target_modules": [], "target_parameters": ["q_proj.weight"]}),
    ("layer_replication", {"layer_replication": [[0, 2], [1, 2]]}),
    ("trainable_token_indices", {"trainable_token_indices": [1, 2]}),
    ("ensure_weight_tying", {"modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}),
    ("use_qalora", {"use_qalora": True}),
    ("bias", {"bias": "all"}),
    ("init_lora_weights", {"init_lora_weights": "pissa"}),
    ("init_lora_weights", {"init_lora_weights": "olora"}),
    ("init_lora_weights", {"init_lora_weights": "mica"}),
    ("velora_config", {"velora_config": {"num_groups": 4}}),
])
def test_peft_variants_are_refused(tmp_path, name, kwargs):
    """Adapters saved by real PEFT with an option loralab does not compute: one-line error
    naming the field. (PiSSA and OLoRA loaded as plain LoRA were 0.23 / 0.15 off PEFT's logits.)"""
    config = LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **kwargs})
    base, _, directory = _peft_adapter(tmp_path, config)
    with pytest.raises(UserError, match=rf"adapter uses {name}=") as info:
        load_adapter(copy.deepcopy(base), directory)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [True, 1, 0, "on", [0], {"k": 1}])
def test_unknown_field_with_a_value_is_refused(value):
    """A field no classified PEFT has (a newer PEFT option) may change the computation."""
    with pytest.raises(UserError, match="use_future_thing=.* unknown to loralab"):
        check_lora_config({"peft_type": "LORA", "use_future_thing": value}, "adapter_config.json")


@pytest.mark.parametrize("value", [None, False, [], {}, ""])
def test_unknown_field_switched_off_is_accepted(value):
    """PEFT writes every field; a new option at its off default changes nothing."""
    check_lora_config({"peft_type": "LORA", "use_future_thing": value}, "adapter_config.json")


def test_non_lora_peft_type_is_refused(tmp_path):
    save_adapter(_trained(tiny_llama, "qv"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "ADALORA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="LoRA adapters only"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("kwargs", [
    {"use_rslora": True, "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"q_proj": 4}},
    {"layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["down_proj"]},
    {"init_lora_weights": "orthogonal", "lora_dropout": 0.1},
    {"init_lora_weights": "gaussian", "task_type": "CAUSAL_LM"},
])
def test_understood_peft_fields_load_like_peft(tmp_path, kwargs):
    """Fields classified as implemented load with PEFT's logits: layers_to_transform and
    exclude_modules only choose where adapters go, which the saved tensors already say."""
    config = LoraConfig(**{"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                           **kwargs})
    base, peft_model, directory = _peft_adapter(tmp_path, config)
    x = torch.randint(0, 128, (2, 12))
    loaded = load_adapter(copy.deepcopy(base), directory).eval()
    with torch.no_grad():
        diff = (loaded(x).logits - peft_model(x).logits).abs().max().item()
    # fp32, the same products in a different order: rounding only (observed <= 1e-6)
    assert diff <= 1e-5
    expected = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                      for n, _ in peft_model.named_modules() if n.endswith("lora_A.default"))
    assert sorted(n for n, _ in lora_modules(loaded)) == expected


def test_cli_eval_refuses_alora_adapter(tmp_path, capsys):
    """`loralab eval --model ... --adapter <aLoRA>`: exit code 2, one line, no traceback."""
    from loralab import bundled
    from loralab.cli import main as cli

    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                        alora_invocation_tokens=[5, 6])
    base, _, adapter = _peft_adapter(tmp_path / "adapter", config)
    base.save_pretrained(tmp_path / "model")
    for item in bundled.gpt2_tokenizer_dir().iterdir():
        shutil.copy(item, tmp_path / "model" / item.name)
    capsys.readouterr()  # drop the setup's save progress bars
    code = cli.main(["eval", "--model", str(tmp_path / "model"), "--task", "lm",
                     "--data", "wiki-leads", "--adapter", str(adapter)])
    err = capsys.readouterr().err
    # in-process, transformers' weight-loading progress bar (silenced in a fresh `loralab`
    # process) shares stderr; the command's own output is the one error line
    ours = [line for line in err.splitlines() if line.startswith("loralab:")]
    assert code == 2 and "Traceback" not in err
    assert len(ours) == 1 and ours[0].startswith("loralab: error:")
    assert "alora_invocation_tokens" in ours[0]


# --- task heads of several modules (DistilBERT pre_classifier + classifier, RoBERTa's
# classifier wrapper, DeBERTa pooler + classifier) --------------------------------------------

def _classifier(kind: str, seed: int):
    """A tiny random sequence classifier; `seed` draws its weights (a different seed is a
    different, freshly initialised head, as when a user loads the base model again)."""
    import transformers as T

    small = {"vocab_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "hidden_size": 32, "intermediate_size": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)  # the same backbone every time
    if kind == "distilbert":
        model = T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=128, dim=32, hidden_dim=64, n_layers=1, n_heads=2, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0))
    elif kind == "roberta":
        model = T.RobertaForSequenceClassification(T.RobertaConfig(**small))
    else:
        model = T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**small))
    torch.manual_seed(seed)
    backbone = {id(p) for p in model.base_model.parameters()}
    with torch.no_grad():  # every weight outside the backbone: the new head
        for p in model.parameters():
            if id(p) not in backbone:
                p.normal_(std=0.2)
    return model.eval()


MULTI = [("distilbert", "qv", ["pre_classifier", "classifier"]),
         ("roberta", "qv", ["classifier"]),
         ("deberta-v2", ("query_proj", "value_proj"), ["pooler", "classifier"])]


@pytest.mark.parametrize("kind,targets,heads", MULTI)
def test_multi_module_head_round_trips_through_peft_and_loralab(tmp_path, kind, targets, heads):
    model = _classifier(kind, seed=1)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets, train_head=True))
    torch.manual_seed(3)
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randint(1, 128, (2, 12))
    expected = model(x).logits
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == heads
    # PEFT rebuilds the run from a fresh base model (another random head) and the adapter
    peft_model = PeftModel.from_pretrained(_classifier(kind, seed=2), tmp_path).eval()
    assert (peft_model(x).logits - expected).abs().max().item() <= 1e-5
    loaded = load_adapter(_classifier(kind, seed=2), tmp_path).eval()
    assert (loaded(x).logits - expected).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind,targets,heads", MULTI)
def test_loralab_loads_peft_adapter_with_several_modules_to_save(tmp_path, kind, targets, heads):
    peft_model = get_peft_model(_classifier(kind, seed=1), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_lin", "v_lin"] if kind == "distilbert" else
        ["query", "value"] if kind == "roberta" else list(targets), modules_to_save=heads))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.eval()
    x = torch.randint(1, 128, (2, 12))
    expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(_classifier(kind, seed=2), tmp_path).eval()
    assert (loaded(x).logits - expected).abs().max().item() <= 1e-5
    # the adapters and every module of the head train, as in PEFT
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == \
        sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_classifier_adapter_without_its_whole_head_is_refused(tmp_path):
    """An adapter that lacks part of a new classification head would leave it random."""
    model = _classifier("distilbert", seed=1)
    apply_lora(model, LoRAConfig(rank=4, targets="qv", train_head=True))
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "pre_classifier" not in k},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="holds no pre_classifier.weight"):
        load_adapter(_classifier("distilbert", seed=2), tmp_path)
