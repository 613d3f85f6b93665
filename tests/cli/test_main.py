"""`loralab` itself: --version, a fast top-level --help, unknown options."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loralab", *args], capture_output=True,
                          text=True, timeout=300, check=False, **kw)


def test_version_is_the_installed_distribution_version():
    done = _run("--version")
    assert done.returncode == 0, done.stderr
    import loralab

    assert done.stdout.strip() == f"loralab {loralab.__version__}"
    assert loralab.__version__ == metadata.version("loralab")


def test_unknown_option_shows_the_subcommands_usage():
    done = _run("train", "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: loralab train")
    assert done.stderr.strip().splitlines()[-1] == \
        "loralab train: error: unrecognized arguments: --bogus"
    done = _run("runs", "--bogus")
    assert "usage: loralab runs" in done.stderr and "loralab runs: error" in done.stderr


def test_top_level_help_lists_every_command_without_importing_torch():
    from loralab.cli.main import COMMANDS

    code = ("import sys\nfrom loralab.cli.main import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, "
            "'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"
    for name in COMMANDS:
        assert f"\n    {name} " in done.stdout, name


def test_each_command_is_run_by_its_own_module():
    import importlib

    from loralab.cli.main import COMMANDS
    from loralab.cli.parsers import PARSERS

    assert list(PARSERS) == list(COMMANDS)
    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(f"loralab.cli.{module}").RUN[name]), name


def test_every_commands_help_imports_no_torch():
    code = ("import sys\nfrom loralab.cli.main import COMMANDS, build_parser\n"
            "parser = build_parser()\nfor name in COMMANDS:\n"
            "    try:\n        parser.parse_args([name, '--help'])\n"
            "    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert "usage: loralab train" in done.stdout and "--eval-max-examples" in done.stdout
