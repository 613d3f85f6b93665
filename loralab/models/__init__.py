"""Loading pretrained models and tokenizers, and their task heads."""
