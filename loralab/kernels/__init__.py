"""Opt-in speed-ups: lean MLPs, seeded-dropout attention, fused cross-entropy,
regional compile, host-memory settings."""
