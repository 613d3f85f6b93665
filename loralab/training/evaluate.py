"""Evaluating a model on a split: loss, perplexity or classification scores."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loralab.data.tasks import subsample
from loralab.progress import Progress
from loralab.training.batching import epoch_order, target_count  # noqa: F401  (epoch_order re-exported)
from loralab.training.config import TrainConfig
from loralab.training.distributed import _FSDPRoot
from loralab.training.precision import _autocast, with_resolved_precision
from loralab.training.step import _forward_logits, _fused_lm_loss, _to, loss_sum


def classification_scores(preds: list[int], labels: list[int], num_labels: int) -> dict:
    """Accuracy, precision/recall/F1 and their macro averages, by scikit-learn.

    `precision`, `recall`, `f1` are for class 1 (average="binary") with 2 classes, else the
    macro averages; `*_macro` are unweighted means over all `num_labels` classes, including
    classes absent from both labels and predictions. A ratio with a zero denominator counts as
    0 (zero_division=0), so an empty class lowers the macro average instead of raising a warning.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if len(preds) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    if not labels:
        raise ValueError("classification scores need at least one example")
    classes = list(range(num_labels))
    macro = precision_recall_fscore_support(labels, preds, labels=classes, average="macro",
                                            zero_division=0)[:3]
    if num_labels == 2:
        main = precision_recall_fscore_support(labels, preds, labels=classes, average="binary",
                                               pos_label=1, zero_division=0)[:3]
    else:
        main = macro
    scores = {"accuracy": accuracy_score(labels, preds), "precision_macro": macro[0],
              "recall_macro": macro[1], "f1_macro": macro[2], "precision": main[0],
              "recall": main[1], "f1": main[2]}
    return {k: float(v) for k, v in scores.items()}


def eval_batch_size(config: TrainConfig) -> int:
    """Rows per evaluation batch: at least 32, since no activations are kept for backward and
    larger batches are cheaper per row."""
    return max(config.batch_size, 32)


def _eval_loss_module(model: nn.Module, config: TrainConfig) -> nn.Module | None:
    """For causal LMs, what returns a batch's summed next-token loss from the final hidden
    states in chunks (`loralab.kernels.losses`), so evaluation never holds the N x V logits either: a
    32 x 128 evaluation batch of SmolLM2 (49,152 words) would be 805 MB of fp32 logits, and as
    much again for the log-softmax, several times what the LoRA training step itself needs.
    None where the model's own logits are needed (classification, models whose logits are not
    just the head of the last hidden state, `fused_loss=False`, label smoothing under FSDP)."""
    if isinstance(model, _FSDPRoot):  # the root gathers the head: go through it
        loss = model.loss
        return model if loss is not None and not loss.label_smoothing else None
    return _fused_lm_loss(model, config, label_smoothing=0.0)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, collate_fn, config: TrainConfig,
             device: torch.device = torch.device("cpu"), max_batches: int = 0,
             progress: str | None = None) -> dict:
    """Mean cross-entropy per target (no label smoothing) plus task metrics: perplexity for
    lm/generate (exp of the token-mean NLL), accuracy/precision/recall/F1 for classify.
    Causal LMs take the loss from hidden states in chunks (`_eval_loss_module`). Precision
    auto is resolved for `device` first. `progress`: a label under which batches and elapsed
    time are shown on stderr (loralab.progress); None = silent."""
    config = with_resolved_precision(config, device)
    was_training = model.training
    model.eval()
    fused = _eval_loss_module(model, config)
    nll, count = 0.0, 0.0
    preds: list[int] = []
    golds: list[int] = []
    n = len(dataset)
    bs = eval_batch_size(config)
    n_batches = -(-n // bs) if not max_batches else min(max_batches, -(-n // bs))
    shown = Progress(progress or "", n_batches, enabled=progress is not None)
    for b, start in enumerate(range(0, n, bs)):
        if max_batches and b >= max_batches:
            break
        rows = [dataset[i] for i in range(start, min(n, start + bs))]
        batch = _to(collate_fn(rows), device)
        with _autocast(config, device):
            if fused is not None:
                nll += float(fused(batch["input_ids"], batch.get("attention_mask"),
                                   batch["labels"]))
            else:
                logits = _forward_logits(model, batch)
                nll += float(loss_sum(logits, batch["labels"], config.task))
        count += float(target_count(batch["labels"], config.task))
        if config.task == "classify":
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        shown.update()
    shown.close()
    model.train(was_training)
    loss = nll / max(count, 1.0)
    result = {"loss": loss, "targets": int(count)}
    if config.task == "classify":
        result.update(classification_scores(preds, golds, config.num_labels))
    else:
        try:
            from loralab.scoring.metrics import perplexity as _ppl

            result["perplexity"] = float(_ppl(nll, int(count)))
        except (ImportError, TypeError):
            result["perplexity"] = math.exp(min(loss, 700.0))
    return result


def _evaluate_extra(model: nn.Module, loaded: Any, name: str, config: TrainConfig,
                    device: torch.device, show: bool = False) -> dict:
    from loralab.data.tasks import load_task_data

    extra = load_task_data(name, config.task, loaded.tokenizer, seq_len=config.seq_len,
                           seed=config.seed)
    split = "test" if "test" in extra.splits else "validation"
    data = _bounded_splits({split: extra.splits[split]}, config.eval_max_examples)[split]
    return evaluate(model, data, extra.collate_fn, config, device,
                    progress=f"final evaluation, {name}" if show else None)


def _bounded_splits(splits: dict, n: int) -> dict:
    """Every split but train cut to `n` examples (0 = all): the fixed seed-0 subset a study's
    eval_max_examples takes (`data.subsample`), so a bounded run scores the same examples."""
    if not n:
        return splits
    return {k: v if k == "train" else subsample(v, n) for k, v in splits.items()}


def _final_eval_plan(splits: dict, config: TrainConfig) -> str:
    """What the final evaluation will cover, said before training starts: it runs every
    evaluation example once more after the last step, and on a quick run that can take far
    longer than the training itself (issue 23: 20 s of training, then 307 s of evaluation)."""
    bs = eval_batch_size(config)
    parts = [f"{name} {len(ds):,} examples ({-(-len(ds) // bs):,} x {bs}-row batches)"
             for name, ds in splits.items() if name != "train"]
    parts += [f"{name} (eval_data)" for name in config.eval_data]
    if not parts:
        return "final evaluation: none (no evaluation split)"
    bound = (f"bounded by eval_max_examples={config.eval_max_examples}"
             if config.eval_max_examples else
             "every example; --eval-max-examples N bounds it for a quick run")
    return f"final evaluation after training: {', '.join(parts)}; {bound}"
