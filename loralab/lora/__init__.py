"""LoRA itself: the layer, injection and merging, target modules, PEFT-format adapter files,
seeded dropout."""
