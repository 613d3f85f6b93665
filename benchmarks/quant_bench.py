"""Float + LoRA vs post-training quantization vs QAT-LoRA, side by side on one task.

    .venv/bin/python benchmarks/quant_bench.py                      # minilm-l6 on rt-snippets, int8
    .venv/bin/python benchmarks/quant_bench.py --scheme int8-dyn --steps 60
    .venv/bin/python benchmarks/quant_bench.py --model smollm2-135m --task lm --data wiki-leads

Prints one table (quality on the held-out split, state-dict size on disk, weight bytes, logical
parameters, median forward latency on this CPU with the three models timed interleaved, KL of
each quantized model's predictions from the float model's) and writes the full result as JSON.
The machine may be shared: latency medians over interleaved rounds damp, not remove, that noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--task", default="classify")
    ap.add_argument("--data", default="rt-snippets")
    ap.add_argument("--scheme", default="int8")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--preset", default="qv")
    ap.add_argument("--data-fraction", type=float, default=0.2)
    ap.add_argument("--eval-examples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="runs/quant-bench")
    ap.add_argument("--memory", action="store_true",
                    help="instead: memory of one LoRA training step on a float vs int8 vs nf4 "
                         "frozen base (QLoRA), each in a fresh process")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from loralab.costs.measure import describe_device

    print(describe_device("cpu"), flush=True)  # the CPU and its flags decide every figure
    if args.memory:
        memory_table(args)
        return

    from loralab.quant.core import compare_quantization, format_comparison

    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    result = compare_quantization(
        args.model, args.task, args.data, args.scheme, out=out, max_steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, rank=args.rank,
        preset=args.preset, data_fraction=args.data_fraction, eval_examples=args.eval_examples,
        latency_repeats=args.repeats, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_comparison(result))
    merge = result["rows"][2].get("merge", {})
    if merge:
        print(f"QAT-LoRA merge drift (Q(W)+sBA served unmerged vs Q(W+sBA) merged): "
              f"{json.dumps(merge.get('merge_logit_drift'))}; metric drift "
              f"{json.dumps(merge.get('merge_metric_drift'))}")
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"full result: {out / 'result.json'}")


def memory_table(args) -> None:
    import subprocess

    rows = []
    for scheme in (None, "int8", "nf4"):
        code = ("import json, sys; from loralab.quant.core import training_step_memory; "
                f"print('JSON' + json.dumps(training_step_memory({args.model!r}, {args.task!r}, "
                f"{scheme!r}, batch_size={args.batch_size}, seq_len={args.seq_len}, "
                f"rank={args.rank}, preset={args.preset!r})))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        line = next((x for x in res.stdout.splitlines() if x.startswith("JSON")), None)
        if line is None:
            raise SystemExit(res.stderr[-2000:])
        rows.append(json.loads(line[4:]))
    print(f"{args.model}, LoRA r={args.rank} {args.preset}, one step, batch "
          f"{args.batch_size} x {args.seq_len}")
    print(f"{'base':6s} {'weights MB':>10s} {'logical params':>15s} {'trainable':>10s} "
          f"{'peak tensors MB':>15s} {'peak RSS +MB':>12s} {'step s':>7s}")
    for r in rows:
        print(f"{r['scheme']:6s} {r['weight_bytes'] / 1e6:10.2f} {r['logical_params']:15,d} "
              f"{r['trainable_params']:10,d} {r['peak_tensor_bytes'] / 1e6:15.2f} "
              f"{r['peak_rss_delta_bytes'] / 1e6:12.1f} {r['step_seconds']:7.2f}")


if __name__ == "__main__":
    main()
