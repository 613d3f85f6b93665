"""Wall time of a small MiniLM study with `loralab compare --jobs 1` and `--jobs 2`.

The study has 6 runs: 3 strategies (untuned, head, LoRA r=4 on q,v) x 2 seeds of MiniLM-L6 on
rt-snippets. Each setting runs `loralab compare` in a fresh subprocess into a fresh output
folder (nothing is reused between them), one after the other. Printed: the CPU (and GPUs),
each setting's whole wall time (the command, model loading and the report included) and the
study's own time (`study '...' done in N s`: the runs only), and the ratio jobs=1 / jobs=N.

Runs of a study are independent, so on N GPUs `--jobs N` approaches N times faster until data
loading, disk or the results database become the bottleneck. On a CPU the workers share the
cores (each gets cores // N torch threads), so the gain is only what one run leaves unused
(its Python overhead, evaluation and model loading not spread over all cores).

    python benchmarks/bench_jobs.py                       # --steps 100: ~20-40 s per run
    python benchmarks/bench_jobs.py --steps 4 --jobs 1,2  # a quick check that it works
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = """\
name: bench-jobs
model: minilm-l6
task: classify
num_labels: 2
data: {{name: rt-snippets, fraction: {fraction}}}
eval: [{{name: rt-snippets, data: rt-snippets, max_examples: {eval_examples}}}]
budget: {{max_steps: {steps}, batch_size: 8, seq_len: 64, lr: 1.0e-3, eval_every: 1000,
         eval_max_examples: {eval_examples}}}
seeds: 2
strategies:
  - {{name: head, method: head}}
  - {{name: lora-r4, method: lora, preset: qv, rank: 4, alpha: 8}}
"""


def machine() -> str:
    """The CPU model and core count, and the GPUs torch sees."""
    import torch

    from loralab.costs.measure import cpu_info

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return (f"CPU: {cpu_info().model}, {cores} cores available; "
            f"GPUs: {', '.join(gpus) if gpus else 'none'}; torch {torch.__version__}")


def run(study: Path, out: Path, jobs: int, log: Path) -> tuple[float, float | None]:
    """(wall seconds of `loralab compare --jobs N`, the study's own seconds) into `out`."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loralab", "compare", str(study), "--out",
                           str(out), "--jobs", str(jobs)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"--jobs {jobs} failed (exit {proc.returncode}):\n"
                 + (proc.stdout + proc.stderr)[-3000:])
    found = re.search(r"study '[^']+' done in (\d+) s", proc.stdout)
    return wall, float(found.group(1)) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per trained run")
    ap.add_argument("--fraction", type=float, default=0.2, help="share of rt-snippets to use")
    ap.add_argument("--eval-examples", type=int, default=64,
                    help="examples of each evaluation")
    ap.add_argument("--jobs", default="1,2", help="comma-separated --jobs settings, in order")
    ap.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    args = ap.parse_args()
    settings = [int(j) for j in args.jobs.split(",")]
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        study = root / "bench-jobs.yaml"
        study.write_text(STUDY.format(steps=args.steps, fraction=args.fraction,
                                      eval_examples=args.eval_examples))
        print(f"study: 6 runs (untuned, head, lora-r4 qv) x 2 seeds, {args.steps} steps, "
              f"batch 8 x 64 tokens, rt-snippets fraction {args.fraction}", flush=True)
        times = {}
        for jobs in settings:
            out = root / f"jobs{jobs}"
            wall, own = run(study, out, jobs, root / f"jobs{jobs}.log")
            times[jobs] = (wall, own)
            print(f"--jobs {jobs}: {wall:.0f} s wall (the whole command), study "
                  f"{own if own is not None else float('nan'):.0f} s (log {root}/jobs{jobs}.log)",
                  flush=True)
        base = times[settings[0]]
        for jobs in settings[1:]:
            wall, own = times[jobs]
            ratio = f"{base[1] / own:.2f}x" if base[1] and own else "n/a"
            print(f"speed-up of --jobs {jobs} over --jobs {settings[0]}: "
                  f"{base[0] / wall:.2f}x wall, {ratio} study")


if __name__ == "__main__":
    main()
