"""TrainConfig's fields as options: defaults and docs read from the config itself."""

from __future__ import annotations

import dataclasses

import pytest


def test_help_defaults_and_docs_equal_train_config_fields():
    from loralab.cli.help import train_config_fields
    from loralab.training.config import TrainConfig

    fields = train_config_fields()
    for f in dataclasses.fields(TrainConfig):
        assert f.name in fields, f.name
        assert fields[f.name][0] == f.default, f.name
        assert fields[f.name][1], f"{f.name} has no docstring"


def test_config_options_take_type_choices_and_booleans_from_the_fields():
    import argparse

    from loralab.cli.help import add_config_options
    from loralab.training.strategies import registry

    p = argparse.ArgumentParser()
    add_config_options(p, ["method", "rank", "lr", "fused_loss", "eval_data", "epochs",
                           "max_steps"])
    given = p.parse_args(["--method", "qlora", "--rank", "4", "--lr", "1e-3", "--no-fused-loss",
                          "--eval-data", "a,b", "--max-steps", "3"])
    assert (given.method, given.rank, given.lr, given.fused_loss, given.eval_data,
            given.max_steps) == ("qlora", 4, 1e-3, False, "a,b", 3)
    assert p.parse_args(["--fused-loss"]).fused_loss is True
    nothing = p.parse_args([])  # nothing typed: every field None (a --config file's stays)
    assert all(v is None for v in vars(nothing).values())
    method = next(a for a in p._actions if a.dest == "method")
    assert tuple(method.choices) == registry.names()
    with pytest.raises(SystemExit):  # one length, two ways: at most one
        p.parse_args(["--epochs", "2", "--max-steps", "3"])


def test_train_help_lists_every_registered_method_with_its_summary():
    from loralab.cli.parsers import methods_text
    from loralab.training.strategies import registry

    lines = methods_text().splitlines()
    assert [line.split()[0] for line in lines] == list(registry.names())
    assert all(spec.summary in line for spec, line in zip(registry.STRATEGIES, lines,
                                                           strict=True))
