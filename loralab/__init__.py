"""loralab: fine-tuning studies: full, head-only or LoRA, and what each costs.

The public Python API::

    from loralab import LoRAConfig, apply_lora, merge_lora, save_adapter, load_adapter

The names are imported on first use (PEP 562), so `import loralab.cli.main` does not import torch:
the command line must set process-level memory options before torch starts (see
`loralab.kernels.hostmem`), and `loralab --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"LoRAConfig": "loralab.lora.config", "apply_lora": "loralab.lora.inject",
            "merge_lora": "loralab.lora.inject", "save_adapter": "loralab.lora.adapter",
            "load_adapter": "loralab.lora.adapter"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loralab' has no attribute {name!r}")
