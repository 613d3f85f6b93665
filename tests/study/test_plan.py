"""The plan of a study (loralab.study.plan): the run matrix, run configs and hashes, and the
TrainConfig validation of every run naming the line that set a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from loralab import study as st
from loralab.errors import UserError
from study_helpers import BASE


def test_strategy_lr_overrides_budget_and_seeds_flag():
    s = st.parse_study(BASE.replace("{name: head, method: head}",
                                    "{name: head, method: head, lr: 0.01}"))
    s = st.with_seeds(s, 3)
    specs = st.run_matrix(s, Path("/tmp/x"))
    assert len(specs) == 9
    assert {sp.config["lr"] for sp in specs if sp.strategy == "head"} == {0.01}
    assert {sp.config["lr"] for sp in specs if sp.strategy == "lora-r1"} == {1.0e-3}
    assert sorted({sp.seed for sp in specs}) == [0, 1, 2]


def test_unknown_train_setting_fails_before_training(tmp_path):
    pytest.importorskip("loralab.training.loop")
    s = st.parse_study(BASE.replace("{name: head, method: head}",
                                    "{name: head, method: head, options: {not_a_field: 1}}"))
    with pytest.raises(UserError, match="not_a_field"):
        st.run_study(s, tmp_path, progress=lambda m: None)


def test_auto_precision_keeps_study_hashes_where_bf16_is_emulated_and_pins_bf16_where_native():
    """A study that names no precision runs at auto. Without native bf16 (this AVX2 machine)
    auto is fp32, which is what such a config meant before auto existed: the run configs, and
    so their hashes and finished runs, stay exactly as they were. With native bf16 the runs
    compute in bf16, a different computation: `precision: bf16` enters the config and the hash.
    An explicit precision is kept as written."""
    study = st.load_study(st.resolve_study_path("default"))
    strategies = {s.name: s for s in study.strategies}
    out = Path("/tmp/x")
    emulated = st.run_matrix(study, out, native_bf16=False)
    native = st.run_matrix(study, out, native_bf16=True)
    for spec, pinned in zip(emulated, native, strict=True):
        before = st.run_config(study, strategies[spec.strategy], spec.seed, spec.run_dir)
        assert "precision" not in before and spec.config == before
        assert spec.config_hash == st.config_hash(before)
        assert pinned.config == {**before, "precision": "bf16"}
        assert pinned.config_hash != spec.config_hash
    for written, expected in (("fp32", ("fp32", "fp32")), ("bf16", ("bf16", "bf16")),
                              ("auto", ("fp32", "bf16"))):
        s = st.parse_study(BASE.replace("lr: 1.0e-3}", f"lr: 1.0e-3, precision: {written}}}"))
        got = tuple({sp.config["precision"] for sp in st.run_matrix(s, out, native_bf16=n)}
                    for n in (False, True))
        assert got == ({expected[0]}, {expected[1]})


@pytest.mark.parametrize("edit, needle", [
    # a budget value TrainConfig rejects: the budget's line
    (lambda t: t.replace("seq_len: 32", "seq_len: 1"), r"^s\.yaml:6: strategy '\w+': seq_len"),
    # a strategy option: the strategy's line (its options mapping is on it)
    (lambda t: t.replace("{name: head, method: head}",
                         "{name: head, method: head, options: {warmup_ratio: 2}}"),
     r"^s\.yaml:9: strategy 'head': warmup_ratio must be in \[0, 1\)"),
    # train_options, set on a later line of its own
    (lambda t: t + "train_options:\n  schedule: bogus\n",
     r"^s\.yaml:12: strategy '\w+': unknown schedule 'bogus'"),
])
def test_train_config_errors_name_the_line_that_set_the_key(edit, needle):
    """TrainConfig is the one validator of a run's settings; its ConfigError names the key,
    and the study points at the line that set it."""
    s = st.parse_study(edit(BASE), source="s.yaml")
    with pytest.raises(UserError, match=needle):
        st.check_configs(s, Path("/tmp/unused"))


def test_train_config_error_from_an_override_names_the_override():
    s = st.parse_study(BASE, source="s.yaml", overrides=["strategies.head.options.warmup_ratio=2"])
    with pytest.raises(UserError, match=r"^override strategies\.head\.options\.warmup_ratio=2: "
                                        "strategy 'head': warmup_ratio"):
        st.check_configs(s, Path("/tmp/unused"))


def test_plan_ingests_finished_records_and_retrains_incomplete_ones(tmp_path):
    """A finished record.json of the same config is ingested; one without the study's own
    evaluation (generation scores) is trained afresh, never patched; checkpoints resume."""
    import json

    from loralab.results.database import ResultsDB
    from study_helpers import fake_run_fn

    s = st.parse_study(BASE.replace("eval: [rt-snippets]",
                                    "eval: [{name: rt-snippets, generate: true}]"))
    runs = st.run_matrix(s, tmp_path)
    for spec in runs:
        spec.run_dir.mkdir(parents=True)
        (spec.run_dir / "study_config.json").write_text(json.dumps(spec.config))
        fake_run_fn([])(spec.config, False)
    complete, incomplete, killed = runs
    record = json.loads((complete.run_dir / "record.json").read_text())
    record["metrics"]["rt-snippets"]["generated"] = 4
    (complete.run_dir / "record.json").write_text(json.dumps(record))
    (killed.run_dir / "record.json").unlink()
    (killed.run_dir / "checkpoints").mkdir()
    (killed.run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    with ResultsDB(tmp_path / "results.sqlite") as db:
        actions = [a for _, a in st.plan(s, tmp_path, db)]
    assert actions == ["ingest", "train", "resume"]
