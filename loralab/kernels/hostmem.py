"""Host-memory setting for CPU training processes: transparent huge pages for large tensors.

Why: a training step allocates and frees the same large activation buffers every step. glibc
serves blocks above its mmap threshold with fresh `mmap`s and unmaps them on `free`, so every
step writes to brand-new pages, and each 4 KiB page costs a page fault (a kernel trap plus
zeroing). A 1024 x 1536 fp32 tensor is 1,536 such faults; on a small CPU, faulting in the
output of an elementwise op can take longer than the op itself (BENCHMARKS.md). PyTorch's
CPU allocator can instead align buffers of at least 2 MiB to 2 MiB and
`madvise(MADV_HUGEPAGE)` them (environment variable `THP_MEM_ALLOC_ENABLE=1`): one fault per
2 MiB instead of 512. The kernel must allow it (`/sys/kernel/mm/transparent_hugepage/enabled`
set to `madvise` or `always`).

The variable is read once, at torch's first CPU allocation, and it is process state, so only
the command line applies it, before torch is imported (`enable_huge_pages`); library functions
never touch the environment. Library users who want it export the variable themselves, and
users who do not can set `THP_MEM_ALLOC_ENABLE=0` or `LORALAB_HUGE_PAGES=0`; an explicit setting
of either variable is always respected. GPU memory is unaffected; on CUDA the setting only
touches host buffers.

A better cure for the same churn is an allocator that keeps freed memory for reuse. gperftools'
tcmalloc does: a step's buffers come back from its free lists instead of fresh pages, so the
faults are gone, not just made larger. glibc cannot be told to do this for PyTorch's aligned
large blocks (raising `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` still left most 32 MiB
`posix_memalign` blocks faulted in afresh, BENCHMARKS.md). An allocator is chosen when the
process starts, through `LD_PRELOAD`, so the `loralab` command re-executes itself once with
tcmalloc preloaded when the library is installed (Debian/Ubuntu: `libtcmalloc-minimal4`;
`scripts/system-deps.sh` installs it), as PyTorch's own CPU launcher
(`torch.backends.xeon.run_cpu`) does. With tcmalloc preloaded the huge-page setting is left off:
it was measured to add nothing on top. The user's own `LD_PRELOAD` is never touched, and
`LORALAB_ALLOCATOR=system` keeps the C library's allocator.

tcmalloc is a CPU-measured speed-up (loralab.devices), so the command restarts itself only for
the subcommands that train (`train`, `compare`) and never on a GPU host: there activations live
in device memory, where PyTorch's own caching allocator already reuses blocks. A GPU host is
recognised without importing torch (`devices.gpu_host`: an NVIDIA or ROCm driver present and
`CUDA_VISIBLE_DEVICES` not hiding every device), since the decision is taken before torch loads.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path

from loralab import devices

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
OPT_OUT_VARIABLE = "LORALAB_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ALLOCATOR_VARIABLE = "LORALAB_ALLOCATOR"
PRELOAD_VARIABLE = "LD_PRELOAD"
ALLOCATOR_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
"""Shared-library names of tcmalloc, the minimal build (no heap profiler) first."""
ALLOCATOR_ENVIRONMENT = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
"""gperftools prints a line to stderr for every allocation above 1 GiB (a large model's
evaluation logits); this silences it. Set only where the user has not."""


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
    if caching_allocator_preloaded(environ):
        return "huge pages: off (tcmalloc is preloaded and reuses freed memory)"
    environ[THP_VARIABLE] = "1"
    return f"huge pages: on ({THP_VARIABLE}=1, kernel mode {mode})"


def enable_for_this_process() -> str:
    """`enable_huge_pages` on this process's environment, modules and kernel mode (the CLI
    calls it first thing; child processes such as torchrun workers inherit the variable)."""
    return enable_huge_pages(os.environ, sys.modules, thp_mode())


def huge_pages_active(environ: Mapping[str, str]) -> bool:
    """Whether this process's allocator uses huge pages, for the run's environment record."""
    return environ.get(THP_VARIABLE, "0").strip() == "1"


# --- caching allocator (tcmalloc) ---------------------------------------------------------

def library_dirs() -> list[Path]:
    """Where the dynamic loader's usual search finds system libraries, this interpreter's
    library directory (a conda or pyenv prefix) included."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [Path(sys.prefix) / "lib", Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")]
    for root in ("/usr/local/lib", "/usr/lib", "/lib", "/usr/lib64", "/lib64"):
        dirs += [Path(root) / multiarch, Path(root)] if multiarch else [Path(root)]
    return list(dict.fromkeys(dirs))


def find_allocator(dirs: Iterable[Path] | None = None) -> Path | None:
    """The first tcmalloc shared library (`ALLOCATOR_LIBRARIES`, in order) in `dirs`, or None."""
    dirs = list(library_dirs() if dirs is None else dirs)
    for name in ALLOCATOR_LIBRARIES:
        for folder in dirs:
            if (folder / name).is_file():
                return folder / name
    return None


def caching_allocator_preloaded(environ: Mapping[str, str]) -> bool:
    """Whether `environ`'s LD_PRELOAD names a tcmalloc library."""
    return "tcmalloc" in environ.get(PRELOAD_VARIABLE, "")


def is_loralab_command(argv: Sequence[str]) -> bool:
    """Whether this process is the `loralab` command: its console script, or `python -m
    loralab` (torchrun workers included), as opposed to a program importing loralab's CLI."""
    if not argv:
        return False
    first = Path(argv[0])
    return first.name == "loralab" or (first.name == "__main__.py"
                                       and first.parent.name == "loralab")


def allocator_plan(environ: Mapping[str, str], platform: str, library: Path | None,
                   argv: Sequence[str], *, gpu: bool = False) -> tuple[dict[str, str], str]:
    """(variables to add to the environment before re-executing, or {} to carry on as is; one
    line saying what was decided and why).

    Pure: the caller passes the environment, `sys.platform`, the library found (or None),
    `sys.argv` and whether the host has a GPU (`devices.gpu_host`). Nothing is changed when the
    user chose (`LORALAB_ALLOCATOR=system`, or any LD_PRELOAD of their own), when tcmalloc is
    already preloaded (so the re-executed process does not loop), off Linux, when loralab's CLI
    is called from another program (re-executing would run that program again), for a
    subcommand that does not train (`devices.CPU_TRAINING_COMMANDS`), on a GPU host (tcmalloc
    is a CPU-measured speed-up: `devices.device_defaults`), or when the library is missing.
    """
    choice = environ.get(ALLOCATOR_VARIABLE, "auto").strip().lower()
    if choice in {"system", "0", "off", "false", "no"}:
        chosen = environ[ALLOCATOR_VARIABLE]
        return {}, f"allocator: the C library's ({ALLOCATOR_VARIABLE}={chosen})"
    if caching_allocator_preloaded(environ):
        return {}, f"allocator: tcmalloc ({environ[PRELOAD_VARIABLE]})"
    if environ.get(PRELOAD_VARIABLE, "").strip():
        return {}, f"allocator: left to the user's {PRELOAD_VARIABLE}={environ[PRELOAD_VARIABLE]}"
    if not platform.startswith("linux"):
        return {}, "allocator: the C library's (tcmalloc is preloaded on Linux only)"
    if not is_loralab_command(argv):
        return {}, "allocator: the C library's (loralab's CLI called from another program)"
    command = devices.subcommand(argv)
    if command not in devices.CPU_TRAINING_COMMANDS:
        what = f"`loralab {command}`" if command else "`loralab` without a subcommand"
        return {}, f"allocator: the C library's ({what} trains nothing)"
    if not devices.device_defaults("cuda" if gpu else "cpu").tcmalloc:
        return {}, ("allocator: the C library's (GPU host: tcmalloc is measured for CPU "
                    "training only)")
    if library is None:
        return {}, ("allocator: the C library's (tcmalloc not found; install "
                    "libtcmalloc-minimal4: less memory and fewer page faults in CPU training)")
    changes = {PRELOAD_VARIABLE: str(library)}
    changes |= {k: v for k, v in ALLOCATOR_ENVIRONMENT.items() if k not in environ}
    return changes, f"allocator: tcmalloc ({library})"


def command_environment(environ: Mapping[str, str],
                        argv: Sequence[str] = ("loralab", "train")) -> dict[str, str]:
    """The environment the `loralab` command runs training in, starting from `environ`:
    tcmalloc preloaded where `allocator_plan` allows, then the huge-page decision. For
    launching a process that stands for a `loralab` run (the benchmarks)."""
    changes, _ = allocator_plan(environ, sys.platform, find_allocator(), argv,
                                gpu=devices.gpu_host(environ))
    env = dict(environ) | changes
    enable_huge_pages(env, {}, thp_mode())
    return env


def preload_allocator() -> str:
    """Re-execute this `loralab` command with tcmalloc preloaded when `allocator_plan` says so
    (this call then does not return: the same process id starts over with the same arguments);
    otherwise return the decision's line. The CLI calls it first thing, before torch loads."""
    changes, line = allocator_plan(os.environ, sys.platform, find_allocator(), sys.argv,
                                   gpu=devices.gpu_host(os.environ))
    if changes:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                      os.environ | changes)
        except OSError as exc:  # the interpreter cannot be started again: carry on as is
            return f"allocator: the C library's (could not restart with tcmalloc: {exc})"
    return line


def allocator_in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """'tcmalloc' when this process has a tcmalloc library mapped, else 'system' (for the run's
    environment record; read from the kernel, so a preload that failed to load says 'system')."""
    try:
        text = maps.read_text()
    except OSError:
        return "system"
    return "tcmalloc" if "tcmalloc" in text else "system"


def release_free_memory() -> None:
    """Hand the heap's freed memory back to the kernel: tcmalloc's
    `MallocExtension_ReleaseFreeMemory` where it is loaded, else glibc's `malloc_trim(0)`.

    Why: a resident-set baseline taken after this counts live memory only. A caching allocator
    otherwise keeps what model loading freed, training reuses it without growing the resident
    set, and "memory added by training" reads far too low (13 vs 88 MB for the same GPT-2 step).
    """
    import ctypes

    try:
        process = ctypes.CDLL(None)
    except OSError:  # no dynamic symbol table to search (not a glibc/ELF platform)
        return
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:
        release()
        return
    trim = getattr(process, "malloc_trim", None)
    if trim is not None:
        trim(0)
