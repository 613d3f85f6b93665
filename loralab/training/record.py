"""The run record: what one training run did and measured, written as RUN/record.json.

`Record` is the typed form; `Record.to_dict()` is exactly the JSON layout record.json has
(top-level keys in this order, the optional ones only once known):

    run_id     "<out dir name>-<8 hex>", kept across resumes
    status     "running" (written at the start), "finished" or "failed" (diverged)
    config     TrainConfig.to_dict(), with `precision` as asked (auto stays auto)
    metrics    split or eval set -> scores (loss, perplexity | accuracy, f1, ...)
    costs      trainable/total params, seconds, tokens/s, bytes, FLOPs, MFU, ...
    curves     train_loss, val_loss, lr: lists of [step, value]
    artifacts  adapter, model, head, tensorboard (+ quantized_model): paths or None
    env        machine, precision computed in, world_size, compiled, parallel
    notes      sentences explaining choices made during the run
    tracking   tracker name -> how to re-open its run (once trackers are open)
    estimates  FLOP formula parts, tokens, steps, memory breakdown, best_step (at the end)
    quant      the quantized deployment (quantized strategies only)

Keys the record does not know (written by other tools) are kept in `extra` and written after
them, so a read-then-write round trip changes nothing. One writer, `RecordWriter`, used by the
training loop only; everything else reads with `read_record`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loralab.training.checkpoint import atomic_write_json

FILENAME = "record.json"
STATUSES = ("running", "finished", "failed")
_OPTIONAL = ("tracking", "estimates", "quant")


@dataclass(frozen=True)
class ExtraResults:
    """What a caller's `after_evaluation` hook of `train()` adds to the record: scores per eval
    set (merged into `metrics[name]`), costs (merged into `costs`) and notes (appended)."""

    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    costs: Mapping[str, Any] = field(default_factory=dict)
    notes: Sequence[str] = ()


@dataclass
class Record:
    """One run's record (see the module docstring for each field). Mutable: the loop fills it
    in as the run goes and writes snapshots with `RecordWriter`."""

    run_id: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list] = field(
        default_factory=lambda: {"train_loss": [], "val_loss": [], "lr": []})
    artifacts: dict[str, str | None] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tracking: dict[str, Any] | None = None
    estimates: dict[str, Any] | None = None
    quant: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown record status {self.status!r}; one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        """The record.json layout (the nested dicts and lists are shared, not copied)."""
        out: dict[str, Any] = {
            "run_id": self.run_id, "status": self.status, "config": self.config,
            "metrics": self.metrics, "costs": self.costs, "curves": self.curves,
            "artifacts": self.artifacts, "env": self.env, "notes": self.notes}
        for key in _OPTIONAL:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out | {k: v for k, v in self.extra.items() if k not in out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """The record of a record.json dict. Raises KeyError without run_id, status or config,
        ValueError for an unknown status."""
        known = {f.name for f in fields(cls)} - {"extra"}
        for key in ("run_id", "status", "config"):
            if key not in data:
                raise KeyError(f"a run record needs {key!r}")
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def add(self, extra: ExtraResults) -> None:
        """Merge a hook's results: metrics per eval set, costs, notes."""
        for name, scores in extra.metrics.items():
            self.metrics.setdefault(name, {}).update(scores)
        self.costs.update(extra.costs)
        self.notes.extend(extra.notes)


class RecordWriter:
    """Writes a run's record.json atomically (checkpoint.atomic_write_json: temp file, fsync,
    rename), on the main process only (`enabled`); a no-op elsewhere."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: Record) -> None:
        if self.enabled:
            atomic_write_json(self.path, record.to_dict())


def read_record(path: str | Path) -> Record | None:
    """The record in `path` (a record.json file or the run directory holding it); None when
    there is none or it cannot be read (a run killed before its first write, a torn copy)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        return Record.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
