"""Progress lines and tracker scalars of a running training job."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from loralab.training.config import TrainConfig
from loralab.training.tracking import open_trackers


class Logger:
    """Scalars to the chosen trackers (`config.report_to`: TensorBoard by default, W&B,
    MLflow; loralab.training.tracking) and the progress display; a no-op off rank 0."""

    def __init__(self, config: TrainConfig, out: Path, total_steps: int, start_step: int,
                 run_id: str, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.trackers: list = []
        self.reopen: dict = {}  # tracker name -> how to re-open it (record.json `tracking`)
        self.bar = None
        self.t0 = time.perf_counter()
        self.start_step = start_step
        self.every = config.log_every or max(1, total_steps // 20)
        if not enabled:
            return
        self.trackers = open_trackers(config.report_to, run_id=run_id, out=out,
                                      start_step=start_step, params=hparams(config),
                                      group=config.tracking_group,
                                      tracking_dir=config.tracking_dir)
        self.reopen = {name: t.where()
                       for name, t in zip(config.report_to, self.trackers, strict=True)}
        if sys.stderr.isatty() and total_steps > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        for tracker in self.trackers:
            note = getattr(tracker, "note", "")  # set by some trackers (W&B offline)
            if note:
                self.message(note)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(step, values)

    def progress(self, step: int, loss: float, lr: float, tps: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        elif step % self.every == 0 or step == self.total:
            done = step - self.start_step
            spent = time.perf_counter() - self.t0
            eta = spent / max(1, done) * (self.total - step)
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} tok/s {tps:.0f} "
                  f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", file=sys.stderr,
                  flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else
             lambda s: print(s, file=sys.stderr, flush=True))(text)

    def close(self, hparams: dict | None = None, metrics: dict | None = None) -> None:
        """End every tracker: with the run's parameters and final values (metrics and costs,
        `tracking.final_values`) when it finished, as failed when `metrics` is None."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.finish(hparams or {}, metrics or {}, metrics is not None)


def hparams(config: TrainConfig) -> dict:
    """The config as tracker parameters: numbers, strings and booleans as they are, the rest
    (tuples, None) as strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in config.to_dict().items()}

