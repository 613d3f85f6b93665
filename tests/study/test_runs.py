"""Using a finished run (loralab.study.runs): `load_run_model` rebuilds exactly the model whose
metrics the run recorded, for every method (issue 19), and re-evaluation reproduces them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loralab import study as st
from loralab.errors import UserError


@pytest.fixture(scope="module")
def tiny_lm_run_inputs(tmp_path_factory):
    """A tiny random LLaMA (tied head) with the bundled GPT-2 tokenizer, saved as a model
    directory, and a small .txt corpus (split 90/5/5 by loralab.data.tasks): the case
    script's setup."""
    from conftest import save_tiny_llama_inputs

    return save_tiny_llama_inputs(tmp_path_factory.mktemp("tiny-lm"), 64,
                                  ("the river city centre runs past near old bridge town "
                                   "market boats birds water").split())


def _train_tiny(inputs: Path, out: Path, method: str, quant: str | None = None, **kw) -> dict:
    from loralab.training.config import make_config
    from loralab.training.loop import train

    values = {"model": str(inputs / "llama"), "task": "lm", "data": str(inputs / "text.txt"),
              "method": method, "preset": "attn-proj-ffn", "rank": 4, "max_steps": 6,
              "batch_size": 8, "seq_len": 32, "lr": 1e-2, "out": str(out), "compile": "off",
              **kw}
    if quant is not None:
        values["quant"] = quant
    return train(make_config(values))


@pytest.mark.slow
def test_qlora_run_reloads_on_its_quantized_base(tiny_lm_run_inputs, tmp_path, capsys):
    """The case qlora_reeval: re-evaluating a qlora run used the float base W + s B A instead
    of the quantized Q(W) + s B A it trained and recorded (10.595728 vs 10.596695 nats)."""
    import torch

    from loralab import load_adapter
    from loralab.cli.main import main
    from loralab.data.tasks import load_task_data
    from loralab.models.loading import load_model
    from loralab.quant import is_quantized_tensor
    from loralab.study.runs import evaluate_saved
    from loralab.training.config import make_config
    from loralab.training.evaluate import evaluate
    from loralab.training.strategies.base import strategy_for

    inputs, run = tiny_lm_run_inputs, tmp_path / "run"
    rec = _train_tiny(inputs, run, "qlora", "nf4")
    recorded = rec["metrics"]["validation"]["loss"]
    cfg = make_config(rec["config"])
    loaded = load_model(cfg.model, "lm")  # Q(W) + adapter rebuilt by hand
    strategy_for(cfg).prepare_base(loaded.model)  # the run's qlora nf4 base
    load_adapter(loaded.model, run / "adapter")
    data = load_task_data(cfg.data, "lm", loaded.tokenizer, seq_len=cfg.seq_len, seed=cfg.seed)
    by_hand = evaluate(loaded.model.eval(), data.splits["validation"], data.collate_fn,
                       cfg)["loss"]
    again = evaluate_saved(run_dir=run, splits=("validation",))["validation"]["loss"]
    # the same quantized weights, adapter and batches through the same kernels: equal up to
    # the order of the per-batch loss sums (none here), so 1e-6 relative is tight (the float
    # base was off by 1e-4 relative, the quantization error of this tiny random model)
    assert by_hand == pytest.approx(recorded, rel=1e-6, abs=0)
    assert again == pytest.approx(recorded, rel=1e-6, abs=0)
    net, _, _ = st.load_run_model(run)
    adapted = [m for m in net.modules() if hasattr(m, "lora_A")]
    assert adapted and all(is_quantized_tensor(m.base.weight) for m in adapted)

    # merge --run writes the float form of Q(W) + s B A: dequant(Q(W)) + s B A, and says so
    assert main(["merge", "--run", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "dequant(Q(W)) + s B A" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(is_quantized_tensor(p) for p in merged.parameters())
    batch = data.collate_fn([data.splits["validation"][i] for i in range(4)])
    with torch.no_grad():  # one fp32 sum W' = deq(Q(W)) + s B A instead of two matmuls
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits,
                                   net(input_ids=batch["input_ids"]).logits,
                                   rtol=1e-4, atol=1e-4)

    # an old run that does not record its scheme: a one-line error, not the wrong model
    record = json.loads((run / "record.json").read_text())
    record["config"].pop("quant")
    record.pop("quant")
    (run / "record.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="records no quantization scheme.*re-run it"):
        st.load_run_model(run)


METHODS = [("none", None), ("full", None), ("head", None), ("lora", None), ("lora-head", None),
           ("qat-lora", "int4"), ("qlora", "int8"), ("lora-ptq", "nf4")]


@pytest.mark.slow
@pytest.mark.parametrize("method,scheme", METHODS, ids=[m for m, _ in METHODS])
def test_reevaluating_a_run_reproduces_its_recorded_metrics(tiny_lm_run_inputs, tmp_path,
                                                            method, scheme):
    """`loralab eval RUN` (train.evaluate_saved -> load_run_model) re-evaluates exactly the
    model whose metrics each method records."""
    from loralab.study.runs import evaluate_saved

    rec = _train_tiny(tiny_lm_run_inputs, tmp_path / "run", method, scheme, max_steps=3)
    again = evaluate_saved(run_dir=tmp_path / "run")
    assert set(again) == {"validation", "test"}
    for split, metrics in again.items():
        recorded = rec["metrics"][split]
        assert set(metrics) == set(recorded)
        for key, value in metrics.items():
            # the same weights through the same evaluation code on the same batches
            assert value == pytest.approx(recorded[key], rel=1e-6, abs=1e-9), (split, key)
