"""TrainConfig: torch-free, one validator naming the field, LoRA targets as a tuple, field docs.

(Named test_train_config.py: tests/lora/test_config.py already takes the basename, and test
modules outside packages need unique basenames.)"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from loralab.data import MIN_SEQ_LEN
from loralab.errors import ConfigError, UserError
from loralab.training.config import (
    METHODS,
    TrainConfig,
    config_fields,
    field_docs,
    field_kinds,
    make_config,
    parse_report_to,
    parse_targets,
)
from loralab.training.strategies import registry


def test_importing_the_config_imports_neither_torch_nor_transformers():
    code = ("import sys\nimport loralab.training.config\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("bad,key", [
    ({"method": "prefix"}, "method"), ({"task": "qa"}, "task"), ({"schedule": "step"}, "schedule"),
    ({"precision": "fp16"}, "precision"), ({"parallel": "zero3"}, "parallel"),
    ({"compile": "max"}, "compile"), ({"batch_size": 0}, "batch_size"),
    ({"grad_accum": 0}, "grad_accum"), ({"epochs": 0}, "epochs"), ({"max_steps": 0}, "max_steps"),
    ({"lr": -1.0}, "lr"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"data_fraction": 0.0}, "data_fraction"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"seq_len": MIN_SEQ_LEN - 1}, "seq_len"),
    ({"parallel": "fsdp", "method": "lora"}, "parallel"), ({"rank": 0}, "rank"),
    ({"eval_max_examples": -1}, "eval_max_examples"), ({"report_to": "comet"}, "report_to"),
    ({"preset": ","}, "preset"), ({"alpha": 0.0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"), ({"head_epochs": 0.0}, "head_epochs"),
])
def test_every_check_raises_a_config_error_naming_its_field(bad, key):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**bad)
    assert info.value.key == key and isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


def test_conversion_and_unknown_keys_name_the_key():
    with pytest.raises(ConfigError) as info:
        make_config(batch_size="many")
    assert info.value.key == "batch_size" and "cannot use 'many' as int" in str(info.value)
    with pytest.raises(ConfigError) as info:
        make_config({"zeta": 1, "bogus": 2})
    assert info.value.key == "bogus" and "valid keys: model, task" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_report_to("tensorboard,comet")
    assert info.value.key == "report_to"


def test_seq_len_minimum_is_the_data_layers():
    assert MIN_SEQ_LEN == 8  # load_task_data's minimum; TrainConfig shares the constant
    assert TrainConfig(seq_len=MIN_SEQ_LEN).seq_len == MIN_SEQ_LEN


def test_targets_are_a_preset_name_or_a_tuple_and_the_record_keeps_its_layout():
    assert TrainConfig(preset="attn-proj").preset == "attn-proj"
    names = TrainConfig(preset="q_proj,v_proj")
    assert names.preset == ("q_proj", "v_proj")
    assert TrainConfig(preset=["q_proj", "v_proj"]) == names == TrainConfig(
        preset=("q_proj", "v_proj"))
    assert make_config(preset=" q_proj , v_proj,").preset == ("q_proj", "v_proj")
    assert names.to_dict()["preset"] == "q_proj,v_proj"  # record.json as before
    assert TrainConfig().to_dict()["preset"] == "qv"
    assert make_config(names.to_dict()) == names  # a record's config reads back the same
    assert parse_targets("model.layers.*.mlp.down_proj") == "model.layers.*.mlp.down_proj"


def test_record_layout_is_unchanged():
    d = make_config(eval_data="a,b", report_to="tensorboard,wandb").to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert d["eval_data"] == ["a", "b"] and d["report_to"] == ["tensorboard", "wandb"]
    assert d["max_steps"] is None and d["rslora"] is False and d["lr"] == 2e-4


def test_every_field_has_a_doc_and_a_kind():
    docs, kinds = field_docs(), field_kinds()
    assert list(docs) == list(config_fields()) == list(kinds)
    assert all(docs.values())
    assert docs["rank"] == "LoRA rank r."
    assert kinds["max_steps"] == (int, True) and kinds["preset"] == (tuple, False)
    assert kinds["rslora"] == (bool, False) and kinds["lr"] == (float, False)


def test_method_choices_come_from_the_registry():
    assert METHODS == registry.names()
    for name in METHODS:
        TrainConfig(method=name)


def test_malformed_yaml_config_is_one_line_naming_file_and_line(tmp_path):
    from loralab.training.config import config_from_yaml

    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nrank: [8\nlr: 1e-4\n")
    with pytest.raises(UserError) as info:
        config_from_yaml(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    assert "is not valid YAML" in message and "fix its syntax" in message
