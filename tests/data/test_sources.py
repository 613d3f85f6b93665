"""Raw sources: the last-word passage rule."""

from __future__ import annotations

import pytest

from loralab.data.sources import last_word_passages, read_raw
from loralab.errors import UserError


def test_last_word_passages_rule():
    ctx = " ".join(["word"] * 30)
    text = f"The river flows north. {ctx} and the river. Then they left the river."
    pairs = last_word_passages(text)
    assert pairs == [(f"The river flows north. {ctx} and the", "river"),
                     (f"The river flows north. {ctx} and the river. Then they left the",
                      "river")]
    assert last_word_passages(f"{ctx} it was over and done with the.") == []  # stopword
    assert last_word_passages(f"{ctx} a new thing.") == []  # not seen in the context


def test_read_raw_e2e_dir_gone_is_a_user_error(tmp_path, monkeypatch):
    # resolve_source chose the local E2E CSVs, which have since disappeared
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORALAB_E2E_DIR", raising=False)
    with pytest.raises(UserError, match="no longer there"):
        read_raw("e2e", "e2e-dir", "generate", {})
