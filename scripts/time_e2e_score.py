"""Time `loralab score` on an E2E-sized input and print the figure (not a test assertion).

Builds a system from the E2E test set (/work/shared/data/e2e/testset_w_refs.csv by default):
for every MR with at least two references, the first reference is held out as the "system
output" and the remaining ones are the references (616 MRs, ~6.6 references each). Writes
both as CSV in a temporary directory and runs the same code path as `loralab score --json`.

usage: python scripts/time_e2e_score.py [TESTSET_CSV]
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from loralab.scoring.e2e import read_score_inputs, score_e2e

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "testset_w_refs.csv"


def main() -> None:
    from loralab.costs.measure import describe_device

    print(describe_device("cpu"), flush=True)  # the timing depends on the CPU it ran on
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    groups: dict[str, list[str]] = {}
    with src.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            groups.setdefault(row["mr"], []).append(row["ref"])
    mrs = [mr for mr, refs in groups.items() if len(refs) >= 2]
    with tempfile.TemporaryDirectory() as tmp:
        sys_csv, refs_csv = Path(tmp) / "sys.csv", Path(tmp) / "refs.csv"
        with sys_csv.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["mr", "output"])
            writer.writerows([mr, groups[mr][0]] for mr in mrs)
        with refs_csv.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["mr", "ref"])
            writer.writerows([mr, ref] for mr in mrs for ref in groups[mr][1:])
        start, cpu = time.perf_counter(), time.process_time()
        refs, hyps = read_score_inputs(refs_csv, sys_csv)
        scores = score_e2e(refs, hyps)
        wall = time.perf_counter() - start
    n_refs = sum(len(r) for r in refs)
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    print(f"{len(hyps)} sources, {n_refs} references ({n_refs / len(hyps):.1f} per source): "
          f"{wall:.1f} s wall ({time.process_time() - cpu:.1f} s CPU in the main process)")


if __name__ == "__main__":
    main()
