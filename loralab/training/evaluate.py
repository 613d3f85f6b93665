"""Evaluating a model on a split: loss, perplexity or classification scores; a run's periodic
and final evaluations (`Evaluator`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from loralab.data.tasks import load_task_data, subsample
from loralab.progress import Progress
from loralab.scoring.metrics import perplexity
from loralab.training.batching import target_count
from loralab.training.config import TrainConfig
from loralab.training.distributed import Distribution, FSDPRoot
from loralab.training.precision import autocast, with_resolved_precision
from loralab.training.state import LoopState
from loralab.training.step import forward_logits, fused_lm_loss, loss_sum, to_device


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
    states in chunks (`loralab.kernels.losses`), so evaluation never holds the N x V logits
    either: a 32 x 128 evaluation batch of SmolLM2 (49,152 words) would be 805 MB of fp32
    logits, and as much again for the log-softmax, several times what the LoRA training step
    itself needs.
    None where the model's own logits are needed (classification, models whose logits are not
    just the head of the last hidden state, `fused_loss=False`, label smoothing under FSDP)."""
    if isinstance(model, FSDPRoot):  # the root gathers the head: go through it
        loss = model.loss
        return model if loss is not None and not loss.label_smoothing else None
    return fused_lm_loss(model, config, label_smoothing=0.0)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, collate_fn: Callable[[list], dict],
             config: TrainConfig, device: torch.device | None = None, max_batches: int = 0,
             progress: str | None = None) -> dict:
    """Mean cross-entropy per target (no label smoothing) plus task metrics: perplexity for
    lm/generate (exp of the token-mean NLL), accuracy/precision/recall/F1 for classify.
    Causal LMs take the loss from hidden states in chunks (`_eval_loss_module`). Precision
    auto is resolved for `device` first. `progress`: a label under which batches and elapsed
    time are shown on stderr (loralab.progress); None = silent."""
    device = device if device is not None else torch.device("cpu")
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
        batch = to_device(collate_fn(rows), device)
        with autocast(config, device):
            if fused is not None:
                nll += float(fused(batch["input_ids"], batch.get("attention_mask"),
                                   batch["labels"]))
            else:
                logits = forward_logits(model, batch)
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
        result["perplexity"] = float(perplexity(nll, int(count)))
    return result


def evaluate_extra(model: nn.Module, tokenizer: Any, name: str, config: TrainConfig,
                   device: torch.device, show: bool = False) -> dict:
    """`evaluate` on the test (else validation) split of another dataset `name` (a run's
    `eval_data`), tokenised with the run's tokenizer and bounded like the run's own splits."""
    extra = load_task_data(name, config.task, tokenizer, seq_len=config.seq_len,
                           seed=config.seed)
    split = "test" if "test" in extra.splits else "validation"
    data = bounded_splits({split: extra.splits[split]}, config.eval_max_examples)[split]
    return evaluate(model, data, extra.collate_fn, config, device,
                    progress=f"final evaluation, {name}" if show else None)


def bounded_splits(splits: dict, n: int) -> dict:
    """Every split but train cut to `n` examples (0 = all): the fixed seed-0 subset a study's
    eval_max_examples takes (`data.subsample`), so a bounded run scores the same examples."""
    if not n:
        return splits
    return {k: v if k == "train" else subsample(v, n) for k, v in splits.items()}


def final_eval_plan(splits: dict, config: TrainConfig) -> str:
    """What the final evaluation will cover, said before training starts: it runs every
    evaluation example once more after the last step, and on a quick run that can take far
    longer than the training itself (issue 23)."""
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


class Evaluator:
    """A run's evaluations: periodic passes over the validation split (`validation`, else
    `test`) and the final pass over every split but train plus `eval_data`.

    Runs only on the processes that evaluate (`Distribution.evaluates`: rank 0, or every rank
    under FSDP, whose sharded forward needs them all); elsewhere the calls return None / {}.
    A periodic pass that read every validation example is remembered by step, so the final
    evaluation of the same weights reuses it instead of a second identical pass (not when the
    blocks were compiled: those evaluate with other kernels than the eager final pass).
    Evaluation seconds are added to `state.eval_seconds`.
    """

    def __init__(self, net: nn.Module, splits: dict, collate_fn: Callable[[list], dict],
                 config: TrainConfig, dist: Distribution, state: LoopState) -> None:
        self.net, self.splits, self.collate, self.config = net, splits, collate_fn, config
        self.dist, self.state = dist, state
        self.val_name = next((n for n in ("validation", "test") if n in splits), None)
        self.complete: dict[int, dict] = {}  # step -> metrics of a complete periodic pass

    def periodic(self, max_batches: int) -> dict | None:
        """The validation metrics at the current step (`max_batches` 0: every example)."""
        if self.val_name is None or not self.dist.evaluates:
            return None
        t0 = time.perf_counter()
        data = self.splits[self.val_name]
        result = evaluate(self.net, data, self.collate, self.config, self.dist.device,
                          max_batches)
        self.state.eval_seconds += time.perf_counter() - t0
        if not max_batches or max_batches * eval_batch_size(self.config) >= len(data):
            self.complete[self.state.step] = result
        return result

    def final(self, weights_step: int, tokenizer: Any, reuse: bool = True) -> dict:
        """Metrics of every split but train and of each `eval_data` set, for the weights of
        step `weights_step`; {} on processes that do not evaluate."""
        if not self.dist.evaluates:
            return {}
        t0 = time.perf_counter()
        metrics: dict = {}
        show = self.dist.main
        for name, data in self.splits.items():
            if name == "train":
                continue
            done = self.complete.get(weights_step) if reuse and name == self.val_name else None
            metrics[name] = dict(done) if done else evaluate(
                self.net, data, self.collate, self.config, self.dist.device,
                progress=f"final evaluation, {name}" if show else None)
        for extra in self.config.eval_data:
            metrics[extra] = evaluate_extra(self.net, tokenizer, extra, self.config,
                                            self.dist.device, show)
        self.state.eval_seconds += time.perf_counter() - t0
        return metrics

    def all_splits(self, model: nn.Module) -> dict:
        """Metrics of `model` (e.g. a quantized copy) on every split but train, silently."""
        return {n: evaluate(model, data, self.collate, self.config, self.dist.device)
                for n, data in self.splits.items() if n != "train"}

