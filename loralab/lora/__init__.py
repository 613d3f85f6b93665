"""LoRA itself: the config (`config`), the layer and its maths (`layer`), injection and merging
(`inject`), target modules (`targets`), PEFT-format adapter files (`adapter`, `peft_fields`),
seeded dropout (`dropout`)."""
