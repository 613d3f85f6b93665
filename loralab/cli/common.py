"""What several commands share: how a command describes itself, and how it takes a run
directory."""

from __future__ import annotations

import argparse

from loralab.errors import UserError


def describe(p: argparse.ArgumentParser, description: str | None, epilog: str | None) -> None:
    """Set a command's description and epilog (its examples, printed as written)."""
    p.description, p.epilog = description, epilog
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def add_run_argument(p: argparse.ArgumentParser, what: str = "run directory") -> None:
    """Every command that reads a run directory takes it the same way: `RUN` as its first
    positional argument, or `--run RUN` (the older spelling, kept so scripts keep working)."""
    p.add_argument("run", nargs="?", metavar="RUN", help=f"{what} (OUT/<study>/runs/<name>, or "
                   "a `loralab train --out` directory)")
    p.add_argument("--run", dest="run_option", metavar="RUN", help="the same, as an option")


def given_run_dir(args: argparse.Namespace) -> str | None:
    """The run directory given as RUN or --run (one of them; the same if both), or None.
    Raises UserError if they differ."""
    run, option = getattr(args, "run", None), getattr(args, "run_option", None)
    if run and option and run != option:
        raise UserError(f"two run directories given ({run} and --run {option}); give one")
    return run or option


def run_dir(args: argparse.Namespace) -> str:
    """The run directory given as RUN or --run. Raises UserError if none is given."""
    given = given_run_dir(args)
    if not given:
        raise UserError(f"`loralab {args.command}` needs a run directory: loralab "
                        f"{args.command} RUN ... (see `loralab runs`)")
    return given
