"""Pretrained models: loading models and tokenizers (`loading`), what a task head is (`heads`),
and LoRA-agnostic model surgery (`surgery`)."""
