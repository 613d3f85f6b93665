"""The plan of a study: its run matrix (strategy x seed), each run's config and hash, and what
to do with each run (skip, ingest, resume or train).

`run_study` is resumable at any point because every decision here reads what is on disk: a run
whose database row says `finished` with the same config hash is skipped; a run directory whose
`record.json` says finished (and holds every eval set the study asks for) is ingested without
training; a run with checkpoints of the same config is resumed; anything else trains afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralab.errors import ConfigError, UserError
from loralab.results.database import ResultsDB
from loralab.study.spec import Strategy, Study, config_error_location
from loralab.training.config import TRACKING_FIELDS, TrainConfig, make_config
from loralab.training.precision import resolve_precision
from loralab.training.record import read_record

STUDY_ONLY = ("strategy", "study", "eval_sets", "eval_max_examples", "data_options")
"""Run-config keys that are the study's business, not TrainConfig fields."""


@dataclass(frozen=True)
class RunSpec:
    """One cell of the matrix: which strategy, which seed, where, with which train config."""

    run_id: str
    strategy: str
    seed: int
    run_dir: Path
    config: dict[str, Any]

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def config_hash(config: dict[str, Any]) -> str:
    """The identity of a run's computation: a finished run with the same hash is reused.

    sha256 of the config's sorted JSON, first 16 hex digits. The tracking settings
    (`TRACKING_FIELDS`: where results are reported) are left out, so turning W&B or MLflow on
    does not re-train finished runs."""
    kept = {k: v for k, v in config.items() if k not in TRACKING_FIELDS}
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- the run matrix
def run_config(study: Study, strategy: Strategy, seed: int, run_dir: Path) -> dict[str, Any]:
    """The train config of one run, as a plain dict of TrainConfig fields plus STUDY_ONLY keys.

    Later sources override earlier ones: the study (model, task, data), the shared budget, the
    strategy's own fields (lr/epochs/max_steps replace the budget's length), the study's
    `train_options`, the strategy's `options`. The seed is the run's seed for every strategy,
    so every strategy sees the same data in the same order."""
    budget = dict(study.budget)
    other = {"epochs": "max_steps", "max_steps": "epochs"}  # a strategy's length replaces both
    for key in ("lr", "epochs", "max_steps"):
        value = getattr(strategy, key)
        if value is not None:
            if key in other:
                budget.pop(other[key], None)
            budget[key] = value
    config: dict[str, Any] = {
        "model": study.model, "task": study.task, "data": study.data,
        "eval_sets": [dataclasses.asdict(e) for e in study.eval],
        "method": strategy.method, "seed": seed, "out": str(run_dir),
        "strategy": strategy.name, "study": study.name,
    }
    if study.data_fraction is not None:
        config["data_fraction"] = study.data_fraction
    if study.data_options:
        config["data_options"] = study.data_options
    if study.num_labels is not None:
        config["num_labels"] = study.num_labels
    config.update(budget)
    for key in ("preset", "rank", "alpha", "dropout", "rslora", "dora", "init", "lr_ratio",
                "head_epochs"):
        value = getattr(strategy, key)
        if value is not None:
            config[key] = value
    if strategy.peft is not None:  # only then in the config (and its hash)
        config["peft"] = strategy.peft
    if strategy.targets is not None:  # comma-joined, as config hashes have always held them
        config["preset"] = ",".join(strategy.targets)
    config.update(study.train_options)
    config.update(strategy.options)
    # where results are reported (outside the config hash): W&B groups and the MLflow
    # experiment by study, one MLflow store in the study's output directory (OUT/runs/RUN)
    config.update(tracking_group=study.name, tracking_dir=str(run_dir.parent.parent))
    if study.report_to is not None:
        config["report_to"] = list(study.report_to)
    return config


def study_header(study: Study, todo: int, out_dir: Path) -> str:
    """The line every executor prints first: `study 'x': N runs (S strategies x K seeds),
    F finished, T to run; output DIR`."""
    total = len(study.strategies) * len(study.seeds)
    return (f"study '{study.name}': {total} runs ({len(study.strategies)} strategies x "
            f"{len(study.seeds)} seeds), {total - todo} finished, {todo} to run; output "
            f"{out_dir}")


def run_matrix(study: Study, out_dir: Path, *, native_bf16: bool | None = None
               ) -> list[RunSpec]:
    """All runs of the study, seed-major so a partial study already covers every strategy.
    Precision auto is resolved for this machine (`pin_precision`)."""
    specs = []
    for seed in study.seeds:
        for strategy in study.strategies:
            run_dir = Path(out_dir) / "runs" / f"{strategy.name}-seed{seed}"
            config = pin_precision(run_config(study, strategy, seed, run_dir), native_bf16)
            specs.append(RunSpec(run_id=f"{study.name}/{strategy.name}/seed{seed}",
                                 strategy=strategy.name, seed=seed, run_dir=run_dir,
                                 config=config))
    return specs


def pin_precision(config: dict[str, Any], native_bf16: bool | None = None) -> dict[str, Any]:
    """A run config with precision auto (the default) replaced by what it computes in on the
    device `train` picks (`precision.resolve_precision`; `native_bf16` overrides the machine's
    answer), so the config hash, which decides whether a finished run is reused, names the
    computation: a bf16 run on an AMX machine is not the fp32 run of an AVX2 one. fp32 stays
    implicit where the study names no precision: that is what such a config meant before auto
    existed, so existing studies keep their hashes (and finished runs) where bf16 is not
    native, and train again, in bf16, only where it is."""
    if config.get("precision", "auto") != "auto":
        return config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = resolve_precision("auto", device, native_bf16=native_bf16)
    if resolved == "fp32" and "precision" not in config:
        return config
    return {**config, "precision": resolved}


# ----------------------------------------------------------------------------- validation
def to_train_config(config: dict[str, Any]) -> TrainConfig:
    """A study run config -> its `TrainConfig` (the STUDY_ONLY keys dropped). A setting
    TrainConfig does not know is an error (silently dropping, say, `dropout` would make a
    study measure something other than what it says). Raises ConfigError (a UserError)."""
    return make_config({k: v for k, v in config.items() if k not in STUDY_ONLY})


def check_configs(study: Study, out_dir: Path) -> None:
    """Fail before any training if a run's settings are not a valid TrainConfig: TrainConfig's
    own validator decides, and the error names the file line (or override) that set the key,
    `file:line: strategy 'x': message`. Raises UserError."""
    for spec in run_matrix(study, out_dir):
        try:
            to_train_config(spec.config)
        except ConfigError as exc:
            loc = config_error_location(study, spec.strategy, exc)
            raise UserError(f"{loc}: strategy '{spec.strategy}': {exc}") from None


def describe_run(config: dict[str, Any]) -> str:
    """A run config in one line: `lora, preset=attn, rank=8, lr=0.0002, max_steps=20`."""
    parts = [config["method"]]
    for key in ("preset", "rank", "alpha", "lr", "max_steps", "epochs"):
        if config.get(key) is not None:
            parts.append(f"{key}={config[key]}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- what to do
def stored_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record.json as a dict (`training.record.read_record`), None if unreadable."""
    record = read_record(run_dir)
    return None if record is None else record.to_dict()


def _has_checkpoints(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and any(ckpt.iterdir())


def _stored_hash(run_dir: Path) -> str | None:
    try:
        return config_hash(json.loads((run_dir / "study_config.json").read_text()))
    except (OSError, ValueError):
        return None


def record_complete(record: dict[str, Any], config: dict[str, Any]) -> bool:
    """Does a finished record hold every eval set (and its generation scores, if asked)?"""
    metrics = record.get("metrics") or {}
    for ev in config.get("eval_sets", []):
        if ev["name"] not in metrics:
            return False
        if ev.get("generate") is not None and "generated" not in metrics[ev["name"]]:
            return False
    return True


def plan(study: Study, out_dir: Path, db: ResultsDB) -> Iterator[tuple[RunSpec, str]]:
    """Yield (spec, action): action is 'skip' (finished, same config), 'ingest' (record.json
    says finished but the process died before the database heard of it), 'resume' (checkpoints
    of the same config exist) or 'train'. A finished record without the study's own
    evaluation (generation scores) trains afresh: the record is written once, by train(), and
    never patched, so only a new run can add them (the old directory is kept aside)."""
    for spec in run_matrix(study, out_dir):
        row = db.get(spec.run_id)
        if row and row["status"] == "finished" and row.get("config_hash") == spec.config_hash:
            yield spec, "skip"
            continue
        yield spec, disk_action(spec)


def disk_action(spec: RunSpec) -> str:
    """What the run directory says to do with a run the database does not hold as finished:
    'ingest', 'resume' or 'train' (`plan`). A process that may train the run decides again
    under its lease (`loralab.study.leases`), since another process may have moved on."""
    same = _stored_hash(spec.run_dir) == spec.config_hash
    record = stored_record(spec.run_dir) if same else None
    finished = record is not None and record.get("status") == "finished"
    if record is not None and finished and record_complete(record, spec.config):
        return "ingest"
    if same and not finished and _has_checkpoints(spec.run_dir):
        return "resume"
    return "train"
