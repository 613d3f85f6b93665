"""Side-by-side training-step benchmarks: loralab's own `train` vs transformers + PEFT.

Every measurement runs in a fresh subprocess (so peak-RSS figures do not bleed into each other),
and the two sides alternate A, B, A, B, ... so slow drifts of this shared machine hit both.
Each worker runs `--steps` optimizer steps after one warm-up step and reports steady-state
tokens/s (warm-up excluded) and the peak resident set added by training (sampled by
loralab.costs.measure.RSSSampler, started after the model and optimizer exist, on both sides).

    # loralab vs PEFT, one scenario, 3 repeats each
    python benchmarks/bench_train.py compare --model smollm2-135m --batch 8 --seq 128 \
        --precision fp32 --preset qv --dropout 0.1 --repeats 3
    # the whole matrix of the performance issue (long: ~1.5 h here)
    python benchmarks/bench_train.py matrix
    # full vs LoRA vs head-only through loralab, with model FLOPs utilisation
    python benchmarks/bench_train.py methods --model smollm2-135m
    # inference latency: base vs unmerged adapter vs merged
    python benchmarks/bench_train.py inference --model smollm2-135m
    # bf16 autocast vs fp32 through loralab's train on real text (wiki-leads): tokens/s and the
    # validation loss after the same steps from the same seed
    python benchmarks/bench_train.py precision --batch 4 --seq 128 --steps 20 --lr 1e-3

Host memory (`loralab.kernels.hostmem`): the `loralab` command starts with tcmalloc preloaded
where the library is installed (else with PyTorch's transparent-huge-page allocation), so the
loralab worker is launched in the environment the command would give it (it stands for a
`loralab train` run); the PEFT worker runs with the process defaults, as a hand-written script does.
`--ablate-host-memory` adds three interleaved sides: loralab with the process defaults, loralab
with huge pages only (the command's setting before tcmalloc), and PEFT with the command's
setting, so the setting's share of the speed-up is measured, not assumed.

The PEFT side is what users write by hand: `get_peft_model` with the same target modules, rank,
alpha and dropout, `model(input_ids, labels=...).loss.backward()`, `torch.optim.AdamW` with its
defaults, `torch.autocast` for bf16. GPT-2's fused c_attn cannot be sliced in PEFT, so there the
`qv` preset adapts the whole c_attn on the PEFT side (more work for PEFT; said in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ workers

def _model(name: str):
    """(model, tokenizer-or-None) for a bundled model or the GPT-2-shaped random model."""
    import torch

    torch.manual_seed(0)
    if name == "gpt2-shaped":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        return GPT2LMHeadModel(config), None
    from loralab.models.loading import load_model

    loaded = load_model(name, "lm")
    return loaded.model, loaded.tokenizer


def _batches(vocab: int, batch: int, seq: int, count: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(count)]


def _host() -> dict:
    """This worker's host-memory setting, read back: huge pages on, and the allocator mapped."""
    from loralab.kernels.hostmem import allocator_in_use, huge_pages_active

    return {"huge_pages": huge_pages_active(os.environ), "allocator": allocator_in_use()}


def worker_loralab(args) -> dict:
    import datasets
    import torch

    from loralab.training.config import make_config
    from loralab.training.loop import train

    model, tokenizer = _model(args.model)
    vocab = model.config.vocab_size
    steps = args.steps + 1
    ids = torch.cat(_batches(vocab, args.batch, args.seq, steps))
    rows = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
            "labels": ids.tolist()}
    train_set = datasets.Dataset.from_dict(rows).with_format("torch")

    def collate(items):
        return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in rows}

    data = SimpleNamespace(splits={"train": train_set}, collate_fn=collate)
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, notes=())
    with tempfile.TemporaryDirectory() as out:
        config = make_config(model=args.model, task="lm", data="synthetic", method=args.method,
                             preset=args.preset, rank=args.rank, alpha=2.0 * args.rank,
                             dropout=args.dropout, max_steps=steps, batch_size=args.batch,
                             grad_accum=1, lr=1e-4, seq_len=args.seq, precision=args.precision,
                             eval_every=10**9, warmup_steps=0, compile=args.compile,
                             out=os.path.join(out, "run"))
        record = train(config, loaded=loaded, task_data=data)
    costs = record["costs"]
    steady = (costs["train_seconds"] - costs["first_step_seconds"]) / max(1, args.steps)
    return {"tokens_per_second": costs["tokens_per_second"],
            "first_step_extra": costs["first_step_seconds"] - steady,
            "peak_rss_delta": costs["peak_memory_bytes"],
            "flops_per_token": record["estimates"]["flops_per_token"],
            "peak_flops_per_second": record["estimates"]["peak_flops_per_second"],
            "peak_shapes": [list(s) for s in _peak_shapes(model, args.batch * args.seq)],
            "trainable": costs["trainable_params"]} | _host()


def _peak_shapes(model, tokens: int) -> tuple:
    from loralab.costs.peak import matmul_shapes

    return matmul_shapes(model, tokens)


def worker_quality(args) -> dict:
    """loralab's `train` on real text at `args.precision`: LoRA for `--steps` steps (plus the
    warm-up step) on the first wiki-leads training blocks, from seed 0, then the loss on the first
    `--eval-examples` validation blocks, evaluated in the run's own precision as `train` does.
    The same blocks, seed and dropout masks on both precisions, so the losses differ by rounding
    only. `--method none` gives the untrained model's loss, the scale to read the gap against."""
    from loralab.data.tasks import load_task_data
    from loralab.models.loading import load_model
    from loralab.training.config import make_config
    from loralab.training.loop import train

    loaded = load_model(args.model, "lm")
    data = load_task_data("wiki-leads", "lm", loaded.tokenizer, seq_len=args.seq)
    steps = args.steps + 1
    splits = {"train": data.splits["train"].select(range(args.batch * steps)),
              "validation": data.splits["validation"].select(range(args.eval_examples))}
    task_data = SimpleNamespace(splits=splits, collate_fn=data.collate_fn)
    with tempfile.TemporaryDirectory() as out:
        config = make_config(model=args.model, task="lm", data="wiki-leads", method=args.method,
                             preset=args.preset, rank=args.rank, alpha=2.0 * args.rank,
                             dropout=args.dropout, max_steps=steps, batch_size=args.batch,
                             grad_accum=1, lr=args.lr, seq_len=args.seq, precision=args.precision,
                             eval_batches=1, warmup_steps=0, keep_best=False, compile="off",
                             out=os.path.join(out, "run"))
        record = train(config, loaded=loaded, task_data=task_data)
    costs = record["costs"]
    return {"tokens_per_second": costs.get("tokens_per_second", 0.0),
            "validation_loss": record["metrics"]["validation"]["loss"],
            "eval_seconds": costs.get("eval_seconds", 0.0),
            "peak_rss_delta": costs.get("peak_memory_bytes", 0),
            "notes": record["notes"]} | _host()


def worker_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from loralab.costs.measure import RSSSampler
    from loralab.lora.targets import resolve_targets

    model, _ = _model(args.model)
    if args.method == "lora":
        names = [t.name for t in resolve_targets(model, args.preset)]
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                            target_modules=names, fan_in_fan_out=args.model == "gpt2-shaped")
        model = get_peft_model(model, config)
    elif args.method == "full":
        model.requires_grad_(True)
    else:
        raise SystemExit("peft worker: --method lora or full")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = _batches(model.config.vocab_size, args.batch, args.seq, args.steps + 1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    sampler = RSSSampler().start()
    times = []
    for ids in batches:
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = sampler.stop()
    steady = times[1:]
    return {"tokens_per_second": args.batch * args.seq * len(steady) / sum(steady),
            "peak_rss_delta": peak, "trainable": sum(p.numel() for p in params)} | _host()


def worker_inference(args) -> dict:
    """Median forward latency of base, unmerged adapter and merged adapter, interleaved
    (base, unmerged, merged, base, ...): the base is an untouched copy of the model."""
    import copy

    import torch
    from torch import nn

    from loralab.lora.config import LoRAConfig
    from loralab.lora.inject import apply_lora, lora_modules, merge_adapters, unmerge_adapters

    model, _ = _model(args.model)
    model.eval()
    base = copy.deepcopy(model)
    ids = _batches(model.config.vocab_size, args.batch, args.seq, 1)[0]
    timings: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}

    def once(net) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            net(input_ids=ids)
            return time.perf_counter() - start

    apply_lora(model, LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=args.preset))
    for _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B, std=0.01)
    model.eval()
    once(base), once(model)  # warm-up
    for _ in range(args.repeats):
        timings["base"].append(once(base))
        timings["unmerged"].append(once(model))
        merge_adapters(model)
        timings["merged"].append(once(model))
        unmerge_adapters(model)
    return {k: statistics.median(v) for k, v in timings.items()}


# ------------------------------------------------------------------------------------ driver

_HOST_VARIABLES = ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE", "LORALAB_ALLOCATOR", "LORALAB_HUGE_PAGES")


def _host_environment(setting: str) -> dict[str, str]:
    """A worker's environment: 'cli' = what the `loralab` command gives its process (tcmalloc
    where installed, else huge pages), 'huge-pages' = huge pages only (the command's setting
    before tcmalloc), 'default' = the process defaults a hand-written script gets."""
    from loralab.kernels import hostmem

    base = {k: v for k, v in os.environ.items() if k not in _HOST_VARIABLES}
    base |= {"PYTHONPATH": ROOT, "TRANSFORMERS_VERBOSITY": "error"}
    if setting == "cli":
        return hostmem.command_environment(base)
    if setting == "huge-pages":
        return base | {"THP_MEM_ALLOC_ENABLE": "1"}
    return base


def _run_worker(kind: str, args, host: str = "cli", **overrides) -> dict:
    values = vars(args) | overrides
    cmd = [sys.executable, __file__, "worker", "--impl", kind]
    for key in ("model", "method", "preset", "rank", "dropout", "batch", "seq", "precision",
                "steps", "repeats", "compile", "lr", "eval_examples"):
        cmd += [f"--{key.replace('_', '-')}", str(values[key])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_host_environment(host))
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def compare(args) -> list[dict]:
    """Interleave loralab (eager and/or compiled, per --compile) and PEFT: one row per loralab
    variant, each against the same PEFT runs."""
    variants = ["off", "on"] if args.compile == "both" else [args.compile]
    # side -> (worker, host setting, overrides): loralab as under the CLI, PEFT the defaults
    sides = {f"loralab-{v}": ("loralab", "cli", {"compile": v}) for v in variants}
    sides["peft"] = ("peft", "default", {})
    if args.ablate_host_memory:
        sides["loralab-default"] = ("loralab", "default", {"compile": variants[0]})
        sides["loralab-huge-pages"] = ("loralab", "huge-pages", {"compile": variants[0]})
        sides["peft-cli"] = ("peft", "cli", {})
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, (kind, host, overrides) in sides.items():
            results[side].append(_run_worker(kind, args, host, **overrides))
    tps = {k: [r["tokens_per_second"] for r in v] for k, v in results.items()}
    mem = {k: [r["peak_rss_delta"] / 2**20 for r in v] for k, v in results.items()}
    rows = []
    for variant in variants:
        side = f"loralab-{variant}"
        extra = statistics.median(r["first_step_extra"] for r in results[side])
        row = {"model": args.model, "shape": f"{args.batch}x{args.seq}",
               "precision": args.precision, "compile": variant,
               "first_step_extra_s": round(extra, 1),
               "preset": args.preset, "dropout": args.dropout, "rank": args.rank,
               "loralab_tps": _summary(tps[side]), "peft_tps": _summary(tps["peft"]),
               "speedup": statistics.median(tps[side]) / statistics.median(tps["peft"]),
               "loralab_mb": _summary(mem[side]), "peft_mb": _summary(mem["peft"]),
               "memory_ratio": statistics.median(mem[side]) / statistics.median(mem["peft"]),
               "trainable": (results[side][0]["trainable"], results["peft"][0]["trainable"])}
        row["host"] = {s: {k: results[s][0][k] for k in ("huge_pages", "allocator")}
                       for s in (side, "peft")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.ablate_host_memory:
        ablation = {side: _summary(tps[side]) for side in sides} | {
            f"{side}_mb": _summary(mem[side]) for side in sides} | {
            "shape": f"{args.batch}x{args.seq}", "model": args.model, "preset": args.preset,
            "dropout": args.dropout,
            "loralab_vs_peft_both_cli": statistics.median(tps[f"loralab-{variants[0]}"])
            / statistics.median(tps["peft-cli"]),
            "loralab_vs_peft_both_default": statistics.median(tps["loralab-default"])
            / statistics.median(tps["peft"]),
            "loralab_cli_vs_huge_pages_only": statistics.median(tps[f"loralab-{variants[0]}"])
            / statistics.median(tps["loralab-huge-pages"])}
        print("host-memory ablation (tok/s and peak MB, median (min-max)):",
              json.dumps(ablation), flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    head = ("| model | batch x seq | precision | preset | dropout | compile | loralab tok/s | "
            "PEFT tok/s | speed-up | loralab peak MB | PEFT peak MB | memory ratio | "
            "loralab 1st-step extra s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['model']} | {r['shape']} | {r['precision']} | {r['preset']} | {r['dropout']} | "
        f"{r['compile']} | {r['loralab_tps']} | {r['peft_tps']} | {r['speedup']:.2f}x | "
        f"{r['loralab_mb']} | {r['peft_mb']} | {r['memory_ratio']:.2f}x | "
        f"{r['first_step_extra_s']} |\n" for r in rows)
    return head + body


def matrix(args) -> None:
    rows = []
    for model in ("smollm2-135m", "gpt2-shaped"):
        for batch, seq in ((8, 128), (4, 256)):
            for precision in ("fp32", "bf16"):
                for preset in ("qv", "attn-proj-ffn"):
                    for dropout in (0.0, 0.1):
                        scenario = argparse.Namespace(**(vars(args) | {
                            "model": model, "batch": batch, "seq": seq, "precision": precision,
                            "preset": preset, "dropout": dropout}))
                        rows += compare(scenario)
    print(_table(rows))


def methods(args) -> None:
    """full vs LoRA vs head-only through loralab's train, interleaved, with MFU."""
    results: dict[str, list[dict]] = {"full": [], "lora": [], "head": []}
    for _ in range(args.repeats):
        for method in results:
            results[method].append(_run_worker(
                "loralab", args, method=method,
                compile="off" if args.compile == "both" else args.compile))
    import torch

    from loralab.costs.peak import benchmark_shapes, mfu_figure

    # loralab's peak (loralab.costs.peak): best-of-k F.linear at the model's own largest shapes,
    # fp32.
    # Timed here once more, between the workers (the machine as idle as this run gets it), and
    # the highest of that and the peaks the workers divided by is used for every row.
    runs_all = [r for runs in results.values() for r in runs]
    shapes = tuple(sorted({tuple(s) for r in runs_all for s in r["peak_shapes"]}))
    fresh, calls = benchmark_shapes(shapes, torch.float32, "cpu")
    peak = max([fresh] + [r["peak_flops_per_second"] for r in runs_all])
    sizes = ", ".join("x".join(map(str, s)) for s in shapes)
    used = ", ".join(f"{r['peak_flops_per_second'] / 1e9:.1f}" for r in runs_all)
    print(f"MFU: model FLOPs per token x steady tokens/s over the fp32 matmul peak, "
          f"{peak / 1e9:.1f} GFLOP/s (best of >= {calls} F.linear calls at the model's shapes "
          f"{sizes}; {fresh / 1e9:.1f} timed now, the workers' {used})")
    print("| method | tok/s (median, min-max) | step time ratio vs full | peak MB | MFU |")
    print("|---|---|---|---|---|")
    full = statistics.median(r["tokens_per_second"] for r in results["full"])
    for method, runs in results.items():
        tps = [r["tokens_per_second"] for r in runs]
        mem = [r["peak_rss_delta"] / 2**20 for r in runs]
        rate = statistics.median(r["flops_per_token"] * r["tokens_per_second"] for r in runs)
        mfu, why = mfu_figure(rate, 1.0, peak)
        print(f"| {method} | {_summary(tps)} | {full / statistics.median(tps):.2f} | "
              f"{_summary(mem)} | {'unreliable' if mfu is None else f'{100 * mfu:.1f}%'} |")
        if why:
            print(f"  {method}: {why}")


def inference(args) -> None:
    result = _run_worker("inference", args)
    base = result["base"]
    print(f"forward {args.batch}x{args.seq} {args.model}, preset {args.preset}: "
          f"base {1000 * base:.1f} ms, unmerged {1000 * result['unmerged']:.1f} ms "
          f"({result['unmerged'] / base:.3f}x), merged {1000 * result['merged']:.1f} ms "
          f"({result['merged'] / base:.3f}x)")


def precision(args) -> None:
    """bf16 autocast vs fp32 through loralab's `train` on wiki-leads, interleaved (fp32, bf16,
    fp32, ...): steady tokens/s and the validation loss after the same steps, against the
    untrained model's loss. The performance issue asks for bf16 >= 1.5x fp32's throughput with a
    validation loss within 1% of fp32's."""
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(_run_worker("quality", args, precision=name))
    base = _run_worker("quality", args, method="none", precision="fp32", steps=0)
    fp32 = statistics.median(r["tokens_per_second"] for r in runs["fp32"])
    loss32 = statistics.median(r["validation_loss"] for r in runs["fp32"])
    print(f"{args.model}, LoRA {args.preset} r={args.rank} dropout {args.dropout}, "
          f"{args.batch} x {args.seq}, lr {args.lr}, {args.steps} steps after a warm-up step; "
          f"validation loss on {args.eval_examples} wiki-leads blocks "
          f"(untrained model, fp32: {base['validation_loss']:.4f})")
    print("| precision | tok/s | vs fp32 | validation loss | vs fp32 | eval s | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        tps = [r["tokens_per_second"] for r in rows]
        loss = statistics.median(r["validation_loss"] for r in rows)
        print(f"| {name} | {_summary(tps)} | {statistics.median(tps) / fp32:.3f}x | "
              f"{loss:.4f} | {100 * (loss / loss32 - 1):+.2f}% | "
              f"{statistics.median(r['eval_seconds'] for r in rows):.0f} | "
              f"{_summary([r['peak_rss_delta'] / 2**20 for r in rows])} |")
    for note in sorted({n for rows in runs.values() for r in rows for n in r["notes"]}):
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["compare", "matrix", "methods", "inference",
                                         "precision", "worker"])
    parser.add_argument("--impl", default="loralab", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m or gpt2-shaped (12 layers, 768 wide, random weights)")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--preset", default="qv")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", default="both", choices=["off", "on", "both"],
                        help="loralab side: torch.compile its blocks or not, or both (two "
                        "loralab variants interleaved with PEFT); the first step's extra time, "
                        "mostly compilation, is reported separately")
    parser.add_argument("--ablate-host-memory", "--ablate-huge-pages", action="store_true",
                        help="compare: also run loralab with the process defaults and with huge "
                        "pages only, and PEFT with the loralab command's host-memory setting")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--lr", type=float, default=1e-4, help="precision: learning rate")
    parser.add_argument("--eval-examples", type=int, default=32,
                        help="precision: validation blocks the loss is measured on")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)  # loralab from this checkout, for the driver and its workers
    if args.mode != "worker":  # the driver names the machine; a worker's stdout is its JSON
        from loralab.costs.measure import describe_device

        print(describe_device("cpu"), flush=True)
    if args.mode == "worker":  # the driver set this process's host-memory environment
        work = {"loralab": worker_loralab, "peft": worker_peft, "inference": worker_inference,
                "quality": worker_quality}[args.impl]
        print(json.dumps(work(args)))
    elif args.mode == "compare":
        print(_table(compare(args)))
    else:
        {"matrix": matrix, "methods": methods, "inference": inference,
         "precision": precision}[args.mode](args)


if __name__ == "__main__":
    main()
