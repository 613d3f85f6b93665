"""loralab: fine-tuning studies: full, head-only or LoRA, and what each costs."""
