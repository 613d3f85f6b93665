"""Helpers shared by the E2E metric tests: dev-set reference groups and the Java marker."""

from __future__ import annotations

import csv
import shutil

import pytest

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not installed")


def dev_groups(e2e_dir, n: int, start: int = 0) -> tuple[list[list[str]], list[str]]:
    """n dev MRs: first reference as the 'system', the others as references."""
    groups: dict[str, list[str]] = {}
    with (e2e_dir / "devset.csv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            groups.setdefault(row["mr"], []).append(row["ref"])
    items = [g for g in groups.values() if len(g) >= 2][start:start + n]
    return [g[1:] for g in items], [g[0] for g in items]
