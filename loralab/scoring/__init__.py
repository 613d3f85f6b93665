"""Scores of model outputs: perplexity/classification metrics, E2E metrics, decoding."""
