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
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from loralab.costs import measure  # noqa: E402
from loralab.data.tasks import load_task_data  # noqa: E402
from loralab.lora.config import LoRAConfig  # noqa: E402
from loralab.lora.inject import apply_lora, lora_parameters, merge_lora  # noqa: E402
from loralab.models.loading import load_model  # noqa: E402
from loralab.quant import (  # noqa: E402
    conv1d_to_linear,
    convert_qat,
    count_parameters,
    get_scheme,
    keep_packed_in_backward,
    latency,
    logit_drift,
    quantize_weights,
    save_model,
    weight_bytes,
)
from loralab.training.config import make_config  # noqa: E402
from loralab.training.evaluate import evaluate as evaluate_split  # noqa: E402
from loralab.training.loop import train  # noqa: E402


def compare_quantization(model: str = "minilm-l6", task: str = "classify",
                         data: str = "rt-snippets", scheme: str = "int8", *, out: str | os.PathLike,
                         max_steps: int = 40, batch_size: int = 16, seq_len: int = 64,
                         lr: float = 1e-3, rank: int = 8, preset: str = "qv",
                         data_fraction: float = 0.2, eval_examples: int = 256,
                         latency_repeats: int = 7, seed: int = 0,
                         progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train LoRA in float and with QAT on the same data, order and budget, then deploy:

    row `float+lora`  the float LoRA model, merged (fp32);
    row `ptq`         that merged model, post-training quantized with `scheme`;
    row `qat-lora`    QAT-LoRA, merged and converted with `scheme`.

    Returns {"rows": [{name, metrics, model_bytes, latency_ms, ...}], "setup": {...}}: quality on
    the held-out split, size of the saved state dict, and the median forward latency on this
    CPU (the three models timed interleaved on the same batch, so machine load hits all alike).
    """
    out = Path(out)
    get_scheme(scheme)
    common = dict(model=model, task=task, data=data, max_steps=max_steps, batch_size=batch_size,
                  seq_len=seq_len, lr=lr, rank=rank, preset=preset, data_fraction=data_fraction,
                  seed=seed, keep_best=False, warmup_steps=max(1, max_steps // 10))

    def pieces():
        loaded = load_model(model, task)
        task_data = load_task_data(data, task, loaded.tokenizer, seq_len=seq_len,
                                   data_fraction=data_fraction, seed=seed)
        split = "test" if "test" in task_data.splits else "validation"
        held = task_data.splits[split]
        held = held.select(range(min(eval_examples, len(held))))
        val = task_data.splits.get("validation", held)
        val = val.select(range(min(eval_examples, len(val))))
        td = dataclasses.replace(task_data, splits={"train": task_data.splits["train"],
                                                    "validation": val, split: held})
        return loaded, td

    rows: list[dict[str, Any]] = []
    progress(f"[1/2] float LoRA ({model}, {data}, {max_steps} steps)")
    loaded, td = pieces()
    cfg = make_config(common, method="lora", out=str(out / "float-lora"))
    rec_float = train(cfg, loaded=loaded, task_data=td)
    float_model = merge_lora(loaded.model).eval()
    batches = _eval_batches(td, batch_size)

    def evaluate_all(m: nn.Module) -> dict[str, dict]:
        return {k: evaluate_split(m, v, td.collate_fn, cfg)
                for k, v in td.splits.items() if k != "train"}

    ptq_model = quantize_weights(copy.deepcopy(float_model), scheme)
    progress(f"[2/2] QAT-LoRA ({scheme})")
    loaded_q, td_q = pieces()
    cfg_q = make_config(common, method="qat-lora", quant=scheme,
                                  out=str(out / "qat-lora"))
    rec_qat = train(cfg_q, loaded=loaded_q, task_data=td_q)
    # train() evaluated the deployed model on copies; rebuild it here: Q(W + s B A)
    qat_model = convert_qat(merge_lora(loaded_q.model), scheme).eval()
    models = {"float+lora": float_model, "ptq": ptq_model, "qat-lora": qat_model}
    times = latency(models, batches[0], repeats=latency_repeats)
    for name, m in models.items():
        metrics = rec_float["metrics"] if name == "float+lora" else (
            rec_qat["metrics"] if name == "qat-lora" else evaluate_all(m))
        path = save_model(m, out / "models" / f"{name}.pt")
        rows.append({"name": name, "metrics": metrics, "model_bytes": path.stat().st_size,
                     "weight_bytes": weight_bytes(m), "params": count_parameters(m)[1],
                     "latency_ms": times[name]["median_ms"], "latency_spread_ms":
                     [times[name]["min_ms"], times[name]["max_ms"]]})
    rows[1]["drift_vs_float"] = logit_drift(float_model, ptq_model, batches)
    rows[2]["drift_vs_float"] = logit_drift(float_model, qat_model, batches)
    rows[2]["merge"] = rec_qat.get("quant", {})
    return {"rows": rows, "setup": {**common, "scheme": scheme, "eval_examples": eval_examples,
                                    "latency_batch": list(batches[0]["input_ids"].shape),
                                    "threads": torch.get_num_threads()}}


def training_step_memory(model_name: str = "minilm-l6", task: str = "classify",
                         scheme: str | None = "nf4", *, batch_size: int = 8, seq_len: int = 64,
                         rank: int = 8, preset: str = "qv", seed: int = 0) -> dict[str, Any]:
    """Memory of one LoRA training step (forward, backward, AdamW step) on a float base
    (scheme None) or a quantized frozen base (QLoRA): weight bytes, logical parameters, the
    tensor-level peak (parameters + gradients + optimizer state + tensors saved for backward)
    and the process's peak RSS increase over the step. Run each scheme in a fresh process for
    a clean RSS figure (benchmarks/quant_bench.py --memory does)."""
    torch.manual_seed(seed)
    model = load_model(model_name, task).model
    float_bytes = weight_bytes(model)
    if scheme is not None:
        conv1d_to_linear(model)
        quantize_weights(model, scheme)
        keep_packed_in_backward(model)
    apply_lora(model, LoRAConfig(rank=rank, targets=preset, train_head=task == "classify"))
    trainable, total = count_parameters(model)
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = (torch.randint(0, 2, (batch_size,), generator=g) if task == "classify" else ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    tracker = measure.SavedTensorTracker(skip=measure.storage_pointers(model.parameters()))
    sampler = measure.RSSSampler().start()
    t0 = time.perf_counter()
    with tracker.track():
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    rss = sampler.stop()
    return {"model": model_name, "scheme": scheme or "float", "float_weight_bytes": float_bytes,
            "weight_bytes": weight_bytes(model), "logical_params": total,
            "trainable_params": trainable, "lora_params": sum(p.numel() for p in
                                                              lora_parameters(model)),
            "saved_activation_bytes": tracker.peak,
            "peak_tensor_bytes": measure.static_tensor_bytes(model, opt) + tracker.peak,
            "peak_rss_delta_bytes": rss, "step_seconds": seconds,
            "batch": [batch_size, seq_len]}


def _eval_batches(task_data: Any, batch_size: int, n: int = 4) -> list[dict]:
    """Up to n batches of the held-out split (test, else validation) for drift and latency."""
    split = "test" if "test" in task_data.splits else "validation"
    ds = task_data.splits[split]
    out = []
    for start in range(0, min(len(ds), n * batch_size), batch_size):
        rows = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
        out.append(task_data.collate_fn(rows))
    return out


def format_comparison(result: dict[str, Any]) -> str:
    """A plain-text table of `compare_quantization`'s rows."""
    rows = result["rows"]
    split = next(iter(rows[0]["metrics"]))
    for cand in ("test", "validation"):
        if cand in rows[0]["metrics"]:
            split = cand
            break
    keys = [k for k in ("accuracy", "f1", "perplexity", "loss") if k in rows[0]["metrics"][split]]
    header = ["row"] + [f"{split} {k}" for k in keys] + ["model MB", "weights MB", "params",
                                                          "latency ms (median)", "KL vs float"]
    lines = []
    for r in rows:
        m = r["metrics"].get(split, {})
        kl = r.get("drift_vs_float", {}).get("mean_kl")
        lines.append([r["name"]] + [f"{m.get(k, float('nan')):.4f}" for k in keys]
                     + [f"{r['model_bytes'] / 1e6:.2f}", f"{r['weight_bytes'] / 1e6:.2f}",
                        f"{r['params']:,}", f"{r['latency_ms']:.1f}",
                        "–" if kl is None else f"{kl:.2e}"])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])



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
    print(measure.describe_device("cpu"), flush=True)  # the CPU and its flags decide every figure
    if args.memory:
        memory_table(args)
        return

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
    rows = []
    for scheme in (None, "int8", "nf4"):
        code = ("import json, sys; sys.path.insert(0, 'benchmarks'); "
                "from quant_bench import training_step_memory; "
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
