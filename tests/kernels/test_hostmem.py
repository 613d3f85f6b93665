"""Huge-page setting of the command line (loralab.kernels.hostmem): when it is set, when it is left
alone, and that the CLI applies it before torch exists in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loralab import devices
from loralab.kernels import hostmem

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "mode"), [("always [madvise] never\n", "madvise"),
                                            ("[always] madvise never\n", "always"),
                                            ("always madvise [never]\n", "never"),
                                            ("garbage\n", None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert hostmem.thp_mode(setting) == mode


def test_thp_mode_of_a_missing_file_is_none(tmp_path):
    assert hostmem.thp_mode(tmp_path / "absent") is None


def test_enabled_when_the_kernel_allows_and_nobody_chose():
    env: dict[str, str] = {}
    line = hostmem.enable_huge_pages(env, {}, "madvise")
    assert env == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert line.startswith("huge pages: on") and hostmem.huge_pages_active(env)


@pytest.mark.parametrize(("env", "modules", "mode", "reason"), [
    ({"THP_MEM_ALLOC_ENABLE": "0"}, {}, "madvise", "left to the user"),
    ({"THP_MEM_ALLOC_ENABLE": "1"}, {}, "never", "left to the user"),
    ({"LORALAB_HUGE_PAGES": "0"}, {}, "madvise", "LORALAB_HUGE_PAGES=0"),
    ({"LORALAB_HUGE_PAGES": "off"}, {}, "always", "LORALAB_HUGE_PAGES=off"),
    ({}, {}, "never", "mode: never"),
    ({}, {}, None, "mode: unknown"),
    ({}, {"torch": object()}, "madvise", "torch was imported first"),
])
def test_left_alone(env, modules, mode, reason):
    before = dict(env)
    line = hostmem.enable_huge_pages(env, modules, mode)
    assert env == before, "an explicit choice or an impossible setting must not be changed"
    assert reason in line and "\n" not in line


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"THP_MEM_ALLOC_ENABLE", "LORALAB_HUGE_PAGES", "LD_PRELOAD",
                        "LORALAB_ALLOCATOR"}}
    return env | {"PYTHONPATH": str(ROOT)} | extra


_PROBE = """
import os, sys
from loralab.cli import main as cli
assert "torch" not in sys.modules, "importing the CLI must not import torch"
try:
    cli.main(["--help"])
except SystemExit:
    pass
print("THP=" + os.environ.get("THP_MEM_ALLOC_ENABLE", "-"))
"""


def _probe(**extra: str) -> str:
    """Run the real CLI entry in a fresh interpreter; the variable it left behind."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          env=_cli_env(**extra), timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_cli_sets_it_before_torch_where_the_kernel_allows():
    expected = "1" if hostmem.thp_mode() in {"madvise", "always"} else "-"
    assert _probe() == f"THP={expected}"


def test_cli_respects_the_users_choice():
    assert _probe(THP_MEM_ALLOC_ENABLE="0") == "THP=0"
    assert _probe(LORALAB_HUGE_PAGES="0") == "THP=-"


def test_lazy_package_exports_still_resolve():
    import loralab

    assert loralab.LoRAConfig.__name__ == "LoRAConfig"
    assert callable(loralab.save_adapter) and callable(loralab.load_adapter)
    with pytest.raises(AttributeError):
        loralab.no_such_name  # noqa: B018


@pytest.mark.skipif(hostmem.thp_mode() not in {"madvise", "always"},
                    reason="kernel does not allow madvised transparent huge pages")
def test_torch_allocator_really_uses_huge_pages():
    """With the variable set by the CLI path, large tensors land in huge pages (read back from
    the kernel's own accounting), and without it they do not."""
    code = ("import sys\n"
            "from loralab.kernels.hostmem import enable_for_this_process\n"
            "if sys.argv[1] == 'on':\n    enable_for_this_process()\n"
            "import torch\n"
            "keep = [torch.ones(1024, 1536) for _ in range(16)]\n"
            "rollup = open('/proc/self/smaps_rollup').read()\n"
            "print(int(rollup.split('AnonHugePages:')[1].split()[0]))\n")
    kb = {}
    for setting in ("on", "off"):
        done = subprocess.run([sys.executable, "-c", code, setting], capture_output=True,
                              text=True, env=_cli_env(), timeout=120)
        assert done.returncode == 0, done.stderr
        kb[setting] = int(done.stdout.strip().splitlines()[-1])
    assert kb["on"] >= 32 * 1024, kb  # most of the 96 MiB of tensors
    assert kb["off"] < kb["on"] / 4, kb


# --- caching allocator (tcmalloc) ---------------------------------------------------------

LIB = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
COMMAND = ["/venv/bin/loralab", "train"]


def test_find_allocator_takes_the_minimal_build_first(tmp_path):
    full, minimal = tmp_path / "a", tmp_path / "b"
    full.mkdir(), minimal.mkdir()
    (full / "libtcmalloc.so.4").write_bytes(b"")
    assert hostmem.find_allocator([full, minimal]) == full / "libtcmalloc.so.4"
    (minimal / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert hostmem.find_allocator([full, minimal]) == minimal / "libtcmalloc_minimal.so.4"
    assert hostmem.find_allocator([tmp_path / "none"]) is None


@pytest.mark.parametrize(("argv", "expected"), [
    (["/venv/bin/loralab", "compare"], True),
    (["/site-packages/loralab/__main__.py", "train"], True),   # python -m loralab, torchrun
    (["-c"], False), (["/home/me/my_script.py"], False), ([], False),
    (["/x/other/__main__.py"], False),
])
def test_is_loralab_command(argv, expected):
    assert hostmem.is_loralab_command(argv) is expected


def test_plan_preloads_tcmalloc_for_the_command():
    changes, line = hostmem.allocator_plan({}, "linux", LIB, COMMAND)
    assert changes == {"LD_PRELOAD": str(LIB),
                       "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
    assert line == f"allocator: tcmalloc ({LIB})"
    # the user's own gperftools setting is kept
    changes, _ = hostmem.allocator_plan({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, "linux",
                                        LIB, COMMAND)
    assert changes == {"LD_PRELOAD": str(LIB)}


@pytest.mark.parametrize(("env", "platform", "library", "argv", "reason"), [
    ({"LORALAB_ALLOCATOR": "system"}, "linux", LIB, COMMAND, "LORALAB_ALLOCATOR=system"),
    ({"LD_PRELOAD": str(LIB)}, "linux", LIB, COMMAND, "allocator: tcmalloc"),  # no loop
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux", LIB, COMMAND, "user's LD_PRELOAD"),
    ({}, "darwin", LIB, COMMAND, "Linux only"),
    ({}, "linux", None, COMMAND, "install libtcmalloc-minimal4"),
    ({}, "linux", LIB, ["/home/me/my_script.py"], "called from another program"),
])
def test_plan_leaves_the_process_alone(env, platform, library, argv, reason):
    changes, line = hostmem.allocator_plan(env, platform, library, argv)
    assert changes == {} and reason in line and "\n" not in line


def test_huge_pages_stay_off_under_tcmalloc():
    env = {"LD_PRELOAD": str(LIB)}
    line = hostmem.enable_huge_pages(env, {}, "madvise")
    assert "THP_MEM_ALLOC_ENABLE" not in env and "tcmalloc is preloaded" in line


def test_command_environment_is_what_the_command_gets():
    env = hostmem.command_environment({"PATH": "/bin"})
    if hostmem.find_allocator() is not None and sys.platform.startswith("linux"):
        assert "tcmalloc" in env["LD_PRELOAD"] and "THP_MEM_ALLOC_ENABLE" not in env
    else:
        assert "LD_PRELOAD" not in env
    assert hostmem.command_environment({"LORALAB_ALLOCATOR": "system"}).get("LD_PRELOAD") is None


_COMMAND_PROBE = """
import os, sys
sys.argv[0] = "/venv/bin/loralab"            # stands for the console script
sys.argv[1:] = os.environ["PROBE_ARGS"].split()  # e.g. `train --help`: prints help, exits 0
from loralab.cli import main as cli
from loralab.kernels import hostmem
print("pid", os.getpid(), flush=True)          # printed by the first and the re-executed run
try:
    cli.main()
except SystemExit:
    pass
print("ALLOC=" + hostmem.allocator_in_use(), "THP=" + os.environ.get("THP_MEM_ALLOC_ENABLE", "-"))
"""


def _command(args: str = "train --help", **extra: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _COMMAND_PROBE], capture_output=True,
                          text=True, env=_cli_env(PROBE_ARGS=args, **extra), timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


@pytest.mark.skipif(hostmem.find_allocator() is None or not sys.platform.startswith("linux"),
                    reason="tcmalloc is not installed (Debian/Ubuntu: libtcmalloc-minimal4)")
@pytest.mark.skipif(devices.gpu_host(os.environ), reason="a GPU host keeps the C allocator")
def test_the_command_restarts_itself_with_tcmalloc_mapped():
    """A real process: the command re-executes itself (same pid, so torchrun and shells still
    see one process), and the kernel's map of the new image holds tcmalloc. Only a training
    subcommand restarts: `runs` (no training) keeps the process and the C allocator."""
    lines = _command()
    pids = [line for line in lines if line.startswith("pid")]
    assert len(pids) == 2 and pids[0] == pids[1], lines
    assert lines[-1] == "ALLOC=tcmalloc THP=-"
    lines = _command(LORALAB_ALLOCATOR="system")
    assert len([line for line in lines if line.startswith("pid")]) == 1
    assert lines[-1].startswith("ALLOC=system")
    lines = _command("runs --help")
    assert len([line for line in lines if line.startswith("pid")]) == 1, lines
    assert lines[-1].startswith("ALLOC=system")


@pytest.mark.parametrize(("argv", "gpu", "reason"), [
    (["/venv/bin/loralab", "setup"], False, "`loralab setup` trains nothing"),
    (["/venv/bin/loralab", "report", "out"], False, "`loralab report` trains nothing"),
    (["/venv/bin/loralab", "--help"], False, "without a subcommand"),
    (["/venv/bin/loralab", "train", "--method", "lora"], True, "GPU host"),
    (["/venv/bin/loralab", "compare"], True, "GPU host"),
])
def test_plan_restarts_only_cpu_training_commands(argv, gpu, reason):
    """Issue 22: tcmalloc (a CPU-measured speed-up) is preloaded for `train` and `compare` on a
    host without a GPU only; the old code restarted every subcommand on every host."""
    changes, line = hostmem.allocator_plan({}, "linux", LIB, argv, gpu=gpu)
    assert changes == {} and reason in line and "\n" not in line
    assert hostmem.allocator_plan({}, "linux", LIB, [argv[0], "compare"])[0]  # CPU: preloaded


def test_library_callers_are_never_re_executed():
    """`cli.main(argv)` from a program (the tests) keeps its process and allocator."""
    code = ("import sys\nfrom loralab.cli import main as cli\n"
            "from loralab.kernels import hostmem\nsys.argv[0] = '/venv/bin/loralab'\n"
            "cli.main([])\n"
            "print('ALLOC=' + hostmem.allocator_in_use())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_cli_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ALLOC=system"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_release_free_memory_returns_freed_heap_to_the_kernel():
    """After 256 MiB of heap blocks are freed and released, the resident set is back near where
    it started, so RSSSampler's baseline counts live memory only. Checked with glibc (which
    trims at free) and, where installed, tcmalloc (which keeps freed memory until released)."""
    code = ("import ctypes, psutil\nfrom loralab.kernels import hostmem\n"
            "rss = lambda: psutil.Process().memory_info().rss // 2**20\n"
            "libc = ctypes.CDLL(None)\nlibc.malloc.restype = ctypes.c_void_p\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "start = rss()\n"
            "blocks = [libc.malloc(64 * 1024) for _ in range(4096)]\n"  # below mmap size
            "for b in blocks:\n    ctypes.memset(b, 1, 64 * 1024)\n"
            "for b in blocks:\n    libc.free(b)\n"
            "freed = rss()\n"
            "hostmem.release_free_memory()\n"
            "print(hostmem.allocator_in_use(), start, freed, rss())\n")
    envs = [{}] + ([{"LD_PRELOAD": str(hostmem.find_allocator())}]
                   if hostmem.find_allocator() else [])
    for extra in envs:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=_cli_env(**extra), timeout=120)
        assert done.returncode == 0, done.stderr
        allocator, start, freed, released = done.stdout.split()
        assert allocator == ("tcmalloc" if extra else "system")
        assert int(released) - int(start) < 64, done.stdout
        if extra:  # tcmalloc kept the freed blocks until asked
            assert int(freed) - int(start) >= 128, done.stdout


def test_a_failed_restart_carries_on_with_one_line(monkeypatch):
    """If the interpreter cannot be executed again, the command keeps running as it is."""
    def refuse(*_args):
        raise OSError("exec format error")

    for name in ("LD_PRELOAD", "LORALAB_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hostmem, "find_allocator", lambda: LIB)
    monkeypatch.setattr(hostmem.sys, "argv", COMMAND)
    monkeypatch.setattr(hostmem.sys, "platform", "linux")
    monkeypatch.setattr(hostmem.os, "execve", refuse)
    line = hostmem.preload_allocator()
    assert line == "allocator: the C library's (could not restart with tcmalloc: exec format error)"
    assert "LD_PRELOAD" not in os.environ
