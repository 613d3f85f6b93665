"""Evaluating a finished run (its saved model, adapter or head) or a model + adapter."""

from __future__ import annotations

import os

from loralab.errors import UserError
from loralab.training.batching import epoch_order, target_count  # noqa: F401  (epoch_order re-exported)
from loralab.training.config import config_fields, make_config
from loralab.training.evaluate import evaluate
from loralab.training.precision import with_resolved_precision


def evaluate_saved(*, run_dir: str | os.PathLike | None = None, model: str | None = None,
                   adapter: str | os.PathLike | None = None, data: str | None = None,
                   task: str | None = None, splits: tuple[str, ...] = (),
                   batch_size: int | None = None, seq_len: int | None = None,
                   num_labels: int | None = None, precision: str | None = None) -> dict:
    """Metrics of a finished run (its saved model, adapter or head) or of `model` (+ `adapter`)
    on `data` (default: the run's dataset), per split: {split: {loss, perplexity | accuracy,
    precision, recall, f1, ...}}. The precision is `precision`, else the one the run computed
    in (its record's env), else the one it asked for; auto resolves for this machine."""
    from loralab.data.tasks import load_task_data

    if run_dir is not None:
        from loralab.study.runner import load_run, load_run_model

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
        from loralab.models.loading import load_model

        config = make_config(model=model, task=task, data=data, method="none",
                             batch_size=batch_size, seq_len=seq_len, num_labels=num_labels,
                             precision=precision)
        loaded = load_model(model, task, num_labels=config.num_labels)
        net, tokenizer = loaded.model, loaded.tokenizer
        if adapter is not None:
            from loralab.lora.adapter import load_adapter

            load_adapter(net, adapter)
    task_data = load_task_data(config.data, config.task, tokenizer, seq_len=config.seq_len,
                               seed=config.seed)
    wanted = splits or tuple(s for s in task_data.splits if s != "train")
    missing = [s for s in wanted if s not in task_data.splits]
    if missing:
        raise UserError(f"{config.data} has no split {missing[0]!r}; it has "
                        f"{', '.join(task_data.splits)}")
    net.eval()
    config = with_resolved_precision(config, "cpu")  # evaluate() runs on its default device
    return {s: evaluate(net, task_data.splits[s], task_data.collate_fn, config,
                        progress=f"evaluation, {s}")
            for s in wanted}
