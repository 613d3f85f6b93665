"""Using a finished run: its record, its model, a merged export, samples and re-evaluation.

Everything here reads a run directory (record.json, study_config.json, the saved model,
adapter or head) and never writes into it. `load_run_model` rebuilds exactly the model whose
metrics the run recorded, for every method; `merge_run`, `generate_from_run` and
`evaluate_saved` (`loralab merge / generate / eval --run`) start from it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from loralab.data.tasks import load_task_data
from loralab.errors import UserError
from loralab.lora.adapter import load_adapter
from loralab.models.heads import load_head_file
from loralab.models.loading import Task, load_model
from loralab.study.plan import stored_record
from loralab.study.spec import baseline_method
from loralab.training.config import config_fields, make_config
from loralab.training.evaluate import bounded_splits, evaluate
from loralab.training.precision import with_resolved_precision
from loralab.training.strategies import registry
from loralab.training.strategies.base import strategy_named


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run directory's record (record.json, as a dict), with its study config (the run's
    study_config.json, {} when absent) under `study_config`. Raises UserError when the
    directory or its record is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}; pass a directory under "
                        "<study out>/runs/ (see `loralab runs`)")
    record = stored_record(run_dir)
    if record is None:
        raise UserError(f"{run_dir} has no readable record.json; the run did not finish: "
                        "re-run `loralab compare` on its study")
    try:
        record["study_config"] = json.loads((run_dir / "study_config.json").read_text())
    except (OSError, ValueError):
        record.setdefault("study_config", {})
    return record


def _resolve_artifact(run_dir: Path, path: str | None) -> Path | None:
    """An artefact path of the record: as written, relative to the run, or by its name in the
    run directory (a run directory that was moved)."""
    if not path:
        return None
    p = Path(path)
    for cand in (p, run_dir / p, run_dir / p.name):
        if cand.exists():
            return cand
    return None


def _run_config(record: dict[str, Any]) -> dict[str, Any]:
    """The run's settings: its TrainConfig, with the study's config on top."""
    return {**(record.get("config") or {}), **record["study_config"]}


def _run_scheme(record: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """A run's quantization scheme: its config's `quant`, else its record's quant section."""
    return cfg.get("quant") or (record.get("quant") or {}).get("scheme")


def load_run_model(run_dir: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, record) of a run, in eval mode: exactly the model whose metrics the
    run recorded. Its saved model (full), the base with its head (head) or the base with its
    adapter, rebuilt by the method's strategy (`rebuild_recorded`): W + s B A (lora, lora-head),
    Q(W) + s B A (qlora), the merged quantized Q(W + s B A) (qat-lora, lora-ptq). Raises
    UserError for a record without model/task or a trained run that saved nothing."""
    run_dir = Path(run_dir)
    record = load_run(run_dir)
    model, tokenizer = model_from_record(record, run_dir)
    return model, tokenizer, record


def model_from_record(record: dict[str, Any], run_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode that a run's record describes (`load_run_model`), from
    the record as a dict with `study_config` ({} outside a study) and the run directory that
    holds its artefacts; for a record still in memory (a `train` hook) as for a stored one."""
    cfg = _run_config(record)
    if not cfg.get("model") or not cfg.get("task"):
        raise UserError(f"{run_dir}/record.json names no model or task; it is not a loralab run")
    task = cast(Task, str(cfg["task"]))
    kwargs: dict[str, Any] = {"num_labels": int(cfg["num_labels"])} if cfg.get("num_labels") \
        else {}
    arts = record.get("artifacts") or {}
    saved = _resolve_artifact(run_dir, arts.get("model"))
    adapter = _resolve_artifact(run_dir, arts.get("adapter"))
    if saved is not None:
        loaded = load_model(str(saved), task, **kwargs)
    else:
        loaded = load_model(str(cfg["model"]), task, **kwargs)
        head = _resolve_artifact(run_dir, arts.get("head"))
        if adapter is not None:  # the model the run recorded: W + s B A, Q(W) + s B A, ...
            strategy_named(str(cfg.get("method") or "lora")).rebuild_recorded(
                loaded.model, adapter, _run_scheme(record, cfg))
        elif head is not None:  # head-only runs save every head module's tensors
            load_head_file(loaded.model, head / "head.safetensors")
        elif cfg.get("method") is not None and registry.get_spec(str(cfg["method"])).trains:
            raise UserError(f"run {run_dir} saved neither a model nor an adapter; re-run it")
    loaded.model.eval()
    return loaded.model, loaded.tokenizer


def merge_run(run_dir: str | os.PathLike, out: str | os.PathLike, *,
              note: Callable[[str], None] | None = None) -> Path:
    """Write the run's model with its adapters folded in (W + (alpha/r) B A) as a plain
    transformers model (save_pretrained + tokenizer) in `out`, ready for serving without
    loralab. Quantized runs (qlora, qat-lora, lora-ptq) write the float form of the model they
    recorded (the strategy's `float_export`: dequant(Q(W)) + s B A, or dequant(Q(W + s B A))),
    told via `note`. Raises UserError when `out` is a non-empty directory."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; pass a new --out directory")
    model, tokenizer, record = load_run_model(run_dir)
    cfg = _run_config(record)
    model, message = strategy_named(str(cfg.get("method") or "lora")).float_export(
        model, _run_scheme(record, cfg))
    if message is not None and note is not None:
        note(message)
    tmp = out.with_name(out.name + ".tmp-merge")
    if tmp.exists():
        shutil.rmtree(tmp)
    cast(Any, model).save_pretrained(tmp)  # a transformers PreTrainedModel
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def generate_from_run(run_dir: str | os.PathLike, prompts: list[str], *,
                      max_new_tokens: int = 40, temperature: float = 0.8, top_p: float = 0.95,
                      seed: int = 0) -> list[str]:
    """Sample a continuation per prompt (lm/generate runs; temperature 0 = greedy) or, for a
    classifier, return the predicted label with its probability, `label 1 (p=0.873)`."""
    model, tokenizer, record = load_run_model(run_dir)
    cfg = _run_config(record)
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for text in prompts:
            if cfg.get("task") == "classify":
                enc = tokenizer(text, return_tensors="pt", truncation=True)
                probs = model(**enc).logits.softmax(-1)[0]
                label = int(probs.argmax())
                out.append(f"label {label} (p={float(probs[label]):.3f})")
                continue
            enc = tokenizer(text, return_tensors="pt")
            ids = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 do_sample=temperature > 0, temperature=temperature or None,
                                 top_p=top_p if temperature > 0 else None,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:],
                                        skip_special_tokens=True))
    return out


def evaluate_saved(*, run_dir: str | os.PathLike | None = None, model: str | None = None,
                   adapter: str | os.PathLike | None = None, data: str | None = None,
                   task: str | None = None, splits: tuple[str, ...] = (),
                   batch_size: int | None = None, seq_len: int | None = None,
                   num_labels: int | None = None, precision: str | None = None,
                   eval_max_examples: int = 0) -> dict[str, dict[str, float]]:
    """Metrics of a finished run (its saved model, adapter or head) or of `model` (+ `adapter`)
    on `data` (default: the run's dataset), per split: {split: {loss, perplexity | accuracy,
    precision, recall, f1, ...}}. The precision is `precision`, else the one the run computed
    in (its record's env), else the one it asked for; auto resolves for this machine.
    `eval_max_examples` > 0 bounds each split to that fixed subset, as a run's final evaluation
    does (`TrainConfig.eval_max_examples`). Raises UserError for missing inputs or splits."""
    if run_dir is not None:
        record = load_run(run_dir)
        values = {k: v for k, v in (record.get("config") or {}).items() if k in config_fields()}
        # the precision the run computed in (its env), so re-evaluation reproduces its metrics
        computed = (record.get("env") or {}).get("precision")
        config = make_config(values, data=data, batch_size=batch_size, seq_len=seq_len,
                             precision=precision or computed)
        net, tokenizer, _ = load_run_model(run_dir)
    else:
        if model is None or data is None or task is None:
            raise UserError("pass a run directory, or --model, --task and --data (and "
                            "optionally --adapter)")
        config = make_config(model=model, task=task, data=data, method=baseline_method(),
                             batch_size=batch_size, seq_len=seq_len, num_labels=num_labels,
                             precision=precision)
        loaded = load_model(model, cast(Task, task), num_labels=config.num_labels)
        net, tokenizer = loaded.model, loaded.tokenizer
        if adapter is not None:
            load_adapter(net, adapter)
    task_data = load_task_data(config.data, config.task, tokenizer, seq_len=config.seq_len,
                               seed=config.seed)
    wanted = splits or tuple(s for s in task_data.splits if s != "train")
    missing = [s for s in wanted if s not in task_data.splits]
    if missing:
        raise UserError(f"{config.data} has no split {missing[0]!r}; it has "
                        f"{', '.join(task_data.splits)}")
    bounded = bounded_splits(task_data.splits, eval_max_examples)
    net.eval()
    config = with_resolved_precision(config, "cpu")  # evaluate() runs on its default device
    return {s: evaluate(net, bounded[s], task_data.collate_fn, config,
                        progress=f"evaluation, {s}")
            for s in wanted}
