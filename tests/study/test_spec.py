"""Study files (loralab.study.spec): strict parsing with file:line errors, bundled studies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loralab import study as st
from loralab.errors import UserError
from study_helpers import BASE


def test_parse_adds_untuned_row_and_shares_the_seed():
    s = st.parse_study(BASE)
    assert [x.name for x in s.strategies] == ["untuned", "head", "lora-r1"]
    assert s.strategies[0].method == "none"
    specs = st.run_matrix(s, Path("/tmp/x"))
    # same data, same order: every strategy of a seed gets that seed and the same budget
    assert {(sp.config["seed"], sp.config["data"], sp.config["batch_size"]) for sp in specs} \
        == {(0, "rt-snippets", 4)}
    assert specs[1].config["lr"] == 1.0e-3 and specs[2].config["rank"] == 1


@pytest.mark.parametrize("text, needle", [
    (BASE.replace("seeds: 1", "seeds: 1\nfoo: 3"), "unknown field 'foo' in the study"),
    (BASE.replace("rank: 1", "rnak: 1"), "unknown field 'rnak' in a strategy; valid fields:"),
    (BASE.replace("seq_len: 32", "seq_len: 32, sequence: 4"), "unknown field 'sequence' in budget"),
    (BASE.replace("method: head}", "method: heads}"), "unknown method 'heads'"),
    (BASE.replace("preset: qv", "preset: qkv"), "unknown preset 'qkv'"),
    (BASE.replace("rank: 1", "rank: 0"), "'rank' must be an integer >= 1"),
    (BASE.replace("task: classify", "task: regress"), "unknown task 'regress'"),
    (BASE.replace("{name: head, method: head}", "{name: head, method: head, rank: 4}"),
     "'rank' only applies to LoRA methods"),
    (BASE.replace("name: lora-r1", "name: head"), "appears twice"),
    (BASE.replace("model: minilm-l6\n", ""), "missing field 'model'"),
    (BASE.replace("max_steps: 2", "max_steps: 2, epochs: 1"), "both 'epochs' and 'max_steps'"),
])
def test_validation_errors_name_the_problem(text, needle):
    with pytest.raises(UserError) as info:
        st.parse_study(text, source="s.yaml")
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg and msg.startswith("s.yaml")


def test_unknown_field_error_has_the_line():
    text = BASE.replace("rank: 1", "rnak: 1")
    with pytest.raises(UserError, match=r"^s\.yaml:10: unknown field 'rnak'"):
        st.parse_study(text, source="s.yaml")


def test_yaml_syntax_error_has_the_line():
    text = BASE.replace("seeds: 1", "seeds: [1, 2")
    with pytest.raises(UserError, match=r"^s\.yaml:\d+: not valid YAML"):
        st.parse_study(text, source="s.yaml")


def test_cli_bad_study_exits_2_with_one_line_no_traceback(tmp_path):
    """A real process: exit code 2, one line on stderr naming the file, no traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\nmodel: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "loralab", "compare", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "not valid YAML" in err and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needle", [
    (["compare", "{bad}"], "unknown field 'bogus_field' in the study; valid fields: name,"),
    (["compare", "{missing}"], "study file not found"),
    (["generate", "--run", "{missing}"], "run directory not found"),
    (["merge", "--run", "{missing}", "--out", "{missing}-merged"], "run directory not found"),
    (["report", "{missing}"], "no results database"),
    (["runs", "{missing}"], "no results database"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    from loralab.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "bogus_field: 1\n")
    argv = [a.format(bad=bad, missing=tmp_path / "nope") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_bundled_studies_parse():
    bundled = st.bundled_studies()
    assert "default" in bundled
    for name, path in bundled.items():
        s = st.load_study(path)
        assert any(x.method == "none" for x in s.strategies), name
    pytest.importorskip("loralab.training.loop")
    for path in bundled.values():  # every setting is a TrainConfig field
        st.check_configs(st.load_study(path), Path("/tmp/unused"))
    repo_copy = Path(__file__).resolve().parents[2] / "studies" / "default.yaml"
    assert repo_copy.read_text() == bundled["default"].read_text()
    assert st.resolve_study_path(None) == bundled["default"]


def test_default_study_shape():
    s = st.load_study(st.resolve_study_path(None))
    assert s.model == "smollm2-135m" and s.data == "wiki-leads"
    assert [x.method for x in s.strategies] == ["none", "full"] + ["lora"] * 4
    assert [x.preset for x in s.strategies[2:]] == ["attn", "attn-proj", "attn-proj-ffn", "all"]
    assert [e.data for e in s.eval] == ["wiki-leads", "wiki-lambada"]


def test_study_precision_must_be_auto_fp32_or_bf16():
    with pytest.raises(UserError, match=r"<study>:6: unknown precision 'fp16' in budget; use "
                                        "auto, fp32, bf16"):
        st.parse_study(BASE.replace("lr: 1.0e-3}", "lr: 1.0e-3, precision: fp16}"))
