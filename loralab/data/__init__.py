"""Datasets: presets, tokenisation and collation for the three tasks."""
