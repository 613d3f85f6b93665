"""Fine-tuning strategies as objects: one class per method behind one small protocol
(`base.Strategy`, built for a run by `base.strategy_for(config)`), and one torch-free registry
of their names and facts (`registry.STRATEGIES`). This package file imports nothing, so the
registry can be read without torch."""
