"""TER against sacrebleu; the sacrebleu version bound."""

from __future__ import annotations

import pytest

from e2e_cases import dev_groups
from loralab.scoring import sacre

# --------------------------------------------------------------------------- TER and the rest

def test_ter_equals_sacrebleu(e2e_dir):
    import sacrebleu

    refs, hyps = dev_groups(e2e_dir, 30, start=200)
    hyps[1] = hyps[1] + " " + hyps[1]  # long hypotheses exercise the shift search
    hyps[2] = ""
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    peer = sacrebleu.corpus_ter(hyps, streams).score
    assert sacre.ter_score(refs, hyps, workers=1) == pytest.approx(peer, abs=1e-9)


def test_sacrebleu_version_is_bounded():
    """ter_score uses private names of sacrebleu.metrics.lib_ter: the requirement must stop
    before the next, unchecked minor version, and the installed version must satisfy it."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "sacrebleu"]
    assert any(spec.operator == "<" for spec in req.specifier), req
    assert req.specifier.contains(version("sacrebleu")), (req, version("sacrebleu"))
