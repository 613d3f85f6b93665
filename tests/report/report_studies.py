"""Recorded studies for the report tests: a study file and a fake `run_fn` whose records
have made-up numbers per (strategy, seed), so every report cell is traceable to one field."""

from __future__ import annotations

STUDY = """\
name: rep
model: tiny
task: lm
data: wiki-leads
eval: [wiki-leads, {name: lambada, data: wiki-lambada}]
budget: {max_steps: 3, batch_size: 2, seq_len: 16, lr: 1.0e-3}
seeds: 2
strategies:
  - {name: full, method: full}
  - {name: lora-1, method: lora, preset: attn, rank: 4}
published:
  source: "A paper, Table 9"
  rows:
    - {name: LoRA (paper), params: 350000, metrics: {lambada: {perplexity: 9.5, BLEU: 0.7}}}
"""

# perplexity per (strategy, seed): lora-1 is best on wiki-leads, full on lambada


PPL = {("untuned", 0): (30.0, 40.0), ("untuned", 1): (30.0, 40.0),
       ("full", 0): (20.0, 25.0), ("full", 1): (22.0, 27.0),
       ("lora-1", 0): (19.0, 30.0), ("lora-1", 1): (20.0, 31.0)}


PARAMS = {"none": 0, "full": 1_000_000, "lora": 4_096}


def recorded_run(config: dict, resume: bool) -> dict:
    key = (config["strategy"], config["seed"])
    wl, lam = PPL[key]
    trainable = PARAMS[config["method"]]
    return {"run_id": "x", "status": "finished", "config": {"method": config["method"]},
            "metrics": {"wiki-leads": {"loss": 3.0, "perplexity": wl, "targets": 100},
                        "lambada": {"loss": 3.5, "perplexity": lam, "targets": 50},
                        "validation": {"loss": 3.1, "perplexity": 22.0, "targets": 10}},
            "costs": {"trainable_params": trainable, "total_params": 1_000_000,
                      "trainable_pct": trainable / 1e4, "artifact_bytes": trainable * 4,
                      "train_seconds": 2.0 + config["seed"], "tokens_per_second": 500.0,
                      "peak_memory_bytes": 2_000_000, "data_seconds": 0.5,
                      "load_seconds": 1.0},
            "curves": {"train_loss": [[1, 3.0], [2, 2.8], [3, 2.7]], "val_loss": [[3, 3.1]],
                       "lr": [[1, 1e-3]]},
            "artifacts": {"adapter": None, "model": None, "tensorboard": None},
            "env": {"torch": "2.13.0", "device": "cpu"},
            "notes": ["lm_head untied from the input embeddings so only the head trains"]
            if config["method"] == "full" else []}


QSTUDY = """\
name: q
model: tiny
task: classify
data: rt-snippets
eval: [rt-snippets]
budget: {max_steps: 3, batch_size: 2, seq_len: 16, lr: 1.0e-3}
seeds: 2
strategies:
  - {name: lora, method: lora, rank: 4}
  - {name: ptq, method: lora-ptq, rank: 4, options: {quant: int8}}
  - {name: qat, method: qat-lora, rank: 4, options: {quant: int8}}
  - {name: qlora-nf4, method: qlora, rank: 4, options: {quant: nf4}}
"""


def quant_record(config: dict, resume: bool) -> dict:
    """A run record with the "quant" section the quantization step (quant.finish_run) writes,
    numbers made up per (strategy, seed) so every cell is traceable to one field."""
    method, seed = config["method"], config["seed"]
    k = {"none": 0, "lora": 1, "lora-ptq": 2, "qat-lora": 3, "qlora": 4}[method]
    rec = recorded_run({**config, "method": "lora", "strategy": "lora-1"}, resume)
    rec["metrics"] = {"rt-snippets": {"loss": 0.5, "accuracy": 0.6 + 0.01 * k + 0.001 * seed,
                                      "f1": 0.5 + 0.01 * k + 0.002 * seed, "targets": 8}}
    if method in ("lora-ptq", "qat-lora", "qlora"):
        m = lambda d: {"rt-snippets": {"accuracy": 0.6 + d, "f1": 0.5 + d}}  # noqa: E731
        rec["quant"] = {
            "scheme": "nf4" if method == "qlora" else "int8", "scheme_note": "x",
            "float_weight_bytes": 4_000_000, "quantized_model_bytes": 1_000_000 * k + seed,
            "merged_model_bytes": 1_000_000 * k, "quantized_model": "/x/model.pt",
            "latency": {"merged": {"median_ms": 10.0 * k + seed, "min_ms": 1, "max_ms": 99},
                        "unmerged": {"median_ms": 11.0 * k, "min_ms": 1, "max_ms": 99}},
            "merge_logit_drift": {"max_abs": 0.001 * k, "mean_abs": 0.0001, "rel_mean_abs": 0.1,
                                  "mean_kl": 1e-6 * k, "top1_agreement": 1.0 - 0.01 * seed},
            "merge_metric_drift": {"rt-snippets": {"accuracy": -0.004 * k, "f1": 0.002 * k}},
            "unmerged_metrics": m(0.02), "merged_metrics": m(0.03),
        }
        if method != "qlora":  # as the quantization step records: the model before deploying
            rec["quant"]["adapter_metrics"] = m(0.05 if method == "lora-ptq" else 0.04)
        if method == "lora-ptq":
            rec["quant"]["float_model_bytes"] = 4_100_000
            rec["quant"]["latency"]["float"] = {"median_ms": 5.0 + seed, "min_ms": 1,
                                                "max_ms": 99}
    return rec
