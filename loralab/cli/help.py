"""TrainConfig's fields as command-line options, and help texts that show every default.

The `train` options are generated from `TrainConfig` (`add_config_options`): the flag is the
field's name with dashes (`--batch-size`), its type, choices and help come from the field's
annotation, `config.CHOICES` and its attribute docstring, and the help ends with the field's
default. Every option defaults to None on the command line, so a `--config` file's value is
never overridden by a default nobody typed; `make_config` converts what was typed.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from loralab.training.config import CHOICES, config_fields, field_docs, field_kinds

EXCLUSIVE = (("epochs", "max_steps"),)
"""Fields that name the same thing two ways (the run's length): at most one may be given."""

METAVARS = {"eval_data": "D1,D2", "report_to": "T1,T2", "peft": "JSON"}


def train_config_fields() -> dict[str, tuple[Any, str]]:
    """TrainConfig field -> (default, its docstring with whitespace collapsed)."""
    docs = field_docs()
    return {name: (f.default, docs[name]) for name, f in config_fields().items()}


def shown(default: Any) -> str:
    """A default as `--help` shows it: none, on/off, comma-joined tuples, else str()."""
    if default is None or default == () or default == "":
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (tuple, list)):
        return ",".join(map(str, default))
    return str(default)


def add_config_options(parser: argparse.ArgumentParser, names: Iterable[str], *,
                       helps: Mapping[str, str] | None = None,
                       default_text: str = "{}") -> None:
    """Add `--<field>` for each TrainConfig field in `names` (all defaulting to None).

    `helps` replaces a field's docstring as its help; `default_text` formats the default shown
    (`"the run's; else {}"`). Booleans are `--x / --no-x`; fields of EXCLUSIVE go in one
    mutually exclusive group."""
    fields, docs, kinds = config_fields(), field_docs(), field_kinds()
    groups: dict[str, Any] = {}
    for pair in EXCLUSIVE:
        if all(n in names for n in pair):
            group = parser.add_mutually_exclusive_group()
            groups.update(dict.fromkeys(pair, group))
    for name in names:
        kind, _ = kinds[name]
        text = (helps or {}).get(name) or docs[name].rstrip(".")
        default = default_text.format(shown(fields[name].default))
        kwargs: dict[str, Any] = {"dest": name, "default": None,
                                  "help": f"{text} (default: {default})".replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        elif kind in (int, float):
            kwargs["type"] = kind
        if name in METAVARS:
            kwargs["metavar"] = METAVARS[name]
        groups.get(name, parser).add_argument(f"--{name.replace('_', '-')}", **kwargs)


def document_defaults(parser: argparse.ArgumentParser) -> None:
    """End every option's help without a default shown with argparse's default (`none`,
    `on`/`off`, ...), so each option of `parser` tells what happens when it is not given."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS or "(default: " in (action.help or ""):
            continue
        text = f"default: {shown(action.default)}"
        action.help = f"{action.help} ({text})" if action.help else text
