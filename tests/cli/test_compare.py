"""`loralab compare`: KEY=VALUE overrides, --dry-run and its plan, study progress."""

from __future__ import annotations

import pytest
import yaml

from loralab import study as st
from loralab.cli.main import main
from loralab.errors import UserError

STUDY = """name: ov
model: minilm-l6
task: classify
data: rt-snippets
eval: [rt-snippets, {name: extra, data: rt-snippets, max_examples: 4}]
budget: {epochs: 2, batch_size: 4, seq_len: 32, lr: 1.0e-3}
seeds: 1
strategies:
  - {name: head, method: head}
  - {name: lora-r1, method: lora, preset: qv, rank: 1, alpha: 2}
"""


def test_overrides_change_the_mapping_before_validation():
    spec = st.parse_study(STUDY, "s.yaml", overrides=[
        "budget.max_steps=5", "seeds=3", "strategies.lora-r1.rank=16", "budget.lr=2.0e-4",
        "eval.1.max_examples=8", "strategies.1.alpha=null", "budget.schedule=cosine"])
    assert spec.budget["max_steps"] == 5 and "epochs" not in spec.budget  # alternatives
    assert spec.budget["lr"] == 2.0e-4 and spec.budget["schedule"] == "cosine"
    assert spec.seeds == (0, 1, 2)
    lora = next(s for s in spec.strategies if s.name == "lora-r1")
    assert lora.rank == 16 and lora.alpha is None
    assert spec.eval[1].max_examples == 8
    assert spec.raw["budget"]["max_steps"] == 5  # the report records the study as run
    # the same study without overrides is unchanged (a file's own values)
    plain = st.parse_study(STUDY, "s.yaml")
    assert plain.budget["epochs"] == 2 and plain.seeds == (0,)


@pytest.mark.parametrize("item,needle", [
    ("budget.max_stepz=5", "override budget.max_stepz=5: unknown field 'max_stepz' in budget"),
    ("budgt.max_steps=5", "override budgt.max_steps=5: unknown field 'budgt' in the study"),
    ("budget.max_steps=0", "override budget.max_steps=0: budget 'max_steps' must be an integer"),
    ("seeds=0", "override seeds=0: seeds must be a count >= 1"),
    ("strategies.lora-9.rank=3", "no item named 'lora-9' in strategies"),
    ("strategies.head.rank=3", "'rank' only applies to LoRA methods"),
    ("data.fraction=0.5", "'data' is 'rt-snippets', not a mapping"),
    ("budget", "is not KEY=VALUE"),
    ("budget.lr=[1,", "not valid YAML"),
])
def test_bad_override_is_a_one_line_error_naming_it(item, needle):
    with pytest.raises(UserError) as info:
        st.parse_study(STUDY, "s.yaml", overrides=[item])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_compare_dry_run_prints_resolved_study_and_plan(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    out = tmp_path / "out"
    assert main(["compare", str(path), "budget.max_steps=5", "seeds=2", "--out", str(out),
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    resolved, _, plan = text.partition("# plan:")
    raw = yaml.safe_load(resolved)
    assert raw["budget"]["max_steps"] == 5 and "epochs" not in raw["budget"]
    assert raw["seeds"] == [0, 1]
    rows = [line.split() for line in plan.strip().splitlines()[1:]]
    assert [r[1] for r in rows] == [f"ov/{s}/seed{n}" for n in (0, 1)
                                    for s in ("untuned", "head", "lora-r1")]
    assert all(r[0] == "train" for r in rows)
    assert not out.exists()  # a dry run writes nothing
    # overrides after options, and a bad one: exit 2, one line naming it
    assert main(["compare", str(path), "--dry-run", "--out", str(out), "seeds=1"]) == 0
    assert "(3 strategies x 1 seeds)" in capsys.readouterr().out
    assert main(["compare", str(path), "budget.max_stepz=5", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_stepz" in err[0]


def test_compare_dry_run_plan_sees_finished_runs(tmp_path, capsys):
    from study_helpers import fake_run_fn

    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    out = tmp_path / "out"
    st.run_study(st.load_study(path), out / "ov", run_fn=fake_run_fn([]), progress=lambda m: None)
    assert main(["compare", str(path), "seeds=2", "--out", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out.partition("# plan:")[2].strip().splitlines()[1:]
    actions = {line.split()[1]: line.split()[0] for line in plan}
    assert {k: v for k, v in actions.items() if k.endswith("seed0")} == {
        "ov/untuned/seed0": "skip", "ov/head/seed0": "skip", "ov/lora-r1/seed0": "skip"}
    assert {v for k, v in actions.items() if k.endswith("seed1")} == {"train"}


def test_study_progress_counts_runs_to_do(tmp_path, capsys):
    from study_helpers import BASE, fake_run_fn

    spec = st.parse_study(BASE)
    st.run_study(spec, tmp_path, run_fn=fake_run_fn([]), progress=lambda m: None, bar=True)
    err = capsys.readouterr().err.splitlines()
    n = len(spec.strategies)
    assert [line.split(",")[0] for line in err[:-1]] == [
        f"study {spec.name}: {i}/{n} runs" for i in range(1, n)]
    assert err[-1].startswith(f"study {spec.name}: {n}/{n} runs in ")
