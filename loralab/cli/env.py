"""`loralab env`: what a bug report needs to know about this machine and installation.

Versions (loralab, Python, torch, transformers, peft, datasets), the device training would use,
whether it multiplies bf16 natively (what `--precision auto` decides by), the thread count, the
memory allocator this process runs on and the cache directories loralab and Hugging Face use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib import metadata

import torch
from datasets import config as ds_config
from huggingface_hub import constants

from loralab import __version__, bundled
from loralab.costs.measure import cpu_info, native_bf16
from loralab.kernels import hostmem
from loralab.training.precision import resolve_precision

LIBRARIES = ("torch", "transformers", "peft", "datasets", "numpy", "safetensors", "tokenizers")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_report() -> dict:
    """The facts `loralab env` prints, as a mapping (keys in print order)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = cpu_info()
    info: dict = {"loralab": __version__, "python": platform.python_version(),
                  "platform": platform.platform()}
    info.update({lib: _version(lib) for lib in LIBRARIES})
    info["device"] = device
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["cpu"] = cpu.model
    info["cpu_flags"] = None if cpu.flags is None else " ".join(cpu.flags)
    info["native_bf16"] = native_bf16(device, cpu)
    info["precision_auto"] = resolve_precision("auto", device)
    info["threads"] = torch.get_num_threads()
    info["allocator"] = hostmem.allocator_in_use()
    info["huge_pages"] = hostmem.huge_pages_active(os.environ)
    info["loralab_cache"] = str(bundled.cache_dir())
    info["hf_hub_cache"] = str(constants.HF_HUB_CACHE)
    info["hf_hub_offline"] = bool(constants.HF_HUB_OFFLINE)
    info["hf_datasets_cache"] = str(ds_config.HF_DATASETS_CACHE)
    return info


def run_env(args: argparse.Namespace) -> int:
    """Print the environment report as aligned lines (or JSON)."""
    info = environment_report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = "not installed" if value is None and key in LIBRARIES else value
        print(f"{key:<{width}}  {shown}")
    return 0


RUN = {"env": run_env}
