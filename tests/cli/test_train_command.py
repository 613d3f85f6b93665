"""`loralab train`: options generated from TrainConfig, --help with every default."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from loralab.cli.main import build_parser


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loralab", *args], capture_output=True,
                          text=True, timeout=300, check=False, **kw)


def test_train_help_shows_every_option_with_help_and_default():
    from loralab.training.config import TrainConfig

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for action in train._actions:
        if not action.option_strings or action.dest == "help" or action.help == "==SUPPRESS==":
            continue  # hidden options (kept for old scripts) are not shown at all
        assert action.help and "default" in action.help.lower(), action.option_strings
        if action.dest in defaults:
            shown = defaults[action.dest]
            shown = ("on" if shown else "off") if isinstance(shown, bool) else \
                "none" if shown in (None, ()) else ",".join(shown) if isinstance(shown, tuple) \
                else str(shown)
            assert action.help.endswith(f"(default: {shown})"), (action.dest, action.help)
    done = _run("train", "--help")
    assert done.returncode == 0
    options = done.stdout.split("\noptions:", 1)[1]
    assert "(default: 8)" in options.split("--rank RANK", 1)[1].split("--alpha", 1)[0]


# every flag `loralab train` had before its options were generated from TrainConfig
OLD_FLAGS = (
    "--config --model --task --data --eval-data --method --preset --rank --alpha --dropout "
    "--rslora --epochs --max-steps --batch-size --grad-accum --lr --weight-decay --warmup-steps "
    "--warmup-ratio --schedule --grad-clip --label-smoothing --precision --parallel "
    "--grad-checkpointing --compile --seq-len --data-fraction --seed --eval-every "
    "--eval-batches --eval-max-examples --checkpoint-every --head-epochs --num-labels --quant "
    "--out --report-to --wandb --resume").split()


def _train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def test_train_options_are_the_config_fields_and_keep_every_old_flag():
    from loralab.cli.parsers import STUDY_ONLY
    from loralab.training.config import config_fields

    flags = {s for a in _train_parser()._actions for s in a.option_strings}
    assert set(OLD_FLAGS) <= flags
    for name in config_fields():
        assert (f"--{name.replace('_', '-')}" in flags) == (name not in STUDY_ONLY), name


def test_a_config_file_is_overridden_only_by_options_typed(tmp_path):
    from loralab.cli.train import train_overrides
    from loralab.training.config import config_from_yaml

    path = tmp_path / "c.yaml"
    path.write_text("rank: 4\nlr: 1.0e-3\nrslora: true\nfused_loss: false\n")
    args = _train_parser().parse_args(["--config", str(path), "--lr", "5e-4"])
    assert train_overrides(args) == {"lr": 5e-4}
    config = config_from_yaml(args.config, **train_overrides(args))
    assert (config.rank, config.lr, config.rslora, config.fused_loss) == (4, 5e-4, True, False)
    old = _train_parser().parse_args(["--wandb", "--rslora", "--grad-checkpointing"])
    assert train_overrides(old) == {"report_to": "tensorboard,wandb", "rslora": True,
                                    "grad_checkpointing": True}


def test_bad_option_values_are_one_line_errors_naming_the_field(capsys):
    from loralab.cli.main import main

    assert main(["train", "--rank", "0", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loralab: error: LoRA rank must be >= 1, got 0"]
    assert main(["train", "--seq-len", "4"]) == 2
    assert "seq_len must be >= 8" in capsys.readouterr().err
