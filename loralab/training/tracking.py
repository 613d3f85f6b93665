"""Experiment tracking: where a run's curves, final metrics and costs go.

One small protocol (`Tracker`: `log` scalars at a step, `finish` with the run's parameters and
final values) and three backends, chosen by `TrainConfig.report_to`:

- tensorboard (the default): event files in RUN/tb, as before;
- wandb: Weights & Biases, grouped by `tracking_group` (a study's name); offline (files under
  RUN/wandb, `wandb sync` uploads them later) when no API key is configured or the service
  cannot be reached;
- mlflow: an MLflow run in the store MLFLOW_TRACKING_URI names, else in a local SQLite store
  `tracking_dir/mlflow.db` (tracking_dir defaults to the run directory; a study sets its output
  directory, so all its runs share one store and one experiment named after the study).

wandb and mlflow are optional (`pip install 'loralab[tracking]'`) and imported only when asked
for. The tracking settings (`TRACKING_FIELDS`) say where results are reported, not what is
computed: a study leaves them out of its config hash, so turning W&B on never re-trains a
finished run.
"""

from __future__ import annotations

import netrc
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from loralab.errors import UserError
from loralab.training.config import (  # noqa: F401  (re-exported)
    TRACKERS,
    TRACKING_FIELDS,
    parse_report_to,
)

INSTALL = "pip install 'loralab[tracking]'"
WANDB_HOST = "api.wandb.ai"


class Tracker(Protocol):
    """A destination for one run's scalars."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Scalars of optimizer step `step` (loss curves, learning rate, throughput)."""

    def finish(self, params: Mapping[str, Any], final: Mapping[str, float], ok: bool) -> None:
        """The run's parameters and final values (metrics, costs); `ok` False: it failed."""

    def where(self) -> dict[str, Any]:
        """What `report_final` needs to re-open this run's tracker later (JSON-able; kept in
        record.json under `tracking`)."""


def _require(module: str) -> Any:
    """Import an optional tracking library, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--report-to {module} needs the {module} package; {INSTALL} (or drop "
                        f"{module} from --report-to / report_to)") from None


# --- TensorBoard ----------------------------------------------------------------------------

class TensorBoardTracker:
    """Event files in `out/tb`; `add_hparams` pairs the config with the final values."""

    def __init__(self, out: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint
        self.dir = out / "tb"
        self.writer = SummaryWriter(str(self.dir),
                                    purge_step=start_step + 1 if start_step else None)

    def where(self) -> dict[str, Any]:
        return {"dir": str(self.dir)}

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, params: Mapping[str, Any], final: Mapping[str, float], ok: bool) -> None:
        if ok and params and final:
            self.writer.add_hparams(dict(params), dict(final), run_name="hparams")
        self.writer.close()


# --- Weights & Biases -----------------------------------------------------------------------

def wandb_mode(env: Mapping[str, str], netrc_path: str | None = None) -> str:
    """The W&B mode to start in: WANDB_MODE when set, else online with an API key (WANDB_API_KEY
    or a `wandb login` entry in ~/.netrc), else offline: without a key an online run could only
    fail or prompt, and the offline files can still be uploaded by `wandb sync`."""
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    try:
        found = netrc.netrc(netrc_path).authenticators(WANDB_HOST)
    except (OSError, netrc.NetrcParseError):
        found = None
    return "online" if found and found[2] else "offline"


class WandbTracker:
    """A W&B run with id = the loralab run id (a resumed run continues it), grouped by
    `group`, its files in `out/wandb`. If an online start fails (no network), it falls back to
    offline and says so in `note`."""

    def __init__(self, run_id: str, out: Path, group: str, params: Mapping[str, Any]) -> None:
        wandb = _require("wandb")
        mode = wandb_mode(os.environ)
        kwargs = {"project": os.environ.get("WANDB_PROJECT") or "loralab", "name": run_id,
                  "id": run_id, "group": group or None, "dir": str(out),
                  "config": dict(params), "resume": "allow",
                  "settings": wandb.Settings(console="off", quiet=True)}
        why = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "no API key"
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # wandb raises several kinds when it cannot connect
            if mode != "online":
                raise
            self.run = wandb.init(mode="offline", **kwargs)
            mode, why = "offline", f"the online start failed: {type(exc).__name__}"
        self.note = (f"W&B offline ({why}); upload later with: wandb sync "
                     f"{out / 'wandb'}/offline-run-*" if mode == "offline" else "")
        self.reopen = {"id": run_id, "dir": str(out), "mode": mode, "project": kwargs["project"],
                       "group": group or None}

    def where(self) -> dict[str, Any]:
        return dict(self.reopen)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def finish(self, params: Mapping[str, Any], final: Mapping[str, float], ok: bool) -> None:
        if final:
            self.run.summary.update(dict(final))
        self.run.finish(exit_code=0 if ok else 1)


# --- MLflow ---------------------------------------------------------------------------------

def mlflow_uri(store_dir: Path, env: Mapping[str, str]) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store `store_dir/mlflow.db`: MLflow 3 keeps
    the plain-file store (./mlruns) in maintenance mode and refuses it by default, SQLite is
    its recommended local backend (`mlflow ui --backend-store-uri` with this URI shows it)."""
    return env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


class MlflowTracker:
    """An MLflow run in the experiment `group` (default 'loralab'), tagged `loralab.run_id` so
    a resumed loralab run continues the same MLflow run. Uses `MlflowClient` (explicit run ids)
    rather than the fluent API, whose active run is process-global state."""

    def __init__(self, run_id: str, store_dir: Path, group: str,
                 params: Mapping[str, Any]) -> None:
        _require("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        if local:
            store_dir.mkdir(parents=True, exist_ok=True)
        self.uri = mlflow_uri(store_dir, os.environ)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = group or "loralab"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            name, artifact_location=(store_dir / "mlartifacts").resolve().as_uri()
            if local else None)
        found = self.client.search_runs([exp_id], f"tags.`loralab.run_id` = '{run_id}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_id,
                                                 tags={"loralab.run_id": run_id}).info.run_id
            # MLflow caps a parameter value's length; the record keeps the full config
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500])
                                                       for k, v in params.items()])
        self.step = 0

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        self.step = step
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in values.items()])

    def finish(self, params: Mapping[str, Any], final: Mapping[str, float], ok: bool) -> None:
        if final:
            self.log(self.step, final)
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")

    def where(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "run_id": self.run_id}


def open_trackers(report_to: tuple[str, ...], *, run_id: str, out: Path, start_step: int,
                  params: Mapping[str, Any], group: str = "", tracking_dir: str = ""
                  ) -> list[Tracker]:
    """The trackers `report_to` names, started for this run (rank 0 only: the caller checks)."""
    made: list[Tracker] = []
    for name in report_to:
        if name == "tensorboard":
            made.append(TensorBoardTracker(out, start_step))
        elif name == "wandb":
            made.append(WandbTracker(run_id, out, group, params))
        elif name == "mlflow":
            made.append(MlflowTracker(run_id, Path(tracking_dir) if tracking_dir else out,
                                      group, params))
    return made


def final_values(metrics: Mapping[str, Mapping[str, Any]], costs: Mapping[str, Any]
                 ) -> dict[str, float]:
    """The numbers every tracker gets at the end: `SPLIT/METRIC` for each evaluation split
    (loss, accuracy, perplexity, BLEU, ...) and `costs/NAME` for parameters, seconds,
    tokens/s, peak memory, FLOPs and artifact bytes. Non-numbers (and bools) are left out."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out = {f"{split}/{k}": float(v) for split, m in metrics.items() for k, v in m.items()
           if number(v) and k != "targets"}
    out.update({f"costs/{k}": float(v) for k, v in costs.items() if number(v)})
    return out


def report_final(record: Mapping[str, Any], final: Mapping[str, float]) -> list[str]:
    """Add final values computed after `train` closed the trackers (e.g. generation scores
    rescored later from RUN/generations.jsonl; a study's own scores reach the trackers inside
    `train` through its `after_evaluation` hook) to the same runs, re-opened from what
    record.json keeps under `tracking` (`Tracker.where`): TensorBoard scalars appended to RUN/tb,
    the W&B run resumed by its id in the mode it ran in (its summary updated; offline, a second
    offline-run-* directory of the same run id, which `wandb sync` appends), the MLflow run by
    its run id. Values go at the run's last step, as `finish` logs them. Returns notes on
    trackers that could not be reached: the scores are in record.json either way, so a
    tracker failing here must not fail the run."""
    where = record.get("tracking") or {}
    if not final or not where:
        return []
    train_loss = (record.get("curves") or {}).get("train_loss") or []
    step = int(train_loss[-1][0]) if train_loss else 0
    notes = []
    for name, info in where.items():
        try:
            _REOPEN[name](info, step, dict(final))
        except Exception as exc:  # a tracker's own errors vary: network, store, service
            notes.append(f"final values not reported to {name}: {type(exc).__name__}: {exc}")
    return notes


def _reopen_tensorboard(info: Mapping[str, Any], step: int, final: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(info["dir"])  # a new events file next to the run's own
    for k, v in final.items():
        writer.add_scalar(k, v, step)
    writer.close()


def _reopen_wandb(info: Mapping[str, Any], step: int, final: dict[str, float]) -> None:
    wandb = _require("wandb")
    run = wandb.init(mode=info["mode"], id=info["id"], name=info["id"], dir=info["dir"],
                     project=info["project"], group=info.get("group"), resume="allow",
                     settings=wandb.Settings(console="off", quiet=True))
    # the summary, as `finish` sets it: history steps of a resumed offline run cannot be trusted
    run.summary.update(final)
    run.finish()


def _reopen_mlflow(info: Mapping[str, Any], step: int, final: dict[str, float]) -> None:
    _require("mlflow")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=info["tracking_uri"])
    now = int(time.time() * 1000)
    client.log_batch(info["run_id"], metrics=[Metric(k, float(v), now, step)
                                              for k, v in final.items()])


_REOPEN = {"tensorboard": _reopen_tensorboard, "wandb": _reopen_wandb, "mlflow": _reopen_mlflow}
"""Tracker name -> the function that re-opens it from `Tracker.where()` and logs final values."""
