"""loralab: fine-tuning studies: full, head-only or LoRA, and what each costs.

The public Python API::

    from loralab import LoRAConfig, apply_lora, merge_lora, save_adapter, load_adapter
"""

from loralab.adapter import load_adapter, save_adapter
from loralab.lora import LoRAConfig, apply_lora, merge_lora

__all__ = ["LoRAConfig", "apply_lora", "merge_lora", "save_adapter", "load_adapter"]
__version__ = "0.1.0"
