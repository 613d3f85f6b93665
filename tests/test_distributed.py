"""The same run under torchrun with 2 CPU processes (DDP over gloo) gives the loss curve of the
single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.path[:0] = [{tests!r}]
from test_distributed import job
for method in ("lora", "head"):
    job({out!r} + "/" + method, method)
"""


def job(out: str, method: str) -> dict:
    """4 steps, global batch 4 x 2 micro-batches (2 examples per process and micro-batch with
    2 processes), ragged target counts so the token normalisation across ranks matters."""
    from conftest import tiny_gpt2
    from test_train import Loaded, lm_data

    from loralab.train import TrainConfig, train

    config = TrainConfig(model="tiny", task="lm", method=method, out=out, max_steps=4,
                         batch_size=4, grad_accum=2, lr=1e-2, eval_every=2, keep_best=False)
    return train(config, loaded=Loaded(tiny_gpt2()), task_data=lm_data(n=32))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """One torchrun launch (2 processes) running the LoRA and the head-only job."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "job.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), out=str(root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "head"])
def test_two_process_ddp_matches_single_process(tmp_path, ddp_runs, method):
    single = job(str(tmp_path / "single"), method)
    ddp = json.loads((ddp_runs / method / "record.json").read_text())
    assert ddp["env"]["world_size"] == 2 and ddp["env"]["parallel"] == "ddp"
    a = [v for _, v in single["curves"]["train_loss"]]
    b = [v for _, v in ddp["curves"]["train_loss"]]
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, abs=1e-4)
    va = [v for _, v in single["curves"]["val_loss"]]
    vb = [v for _, v in ddp["curves"]["val_loss"]]
    assert vb == pytest.approx(va, abs=1e-4)
    # only rank 0 wrote: one record, one TensorBoard directory
    assert (ddp_runs / method / "tb").is_dir()
