"""Where a LoRA training step's time and memory go: loralab's step vs transformers + PEFT.

Builds the same step as `loralab.training.loop` (`Strategy.prepare`'s model surgery, the
fused causal-LM loss, fused AdamW) and the hand-written PEFT step of `bench_train.py`, then

- times forward (for loralab this includes the fused loss's gradient, formed in the forward
  pass), backward and optimizer phases of a few steps, the sides interleaved;
- profiles two steps of each with torch.profiler (self CPU time per op);
- sums the activations autograd keeps for backward (distinct storages, parameters excluded),
  grouped by the source line that saved them;
- counts each step's minor page faults.

Both sides share this process, so they share its allocator settings: run it with
`THP_MEM_ALLOC_ENABLE=1` to see both as under the `loralab` command (huge pages for large
tensors, `loralab.kernels.hostmem`), without it for the process defaults.

    python benchmarks/profile_step.py --steps 3 --dropout 0.1
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/profile_step.py --steps 3 --dropout 0.1
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import _model as bench_model


def build(side: str, dropout: float, rank: int, preset: str, model_name: str):
    """(model, loss_fn(ids) -> scalar loss, optimizer) for 'loralab' or 'peft'."""
    from loralab.kernels.losses import CausalLMLoss
    from loralab.lora.targets import resolve_targets
    from loralab.training.config import make_config
    from loralab.training.strategies.base import strategy_for

    model, _ = bench_model(model_name)  # seeds torch; the same models as bench_train.py
    if side == "peft":
        from peft import LoraConfig, get_peft_model

        names = [t.name for t in resolve_targets(model, preset)]
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                 lora_dropout=dropout, target_modules=names,
                                                 fan_in_fan_out=model_name == "gpt2-shaped"))

        def loss_fn(ids):
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        fused = False
    else:
        config = make_config(model=model_name, task="lm", data="synthetic", method="lora",
                             preset=preset, rank=rank, alpha=2.0 * rank, dropout=dropout,
                             out="unused")
        strategy_for(config).prepare(model)
        net = CausalLMLoss(model)

        def loss_fn(ids):
            return net(ids, torch.ones_like(ids), ids) / ids.numel()
        fused = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, loss_fn, torch.optim.AdamW(params, lr=1e-4, fused=fused)


def step(loss_fn, optimizer, ids) -> tuple[float, float, float, int]:
    """(forward s, backward s, optimizer s, minor page faults) of one training step."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    loss = loss_fn(ids)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def saved_by_line(model, loss_fn, ids) -> tuple[float, list[tuple[str, float]]]:
    """MB of activations saved for backward in one forward, total and by source line."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    by_line: collections.Counter = collections.Counter()

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in params:
            seen[key] = t.untyped_storage().nbytes()
            frames = [f for f in traceback.extract_stack()
                      if "transformers" in f.filename or "loralab" in f.filename
                      or "peft" in f.filename]
            where = (f"{Path(frames[-1].filename).name}:{frames[-1].lineno} "
                     f"{(frames[-1].line or '')[:50]}") if frames else "?"
            by_line[where] += seen[key]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(ids)
    del loss
    return sum(seen.values()) / 2**20, [(k, v / 2**20) for k, v in by_line.most_common(8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m or gpt2-shaped (12 layers, 768 wide, random weights)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--preset", default="qv")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12, help="ops listed per profile")
    parser.add_argument("--sides", default="loralab,peft",
                        help="comma-separated; one side alone shows its own allocator "
                        "behaviour (two sides share one heap)")
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from loralab.costs.measure import describe_device

    print(describe_device("cpu"), flush=True)  # the CPU and its flags decide every figure

    generator = torch.Generator().manual_seed(1)
    sides = {s: build(s, args.dropout, args.rank, args.preset, args.model)
             for s in args.sides.split(",")}
    vocab = next(iter(sides.values()))[0].config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
               for _ in range(args.steps + 1)]
    for _, loss_fn, optimizer in sides.values():
        step(loss_fn, optimizer, batches[0])                    # warm-up
    phases = {s: [] for s in sides}
    for ids in batches[1:]:
        for side, (_, loss_fn, optimizer) in sides.items():
            phases[side].append(step(loss_fn, optimizer, ids))
    huge = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    print(f"{args.model}, LoRA {args.preset} r={args.rank}, dropout {args.dropout}, "
          f"{args.batch} x {args.seq} fp32, THP_MEM_ALLOC_ENABLE={huge}; medians of "
          f"{args.steps} steps (s)")
    print("| side | forward (+ fused loss grad) | backward | optimizer | step | minor faults |")
    print("|---|---|---|---|---|---|")
    for side, rows in phases.items():
        med = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(f"| {side} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.3f} | {sum(med[:3]):.2f} | "
              f"{med[3]:,.0f} |")
    for side, (model, loss_fn, optimizer) in sides.items():
        total, lines = saved_by_line(model, loss_fn, batches[0])
        print(f"\n{side}: {total:,.0f} MB of activations saved for backward")
        for where, mb in lines:
            print(f"  {mb:7.1f} MB  {where}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for ids in batches[1:3]:
                step(loss_fn, optimizer, ids)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        whole = sum(e.self_cpu_time_total for e in events)
        print(f"{side}: self CPU time by op over 2 steps ({whole / 1e6:.1f} s)")
        for e in events[:args.rows]:
            print(f"  {100 * e.self_cpu_time_total / whole:5.1f}%  {e.key} ({e.count} calls)")


if __name__ == "__main__":
    main()
