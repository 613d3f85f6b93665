"""The `loralab` command: a table of commands, each run by its own module, imported when used.

The whole grammar (`loralab.cli.parsers`) is torch-free, so `loralab --help` and
`loralab CMD --help` are fast. Running CMD imports its module (`loralab.cli.<module>`, from
`COMMANDS`) and calls `RUN[CMD](args)`; the process-level memory settings
(`kernels.hostmem`) are applied before that import, since torch reads them once when it
starts. Errors the user can fix are `UserError`s: printed as one line on stderr with exit code
2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from loralab import __version__
from loralab.cli.parsers import PARSERS
from loralab.errors import UserError
from loralab.kernels.hostmem import enable_for_this_process, preload_allocator

EPILOG = """examples:
  loralab targets smollm2-135m --preset attn-proj-ffn
  loralab compare                      # the bundled offline study
  loralab compare studies/distilbert-imdb-offline.yaml --seeds 3
  loralab runs loralab-out/default --status finished
  loralab report loralab-out/default   # rebuild report.md/.html/results.csv from the database
  loralab merge loralab-out/default/runs/lora-2-seed0 --out merged/
  loralab generate loralab-out/default/runs/lora-2-seed0 --prompt "The Moon is"
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "fine-tune one model with one strategy and measure its costs"),
    "eval": ("evaluate", "evaluate a finished run, or a model (+ adapter), on a dataset"),
    "score": ("score", "score system outputs against references (E2E metrics)"),
    "targets": ("targets", "list the modules a LoRA preset adapts (no training)"),
    "compare": ("compare", "run a study (strategies x seeds) and write its report"),
    "runs": ("compare", "list the runs of a study output directory, with filters"),
    "report": ("compare", "rebuild a study's report from its results database"),
    "merge": ("models", "write a run's model with adapters merged, for serving"),
    "generate": ("models", "sample text from a run's model (or classify a text)"),
    "setup": ("setup", "install the bundled offline models and data"),
    "data": ("data", "show what a dataset holds (splits, tokens, labels, a sample)"),
    "studies": ("studies", "list, show or copy the bundled study files"),
    "env": ("env", "versions, device, bf16, allocator and cache paths (for bug reports)"),
}
"""command -> (the module under loralab.cli whose `RUN[command](args)` runs it, the one line
`loralab --help` shows). Its options come from `parsers.PARSERS[command]`."""


def build_parser() -> argparse.ArgumentParser:
    """The `loralab` parser, every command with its options (imports no command module)."""
    parser = argparse.ArgumentParser(
        prog="loralab", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune transformers fully, head-only or with LoRA, and compare the costs.")
    parser.add_argument("--version", action="version", version=f"loralab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        PARSERS[name](p)
        # each command reports its own unknown options with its own usage (`main`)
        p.set_defaults(_parser=p)
    return parser


def _quiet_libraries() -> None:
    """Keep library chatter (transformers' load reports and progress bars, torchao's optional
    kernel notices) off the terminal, so the command's own output and errors stay readable."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run `loralab ARGV...`; the exit code: 0 done, 1 a run failed, 2 a usage or user error,
    130 interrupted."""
    if argv is None:  # the command itself: may start over with tcmalloc preloaded
        preload_allocator()
    enable_for_this_process()  # before anything imports torch: its allocator reads it once
    _quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]  # `compare STUDY --seeds 3 k=v`
    elif extra:  # the subcommand's usage, not the top level's: `train --bogus`
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        module = importlib.import_module(f"loralab.cli.{COMMANDS[args.command][0]}")
        return int(module.RUN[args.command](args) or 0)
    except UserError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
