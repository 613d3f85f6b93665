"""Raw sources: the last-word passage rule."""

from __future__ import annotations

from loralab.data.sources import last_word_passages


def test_last_word_passages_rule():
    ctx = " ".join(["word"] * 30)
    text = f"The river flows north. {ctx} and the river. Then they left the river."
    pairs = last_word_passages(text)
    assert pairs == [(f"The river flows north. {ctx} and the", "river"),
                     (f"The river flows north. {ctx} and the river. Then they left the",
                      "river")]
    assert last_word_passages(f"{ctx} it was over and done with the.") == []  # stopword
    assert last_word_passages(f"{ctx} a new thing.") == []  # not seen in the context
