"""Command-line overrides of a study file: `KEY.PATH=VALUE` items applied to the parsed YAML.

`loralab compare STUDY budget.max_steps=5 seeds=3 strategies.lora-1.rank=16` changes the
study's mapping before it is validated, so an override is checked exactly as the same value
written in the file would be (`loralab.study.spec.parse_study`), and the report records the
study as run.

- A dotted path walks mappings by key and lists by index (`eval.0.max_examples=8`) or, for a
  list of mappings, by the item's `name` (`strategies.lora-1.rank=16`); missing mapping keys
  are created (a misspelt one is then reported by validation, naming the override).
- The value is parsed as YAML (`5` an int, `2.0e-4` a float, `true` a bool, `[0, 1]` a list,
  `{name: x}` a mapping; `null` deletes the key).
- `epochs` and `max_steps` are alternatives: setting one removes the other from the same
  mapping (the file's `epochs: 3` would otherwise make `budget.max_steps=5` an error).

Every key an override sets remembers the override text in place of a file line, so an error
reads `override budget.max_stepz=5: unknown field 'max_stepz' in budget; ...`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from loralab.errors import UserError
from loralab.study.lines import LineMap

_ALTERNATIVES = {"epochs": "max_steps", "max_steps": "epochs"}


def parse_override(item: str) -> tuple[list[str], Any]:
    """`"budget.max_steps=5"` -> (["budget", "max_steps"], 5). UserError if not KEY=VALUE."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or any(not p.strip() for p in parts):
        raise UserError(f"override {item!r} is not KEY=VALUE with a dotted KEY; e.g. "
                        "budget.max_steps=5 or strategies.lora-1.rank=16")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"override {item}: the value is not valid YAML ({problem}); quote it "
                        "or fix it") from None
    return [p.strip() for p in parts], value


def _mark(value: Any, where: str) -> Any:
    """Give every mapping inside an override's value the study loader's line bookkeeping
    (`lines`: key -> where it came from), pointing at the override."""
    if isinstance(value, dict):
        out = LineMap({k: _mark(v, where) for k, v in value.items()})
        out.lines = {str(k): where for k in value}
        return out
    if isinstance(value, list):
        return [_mark(v, where) for v in value]
    return value


def _child(node: Any, part: str, path: str, where: str) -> Any:
    """The item `part` of a mapping (created empty if missing) or of a list (an index, or the
    `name` of a mapping item)."""
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = _mark({}, where)
            _set_line(node, part, where)
        return node[part]
    if isinstance(node, list):
        if part.lstrip("-").isdigit():
            index = int(part)
            if not -len(node) <= index < len(node):
                raise UserError(f"{where}: index {index} is out of range ({len(node)} items)")
            return node[index]
        named = [item for item in node if isinstance(item, dict) and str(item.get("name")) == part]
        if not named:
            names = [str(i.get("name")) for i in node if isinstance(i, dict) and "name" in i]
            raise UserError(f"{where}: no item named '{part}' in {path.rpartition('.')[0]}; "
                            f"names: {', '.join(names) or 'none (use an index)'}")
        return named[0]
    raise UserError(f"{where}: '{path.rpartition('.')[0]}' is {node!r}, not a mapping or a "
                    "list; set it whole instead")


def _set_line(node: dict, key: str, where: str) -> None:
    lines = getattr(node, "lines", None)
    if isinstance(lines, dict):
        lines[key] = where


def apply_overrides(raw: dict, items: Sequence[str]) -> dict:
    """Apply each `KEY.PATH=VALUE` to the parsed study mapping `raw` (in place; returned)."""
    for item in items:
        parts, value = parse_override(item)
        where = f"override {item}"
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[:i + 1]), where)
        last = parts[-1]
        if isinstance(node, list):
            if not last.lstrip("-").isdigit() or not -len(node) <= int(last) < len(node):
                raise UserError(f"{where}: a list item is set by its index (0..{len(node) - 1})")
            node[int(last)] = _mark(value, where)
            continue
        if not isinstance(node, dict):
            raise UserError(f"{where}: '{'.'.join(parts[:-1])}' is {node!r}, not a mapping; "
                            "set it whole instead")
        if value is None:
            node.pop(last, None)
            continue
        node[last] = _mark(value, where)
        _set_line(node, last, where)
        if last in _ALTERNATIVES:
            node.pop(_ALTERNATIVES[last], None)
    return raw
