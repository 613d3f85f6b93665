"""Fine-tuning strategies as objects: one class per method behind one small protocol
(`base.Strategy`), and one registry of their names and facts (`registry.STRATEGIES`)."""
