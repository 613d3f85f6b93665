"""Help text for `loralab train`: every option with its help and its default.

The train options default to None on the command line (so a `--config` file's value is not
overridden by a default nobody typed), which would make argparse show no default at all. The
defaults shown are `TrainConfig`'s own, and an option without help text gets its field's
docstring: both read from the source of `loralab/training/config.py` with `ast`, without importing it,
because importing it imports torch and `loralab --help` must stay fast (loralab/__init__.py).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def train_config_fields() -> dict[str, tuple[Any, str]]:
    """TrainConfig field -> (default, first sentence of its docstring), from the source.
    A default that is not a literal (an expression) is given as its source text."""
    spec = importlib.util.find_spec("loralab.training.config")
    if spec is None or spec.origin is None:  # pragma: no cover - part of this package
        return {}
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig"),
               None)
    out: dict[str, tuple[Any, str]] = {}
    if cls is None:  # pragma: no cover
        return out
    body = cls.body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        try:
            default = ast.literal_eval(node.value) if node.value is not None else None
        except ValueError:
            default = ast.unparse(node.value)
        doc = ""
        nxt = body[i + 1] if i + 1 < len(body) else None
        if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            doc = " ".join(nxt.value.value.split())
        out[node.target.id] = (default, doc)
    return out


def _shown(default: Any) -> str:
    if default is None or default == () or default == "":
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (tuple, list)):
        return ",".join(map(str, default))
    return str(default)


def document_defaults(parser: argparse.ArgumentParser) -> None:
    """Give every option of `parser` a help text ending in its default: TrainConfig's default
    (and docstring where the option has no help) for options that set a TrainConfig field,
    the argparse default otherwise."""
    fields = train_config_fields()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS or "(default: " in (action.help or ""):
            continue
        default, doc = fields.get(action.dest, (action.default, ""))
        text = action.help or doc.rstrip(".").replace("%", "%%")  # argparse formats with %
        action.help = f"{text} (default: {_shown(default)})" if text else \
            f"default: {_shown(default)}"
