"""Huge-page setting of the command line (loralab.hostmem): when it is set, when it is left
alone, and that the CLI applies it before torch exists in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loralab import hostmem

ROOT = Path(__file__).resolve().parents[1]


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
           if k not in {"THP_MEM_ALLOC_ENABLE", "LORALAB_HUGE_PAGES"}}
    return env | {"PYTHONPATH": str(ROOT)} | extra


_PROBE = """
import os, sys
from loralab import cli
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
            "from loralab.hostmem import enable_for_this_process\n"
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
