"""YAML with line numbers: a study file's mappings remember the line of each key.

Every error about a study file names `file:line`, so the loader keeps, for each mapping, the
line its keys were written on (`LineMap.lines`: key -> line number, 1-based). A key set by a
command-line override (`loralab.study.overrides`) stores the override's text instead of a
number, so the same error then names the override.
"""

from __future__ import annotations

from typing import Any

import yaml

from loralab.errors import UserError


class LineMap(dict):
    """A mapping read from YAML; `lines[key]` is the key's line (int) or the override (str)."""

    lines: dict[str, int | str]


class _LineLoader(yaml.SafeLoader):
    """A safe YAML loader whose mappings are `LineMap`s."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    out = LineMap()
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[str(key)] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text whose mappings are `LineMap`s. Raises UserError `source:line: not valid
    YAML (...)` on a syntax error."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}{line}: not valid YAML ({problem}); fix the syntax at that "
                        "line") from None


def location(source: str, where: Any, key: str | None) -> str:
    """Where `key` of mapping `where` was set: `source:line`, the override that set it, or just
    `source` when unknown."""
    line = getattr(where, "lines", {}).get(key) if where is not None and key else None
    if isinstance(line, str):  # a key set on the command line names its override
        return line
    return f"{source}:{line}" if line else source


def plain(obj: Any) -> Any:
    """Drop the line bookkeeping: plain dicts/lists, JSON-serialisable."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj
