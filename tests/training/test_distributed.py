"""The same runs under torchrun with 2 CPU processes (gloo) give the loss curves of the
single-process runs with the same global batch: DDP for LoRA and head-only, FSDP (fully_shard)
for full fine-tuning of GPT-2 and LLaMA (tied embeddings/lm_head), whose checkpoints, saved
final models, NaN stop and resume are checked too. One torchrun launch runs every job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, sys
sys.path[:0] = [{tests!r}, {tests!r} + "/training"]
from test_distributed import job, resumable
from loralab.training.loop import TrainingDiverged
out = {out!r}
for method in ("lora", "head"):
    job(out + "/" + method, method)
job(out + "/full-ddp", "full", parallel="ddp")
job(out + "/full-gpt2", "full", "gpt2")
job(out + "/full-llama", "full", "llama")
job(out + "/full-bert", "full", "bert")
resumable(out + "/resume-ref")
os.environ["LORALAB_FAULT_NAN_AT_STEP"] = "6"
try:
    resumable(out + "/resume-cut")
    raise SystemExit("the NaN fault did not stop the run")
except TrainingDiverged:
    pass
del os.environ["LORALAB_FAULT_NAN_AT_STEP"]
if os.environ["RANK"] == "0":  # the stopped run, for a single-process resume in the test
    import shutil
    shutil.copytree(out + "/resume-cut", out + "/resume-one")
resumable(out + "/resume-cut", resume=True)
"""


def _model(name: str):
    from conftest import tiny_bert, tiny_gpt2, tiny_llama

    return {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}[name]()


def job(out: str, method: str, model: str = "gpt2", parallel: str = "auto") -> dict:
    """4 steps, global batch 4 x 2 micro-batches (2 examples per process and micro-batch with
    2 processes), ragged target counts so the token normalisation across ranks matters. Full
    fine-tuning keeps the best validation checkpoint (LLaMA's best is step 2: restored).
    `bert` is sequence classification (no fused loss, the model's own forward)."""
    from loralab.training.config import TrainConfig
    from loralab.training.loop import train
    from test_train import Loaded, cls_data, lm_data

    task = "classify" if model == "bert" else "lm"
    config = TrainConfig(model="tiny", task=task, method=method, out=out, max_steps=4,
                         batch_size=4, grad_accum=2, lr=1e-2, eval_every=2,
                         keep_best=method == "full", parallel=parallel, precision="fp32")
    data = cls_data(n=32) if task == "classify" else lm_data(n=32)
    return train(config, loaded=Loaded(_model(model)), task_data=data)


def resumable(out: str, resume: bool = False) -> dict:
    """Full fine-tuning, 6 steps of 5 per epoch: checkpoints at 2, 3 (evaluation), 4, 5
    (epoch end, evaluation), 6; warm-up + cosine."""
    from loralab.training.config import TrainConfig
    from loralab.training.loop import train
    from test_train import Loaded, lm_data

    config = TrainConfig(model="tiny", task="lm", method="full", out=out, max_steps=6,
                         batch_size=4, grad_accum=2, lr=1e-2, eval_every=3, checkpoint_every=2,
                         keep_best=False, warmup_steps=2, schedule="cosine", precision="fp32")
    return train(config, resume=resume, loaded=Loaded(_model("gpt2")),
                 task_data=lm_data(n=40))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """One torchrun launch (2 processes) running every job of SCRIPT."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "job.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), out=str(root)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LORALAB_FAULT_NAN_AT_STEP", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _training_notes(record: dict) -> list[str]:
    return [n for n in record["notes"] if not n.startswith("matmul peak")]


def _curves(record: dict, name: str) -> list[float]:
    return [v for _, v in record["curves"][name]]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


# Tolerances between a 2-process run and one process. The two reduce gradients in a different
# order and run GEMMs on 2 instead of 4 rows per micro-batch, so their sums round differently
# (the last bits differ, and by how much depends on the CPU's kernels: AVX2 vs AVX-512/AMX
# blocking). Losses (log space, ~0.7..4.9) then differ by ~1e-7..1e-6 after 4 steps (measured
# 6e-7 here, 9e-7 on an AVX-512 Xeon): 1e-4 is >100x that and far below what a wrong token
# normalisation across ranks moves them (~1e-2).
LOSS_ABS = 1e-4
# Adam divides by sqrt(v) + 1e-8, so a gradient component that is ~0 (a key bias, which the
# softmax ignores; a weight whose gradient crosses zero) turns its fp32 rounding noise (~1e-10)
# into updates of up to lr * noise / eps ~ 1e-4 per step: a few weights differ by up to ~1e-4
# (7.6e-5 measured with MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default) while the rest agree to
# ~1e-6. 1e-3 is 10% of one lr=1e-2 step: a shard in the wrong place or a missing gradient
# reduction moves weights by ~lr (Adam's sign-like step) or by their size (0.02..1).
WEIGHT_ABS = 1e-3


def _assert_same_metrics(got: dict, ref: dict) -> None:
    """Validation metrics: the loss in log space; perplexity = exp(loss) through its log (an
    absolute 1e-4 on a perplexity of ~127 is a relative 8e-7, under the rounding difference of
    two reduction orders); counts and count ratios (targets, accuracy, F1) differ by >= 1/16
    if a prediction flips, so 1e-4 keeps them exact in effect."""
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        if k == "perplexity":
            assert math.log(got[k]) == pytest.approx(math.log(v), abs=LOSS_ABS), k
        else:
            assert got[k] == pytest.approx(v, abs=LOSS_ABS), k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "head", "full-ddp"])
def test_two_process_ddp_matches_single_process(tmp_path, ddp_runs, method):
    single = job(str(tmp_path / "single"), method.removesuffix("-ddp"))
    ddp = json.loads((ddp_runs / method / "record.json").read_text())
    assert ddp["env"]["world_size"] == 2 and ddp["env"]["parallel"] == "ddp"
    a = _curves(single, "train_loss")
    b = _curves(ddp, "train_loss")
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, abs=LOSS_ABS)
    assert _curves(ddp, "val_loss") == pytest.approx(_curves(single, "val_loss"), abs=LOSS_ABS)
    # only rank 0 wrote: one record, one TensorBoard directory
    assert (ddp_runs / method / "tb").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "llama", "bert"])
def test_two_process_fsdp_full_matches_single_process(tmp_path, ddp_runs, model):
    """FSDP full fine-tuning (fused loss through the sharded tied head, accumulation without
    intermediate reduce-scatter, clipping over DTensors, best-checkpoint restore): the same
    curves, the same gathered checkpoint and the same saved model as one process."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    single_dir = tmp_path / "single"
    single = job(str(single_dir), "full", model)
    run = ddp_runs / f"full-{model}"
    fsdp = json.loads((run / "record.json").read_text())
    assert single["env"]["parallel"] == "single"
    assert fsdp["env"]["world_size"] == 2 and fsdp["env"]["parallel"] == "fsdp"
    assert len(_curves(fsdp, "train_loss")) == 4
    assert _curves(fsdp, "train_loss") == pytest.approx(_curves(single, "train_loss"),
                                                        abs=LOSS_ABS)
    assert _curves(fsdp, "val_loss") == pytest.approx(_curves(single, "val_loss"), abs=LOSS_ABS)
    # the same best step restored (or none); a note that the matmul peak was re-measured
    # depends on what else the machine ran at the time, not on the training
    assert _training_notes(fsdp) == _training_notes(single)
    _assert_same_metrics(fsdp["metrics"]["validation"], single["metrics"]["validation"])
    # sizes are global, memory figures are per process (half the weights)
    assert fsdp["costs"]["total_params"] == single["costs"]["total_params"]
    assert fsdp["estimates"]["memory"]["weights"] < single["estimates"]["memory"]["weights"]

    # the checkpoint holds whole tensors in the single-process layout
    a, b = _ckpt(single_dir), _ckpt(run)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=WEIGHT_ABS, rtol=0)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    # Adam's moments span ~1e-26..1e-2 (exp_avg_sq is a squared gradient): compare each to
    # 1e-3 of its largest value over the model (the weights' differences above move them by
    # <= 2.6e-5 of it, measured); a per-element relative tolerance would fail on the
    # noise-only components, an absolute one would not see exp_avg_sq at all
    scale = {k: max(float(s[k].abs().max()) for s in a["optimizer"]["state"].values())
             for k in next(iter(a["optimizer"]["state"].values()))}
    for i in a["optimizer"]["state"]:
        for k, v in a["optimizer"]["state"][i].items():
            torch.testing.assert_close(b["optimizer"]["state"][i][k], v, atol=1e-3 * scale[k],
                                       rtol=0)

    # the final model is a plain transformers directory with the same logits
    auto = AutoModelForSequenceClassification if model == "bert" else AutoModelForCausalLM
    ref = auto.from_pretrained(single_dir / "model").eval()
    got = auto.from_pretrained(run / "model").eval()
    if model != "bert":  # still tied
        assert got.get_output_embeddings().weight is got.get_input_embeddings().weight
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # logits are < 1 here; the weights' differences move them <= 6e-6
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_fsdp_nan_stop_then_resume_equals_uninterrupted_run(tmp_path, ddp_runs):
    """Under FSDP a NaN at step 6 stops the run and keeps the step-5 checkpoint; resuming
    from it ends exactly where the uninterrupted FSDP run ends, which equals one process."""
    cut, ref = ddp_runs / "resume-cut", ddp_runs / "resume-ref"
    rec = json.loads((cut / "record.json").read_text())
    assert rec["status"] == "finished" and rec["env"]["parallel"] == "fsdp"
    assert any("resumed from step 5" in n for n in rec["notes"])
    assert [s for s, _ in rec["curves"]["train_loss"]] == list(range(1, 7))
    a, b = _ckpt(ref), _ckpt(cut)
    assert a["state"]["step"] == b["state"]["step"] == 6
    # exact: both are the same 2-process FSDP computation on the same CPU (same kernels, same
    # shapes, same reduction order); resuming must not change a bit
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["state"]["curves"] == b["state"]["curves"]
    single = resumable(str(tmp_path / "single"))
    assert _curves(rec, "train_loss") == pytest.approx(_curves(single, "train_loss"),
                                                       abs=LOSS_ABS)
    assert _curves(rec, "val_loss") == pytest.approx(_curves(single, "val_loss"), abs=LOSS_ABS)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(tmp_path, ddp_runs):
    """The gathered checkpoint has the single-process layout: the run stopped under FSDP
    (step 5) finishes in one process like the uninterrupted FSDP run."""
    import shutil

    one = tmp_path / "one"
    shutil.copytree(ddp_runs / "resume-one", one)
    rec = resumable(str(one), resume=True)
    assert rec["env"]["parallel"] == "single"
    assert any("resumed from step 5" in n for n in rec["notes"])
    a, b = _ckpt(ddp_runs / "resume-ref"), _ckpt(one)
    for k in a["model"]:  # step 6 in one process vs two: the same Adam noise as above
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=WEIGHT_ABS, rtol=0)
    ref = json.loads((ddp_runs / "resume-ref" / "record.json").read_text())
    assert _curves(rec, "train_loss") == pytest.approx(_curves(ref, "train_loss"), abs=LOSS_ABS)
