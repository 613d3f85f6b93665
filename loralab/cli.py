"""The `loralab` command.

Each subcommand is one `_cmd_*` function plus its parser in `build_parser`. Errors the user can
fix are `UserError`s: printed as one line on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from loralab.errors import UserError

EPILOG = """examples:
  loralab targets smollm2-135m --preset attn-proj-ffn
  loralab compare                      # the bundled offline study
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loralab",
        description="Fine-tune transformers fully, head-only or with LoRA, and compare the costs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # --- subcommands are registered below, one block each ---
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
