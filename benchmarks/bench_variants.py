"""The LoRA variants' training cost next to plain LoRA's: step time and peak memory.

Each variant is one set of TrainConfig fields on top of the same LoRA run (method lora, the
same preset, rank, alpha = 2 rank, dropout, batch, sequence length, precision), trained by
loralab's own `train` on synthetic token batches, each in a fresh subprocess, so the peak
memory figure is the variant's own:

    lora     plain LoRA                          (no fields)
    rslora   rank-stabilised scale alpha/sqrt(r) rslora: true
    dora     weight-decomposed LoRA              dora: true
    pissa    principal singular vectors init     init: pissa
    olora    QR (orthonormal) init               init: olora
    lora+    B learns 16x faster than A          lr_ratio: 16

Step time: the seconds of each optimizer step as the training loop itself times them (forward,
backward, optimizer step), median of the `--steps` steps after `--warmup` warm-up steps. Peak
memory: the record's `peak_memory_bytes` (resident set added by training, sampled by
loralab.costs.measure.RSSSampler once the model and optimizer exist, as in bench_train.py) and
`peak_tensor_bytes` (the largest live tensor bytes the run saw). One-time costs (PiSSA's SVD,
OLoRA's QR) happen before the first step and are not in either figure. With `--repeats` > 1
the variants are interleaved (A, B, C, A, B, C, ...) so slow drifts of a shared machine hit all.

    python benchmarks/bench_variants.py                         # smollm2-135m, 8 x 128, qv, r 8
    python benchmarks/bench_variants.py --model smollm2-135m --batch 8 --seq 128 --steps 10 \
        --preset attn-proj-ffn --rank 16 --repeats 3
    python benchmarks/bench_variants.py --model minilm-l6 --steps 2 --batch 4 --seq 32  # smoke

A variant whose fields this checkout's TrainConfig does not know (yet) is reported as failed,
with the worker's last error line; the others still run. minilm-l6 (an encoder) trains as a
2-label classifier on the same synthetic ids; causal LMs train as language models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from types import SimpleNamespace
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"rslora": True},
    "dora": {"dora": True},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "lora+": {"lr_ratio": 16.0},
}
"""Variant name -> the TrainConfig fields it sets on top of plain LoRA."""


# ------------------------------------------------------------------------------------ worker

def _load(name: str) -> tuple[Any, str]:
    """(loaded model, task): a causal LM trains on `lm`; an encoder (minilm-l6) on `classify`."""
    from loralab.errors import UserError
    from loralab.models.loading import load_model

    try:
        return load_model(name, "lm"), "lm"
    except UserError as first:
        try:
            return load_model(name, "classify"), "classify"
        except UserError:
            raise first from None


def _data(task: str, vocab: int, rows: int, seq: int) -> SimpleNamespace:
    """`rows` random full-length rows (no padding: every step has batch x seq tokens); labels
    are the ids (lm) or a random class (classify)."""
    import datasets
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, seq), generator=generator)
    labels = ids.tolist() if task == "lm" else \
        torch.randint(0, 2, (rows,), generator=generator).tolist()
    columns = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
               "labels": labels}
    train_set = datasets.Dataset.from_dict(columns).with_format("torch")

    def collate(items: list[dict]) -> dict:
        return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in columns}

    return SimpleNamespace(splits={"train": train_set}, collate_fn=collate)


def worker(args: argparse.Namespace) -> dict:
    """One variant's run: step seconds (median after warm-up) and peak memory."""
    import torch

    from loralab.training import loop
    from loralab.training.config import make_config

    torch.manual_seed(0)
    loaded, task = _load(args.model)
    steps = args.warmup + args.steps
    data = _data(task, loaded.model.config.vocab_size, args.batch * steps, args.seq)
    seconds: list[float] = []
    advance = loop._advance

    def timed(state: Any, result: Any, step_seconds: float, logger: Any) -> None:
        seconds.append(step_seconds)  # the loop's own timing of this optimizer step
        advance(state, result, step_seconds, logger)

    loop._advance = timed  # type: ignore[assignment]  # read the step times, change nothing
    with tempfile.TemporaryDirectory() as out:
        config = make_config(VARIANTS[args.variant], model=args.model, task=task,
                             data="synthetic", method="lora", preset=args.preset,
                             rank=args.rank, alpha=2.0 * args.rank, dropout=args.dropout,
                             max_steps=steps, batch_size=args.batch, grad_accum=1, lr=1e-4,
                             seq_len=args.seq, precision=args.precision, eval_every=10**9,
                             warmup_steps=0, keep_best=False, compile="off",
                             out=os.path.join(out, "run"))
        record = loop.train(config, loaded=loaded, task_data=data)
    costs = record["costs"]
    timed_steps = seconds[args.warmup:]
    return {"variant": args.variant, "task": task,
            "step_seconds": statistics.median(timed_steps),
            "steps_timed": len(timed_steps),
            "peak_rss_bytes": costs["peak_memory_bytes"],
            "peak_tensor_bytes": costs.get("peak_tensor_bytes", 0),
            "trainable": costs["trainable_params"]}


# ------------------------------------------------------------------------------------ driver

def _environment() -> dict[str, str]:
    """The environment the `loralab` command gives its process (host-memory setting,
    loralab.kernels.hostmem), with this checkout first on the path."""
    from loralab.kernels import hostmem

    base = dict(os.environ) | {"PYTHONPATH": ROOT, "TRANSFORMERS_VERBOSITY": "error"}
    return hostmem.command_environment(base)


def _run(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant]
    for key in ("model", "batch", "seq", "steps", "warmup", "preset", "rank", "dropout",
                "precision"):
        cmd += [f"--{key}", str(getattr(args, key))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_environment())
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"variant": variant, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mb(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def table(results: dict[str, list[dict]], reference: str = "lora") -> str:
    """A markdown table: per variant the median step time and peak memories over the repeats,
    and their ratios to `reference` (plain LoRA)."""
    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    ok = {v: runs for v, runs in results.items() if runs and all("error" not in r for r in runs)}
    ref = ok.get(reference)
    lines = ["| variant | fields | step s (median) | vs lora | peak RSS MB | vs lora | "
             "peak tensors MB | vs lora | trainable |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, runs in results.items():
        fields = ", ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()) or "-"
        if variant not in ok:
            error = next((r["error"] for r in runs if "error" in r), "no run")
            lines.append(f"| {variant} | {fields} | failed: {error} | | | | | | |")
            continue
        cells = []
        for key, show in (("step_seconds", lambda x: f"{x:.3f}"), ("peak_rss_bytes", _mb),
                          ("peak_tensor_bytes", _mb)):
            value = med(runs, key)
            ratio = f"{value / med(ref, key):.2f}x" if ref and med(ref, key) else "-"
            cells += [show(value), ratio]
        lines.append(f"| {variant} | {fields} | {' | '.join(cells)} | {runs[0]['trainable']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a bundled model: smollm2-135m (lm) or minilm-l6 (classify)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--preset", default="qv")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per variant, interleaved; the table shows medians")
    parser.add_argument("--json", action="store_true", help="also print every run as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="lora", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)  # loralab from this checkout, for the driver and its workers
    if args.worker:  # a worker's stdout ends with its JSON line
        print(json.dumps(worker(args)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    from loralab.costs.measure import describe_device

    print(describe_device("cpu"), flush=True)  # the CPU and its flags decide every figure
    print(f"{args.model}, LoRA {args.preset} r={args.rank} alpha={2 * args.rank} dropout "
          f"{args.dropout}, {args.batch} x {args.seq}, {args.precision}, median of {args.steps} "
          f"steps after {args.warmup} warm-up, {args.repeats} repeat(s), one process per run",
          flush=True)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            run = _run(args, variant)
            results[variant].append(run)
            if args.json:
                print(json.dumps(run), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
