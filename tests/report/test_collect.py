"""Aggregating the database rows: metric direction and the primary metric of an eval set."""

from __future__ import annotations

from loralab.report import collect


def test_metric_direction():
    assert collect.lower_is_better("perplexity") and collect.lower_is_better("loss")
    assert collect.lower_is_better("TER") and collect.lower_is_better("val_loss")
    for m in ("BLEU", "f1", "accuracy", "METEOR", "chrF", "ROUGE_L", "CIDEr", "precision"):
        assert not collect.lower_is_better(m), m


def test_primary_metric_follows_the_task():
    """The Pareto view shows BLEU for data-to-text studies, perplexity for LM ones."""
    metrics = {"e2e": ["loss", "perplexity", "BLEU", "NIST", "TER"]}
    gen = collect.StudyData("g", {"task": "generate"}, [], [], ["e2e"], metrics)
    lm = collect.StudyData("l", {"task": "lm"}, [], [], ["e2e"], metrics)
    assert collect.primary_metric(gen, "e2e") == "BLEU"
    assert collect.primary_metric(lm, "e2e") == "perplexity"
