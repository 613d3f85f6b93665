"""Host-memory setting for CPU training processes: transparent huge pages for large tensors.

Why: a training step allocates and frees the same large activation buffers every step. glibc
serves blocks above its mmap threshold with fresh `mmap`s and unmaps them on `free`, so every
step writes to brand-new pages, and each 4 KiB page costs a page fault (a kernel trap plus
zeroing). A 1024 x 1536 fp32 tensor is 1,536 such faults; on the 2-core VM loralab is measured
on, faulting in the output of an elementwise op took longer than the op itself, and a LoRA step
on SmolLM2 took ~100,000 minor faults. PyTorch's CPU allocator can instead align buffers of at
least 2 MiB to 2 MiB and `madvise(MADV_HUGEPAGE)` them (environment variable
`THP_MEM_ALLOC_ENABLE=1`): one fault per 2 MiB instead of 512. The kernel must allow it
(`/sys/kernel/mm/transparent_hugepage/enabled` set to `madvise` or `always`).

The variable is read once, at torch's first CPU allocation, and it is process state, so only
the command line applies it, before torch is imported (`enable_huge_pages`); library functions
never touch the environment. Library users who want it export the variable themselves, and
users who do not can set `THP_MEM_ALLOC_ENABLE=0` or `LORALAB_HUGE_PAGES=0`; an explicit setting
of either variable is always respected. GPU memory is unaffected; on CUDA the setting only
touches host buffers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
OPT_OUT_VARIABLE = "LORALAB_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode, the bracketed word of the sysfs file
    (`always [madvise] never` -> 'madvise'); None where the file is missing (not Linux, or a
    kernel without THP) or unreadable."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def enable_huge_pages(environ: MutableMapping[str, str], modules: Mapping[str, object],
                      mode: str | None) -> str:
    """Set `THP_MEM_ALLOC_ENABLE=1` in `environ` when it can take effect and nobody chose
    otherwise; return one line saying what was decided and why.

    It is left alone when the user set it (either way), opted out with `LORALAB_HUGE_PAGES=0`,
    the kernel mode `mode` does not allow madvised huge pages (`never` or unknown), or torch is
    already in `modules` (its allocator has read the variable by then, so setting it would
    claim an effect it cannot have).
    """
    if THP_VARIABLE in environ:
        return f"huge pages: left to the user's {THP_VARIABLE}={environ[THP_VARIABLE]}"
    if environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in {"0", "false", "no", "off"}:
        return f"huge pages: off ({OPT_OUT_VARIABLE}={environ[OPT_OUT_VARIABLE]})"
    if mode not in {"madvise", "always"}:
        return f"huge pages: off (kernel transparent-huge-page mode: {mode or 'unknown'})"
    if "torch" in modules:
        return "huge pages: off (torch was imported first; its allocator has read the setting)"
    environ[THP_VARIABLE] = "1"
    return f"huge pages: on ({THP_VARIABLE}=1, kernel mode {mode})"


def enable_for_this_process() -> str:
    """`enable_huge_pages` on this process's environment, modules and kernel mode (the CLI
    calls it first thing; child processes such as torchrun workers inherit the variable)."""
    return enable_huge_pages(os.environ, sys.modules, thp_mode())


def huge_pages_active(environ: Mapping[str, str]) -> bool:
    """Whether this process's allocator uses huge pages, for the run's environment record."""
    return environ.get(THP_VARIABLE, "0").strip() == "1"
