"""The command line people expect (issue 22): --version, env, studies, compare overrides and
--dry-run, train --help / unknown options, run directories, grouped targets, progress."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from loralab.study import runner as st
from loralab.cli.main import build_parser, main
from loralab.errors import UserError


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loralab", *args], capture_output=True,
                          text=True, timeout=300, check=False, **kw)


# ----------------------------------------------------------------------------- --version, env
def test_version_is_the_installed_distribution_version():
    done = _run("--version")
    assert done.returncode == 0, done.stderr
    import loralab

    assert done.stdout.strip() == f"loralab {loralab.__version__}"
    assert loralab.__version__ == metadata.version("loralab")


def test_env_reports_versions_device_bf16_allocator_and_caches(monkeypatch, tmp_path, capsys):
    from loralab.kernels import hostmem
    from loralab.costs.measure import native_bf16

    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for lib in ("torch", "transformers", "peft"):
        assert info[lib] == metadata.version(lib)
    assert info["loralab"] == metadata.version("loralab")
    assert info["device"] in ("cpu", "cuda")
    assert info["native_bf16"] == native_bf16(info["device"])
    assert info["precision_auto"] == ("bf16" if info["native_bf16"] else "fp32")
    assert info["allocator"] == hostmem.allocator_in_use()
    assert info["loralab_cache"] == str(tmp_path / "cache")
    assert info["hf_hub_cache"] and info["hf_datasets_cache"]
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for key in ("loralab", "torch", "transformers", "peft", "device", "native_bf16",
                "allocator", "loralab_cache", "hf_hub_cache"):
        assert any(line.split()[0] == key for line in text.splitlines()), key


# ----------------------------------------------------------------------------- studies
def test_studies_lists_every_bundled_study_on_one_line_each(capsys):
    assert main(["studies"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    bundled = st.bundled_studies()
    assert [line.split()[0] for line in lines] == sorted(bundled)
    for line in lines:
        desc = line.split(None, 1)[1]
        assert len(desc) <= 100 and desc.strip()
    # the description comes from the study's `description:` key when it has one
    raw = yaml.safe_load(bundled["default"].read_text())
    first = next(line for line in lines if line.split()[0] == "default").split(None, 1)[1]
    assert " ".join(str(raw["description"]).split()).startswith(first.rstrip(".").rstrip())


def test_studies_description_falls_back_to_the_leading_comment(tmp_path):
    from loralab.cli.studies import description

    path = tmp_path / "s.yaml"
    path.write_text("# Study 9: GPT-2 on a thing. Needs the hub.\n# more\nname: s\n")
    assert description(path) == "Study 9: GPT-2 on a thing."


def test_studies_show_and_copy(tmp_path, capsys):
    path = st.bundled_studies()["quant-offline"]
    assert main(["studies", "show", "quant-offline"]) == 0
    assert capsys.readouterr().out == path.read_text()
    dest = tmp_path / "mine.yaml"
    assert main(["studies", "copy", "quant-offline", str(dest)]) == 0
    # the copy is renamed after its file, so its results never land in the bundled study's
    # output folder (OUT/quant-offline); everything else is the bundled text
    assert dest.read_text() == path.read_text().replace("name: quant-offline\n", "name: mine\n")
    assert st.load_study(dest).name == "mine"
    assert "renamed to 'mine'" in capsys.readouterr().out
    assert main(["studies", "copy", "quant-offline", str(dest)]) == 2   # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["studies", "copy", "default", str(tmp_path)]) == 0     # into a directory
    assert (tmp_path / "default.yaml").is_file()
    assert st.load_study(tmp_path / "default.yaml").name == "default"  # same stem: kept
    assert main(["studies", "show", "no-such-study"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bundled study named 'no-such-study'" in err[0]


# ----------------------------------------------------------------------------- overrides
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
    from test_study import fake_run_fn

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


# ----------------------------------------------------------------------------- train --help
def test_ast_read_defaults_equal_train_config_defaults():
    from loralab.cli.help import train_config_fields
    from loralab.training.config import TrainConfig

    fields = train_config_fields()
    for f in dataclasses.fields(TrainConfig):
        assert f.name in fields, f.name
        assert fields[f.name][0] == f.default, f.name
        assert fields[f.name][1], f"{f.name} has no docstring"


def test_train_help_shows_every_option_with_help_and_default():
    from loralab.training.config import TrainConfig

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for action in train._actions:
        if not action.option_strings or action.dest == "help" or action.help == "==SUPPRESS==":
            continue  # hidden options (kept for old scripts) are not shown at all
        assert action.help and "default" in action.help.lower(), action.option_strings
        if action.dest in defaults:
            shown = defaults[action.dest]
            shown = ("on" if shown else "off") if isinstance(shown, bool) else \
                "none" if shown in (None, ()) else ",".join(shown) if isinstance(shown, tuple) \
                else str(shown)
            assert action.help.endswith(f"(default: {shown})"), (action.dest, action.help)
    done = _run("train", "--help")
    assert done.returncode == 0
    options = done.stdout.split("\noptions:", 1)[1]
    assert "(default: 8)" in options.split("--rank RANK", 1)[1].split("--alpha", 1)[0]


def test_unknown_option_shows_the_subcommands_usage():
    done = _run("train", "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: loralab train")
    assert done.stderr.strip().splitlines()[-1] == \
        "loralab train: error: unrecognized arguments: --bogus"
    done = _run("runs", "--bogus")
    assert "usage: loralab runs" in done.stderr and "loralab runs: error" in done.stderr


# ----------------------------------------------------------------------------- run directories
@pytest.mark.parametrize("command", ["eval", "merge", "generate"])
def test_run_directory_is_taken_the_same_way_everywhere(command, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    extra = ["--out", str(tmp_path / "merged")] if command == "merge" else []
    for argv in ([command, missing, *extra], [command, "--run", missing, *extra]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "nope" in err[0] and "not found" in err[0], err
    assert main([command, missing, "--run", str(tmp_path / "other"), *extra]) == 2
    assert "two run directories" in capsys.readouterr().err
    if command != "eval":  # eval also takes --model instead of a run
        assert main([command, *extra]) == 2
        assert "needs a run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- targets
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random LLaMA (tied head, as SmolLM2) with the bundled GPT-2 tokenizer, and a small
    text corpus for one training step."""
    from conftest import save_tiny_llama_inputs

    return save_tiny_llama_inputs(tmp_path_factory.mktemp("tiny-targets"), 32,
                                  "the river city runs past old bridge town boats water".split())


def test_targets_groups_by_module_kind_and_all_lists_every_module(tiny_llama_dir, capsys):
    model = str(tiny_llama_dir / "llama")
    assert main(["targets", model, "--preset", "attn-proj-ffn", "--rank", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    body = [line.split() for line in lines[2:] if line.startswith("model.")]
    kinds = [r[0] for r in body]
    assert kinds == [f"model.layers.*.{m}" for m in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert all(r[2] == "2" for r in body)  # two layers each
    # q: 32 -> 32, rank 4: 4 (32 + 32) per layer, two layers
    assert body[0][3:6] == ["32", "x", "32"] and body[0][-1] == f"{2 * 4 * 64:,}"
    assert main(["targets", model, "--preset", "attn-proj-ffn", "--rank", "4", "--all"]) == 0
    full = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model.")]
    assert len(full) == 14 and full[0].split()[0] == "model.layers.0.self_attn.q_proj"


@pytest.mark.slow
def test_targets_percentage_counts_what_a_run_records(tiny_llama_dir, tmp_path, capsys):
    """The old count divided the LoRA parameters by the base model's alone; a run's record
    divides its trainable parameters by all of them, LoRA factors included."""
    from loralab.training.config import make_config
    from loralab.training.loop import train

    model = str(tiny_llama_dir / "llama")
    assert main(["targets", model, "--preset", "attn", "--rank", "4", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    record = train(make_config({
        "model": model, "task": "lm", "data": str(tiny_llama_dir / "text.txt"),
        "method": "lora", "preset": "attn", "rank": 4, "max_steps": 1, "batch_size": 2,
        "seq_len": 16, "out": str(tmp_path / "run"), "compile": "off",
        "eval_max_examples": 2}))
    costs = record["costs"]
    assert shown["trainable_params"] == costs["trainable_params"] == shown["lora_params"]
    assert shown["total_params"] == costs["total_params"]
    assert shown["trainable_pct"] == pytest.approx(costs["trainable_pct"], rel=1e-12)


# ----------------------------------------------------------------------------- progress
def test_decoding_and_scoring_show_plain_progress_lines_off_a_terminal(capsys):
    from conftest import tiny_gpt2

    from loralab.scoring.decode import DecodeConfig, generate_ids
    from loralab.scoring.e2e import score_e2e

    prompts = [[1, 2, 3]] * 5
    generate_ids(tiny_gpt2(), prompts, config=DecodeConfig(num_beams=1, max_new_tokens=2),
                 batch_size=2, progress="decoding, test")
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("decoding, test: 5/5 prompts in ")
    assert any(line.startswith("decoding, test: 2/5 prompts,") for line in err)
    generate_ids(tiny_gpt2(), prompts, config=DecodeConfig(num_beams=1, max_new_tokens=2))
    assert capsys.readouterr().err == ""  # silent without a label
    score_e2e([["a cat sat"], ["a dog ran"]], ["a cat sat", "the dog"], java=False,
              progress="scoring")
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("scoring: 4/4 metric groups in ")


def test_study_progress_counts_runs_to_do(tmp_path, capsys):
    from test_study import BASE, fake_run_fn

    spec = st.parse_study(BASE)
    st.run_study(spec, tmp_path, run_fn=fake_run_fn([]), progress=lambda m: None, bar=True)
    err = capsys.readouterr().err.splitlines()
    n = len(spec.strategies)
    assert [line.split(",")[0] for line in err[:-1]] == [
        f"study {spec.name}: {i}/{n} runs" for i in range(1, n)]
    assert err[-1].startswith(f"study {spec.name}: {n}/{n} runs in ")


def test_setup_dequantisation_shows_its_steps(monkeypatch, tmp_path, capsys):
    import transformers

    from loralab import bundled

    class Saved:
        config = type("C", (), {})()
        hf_quantizer = None

        def save_pretrained(self, path):
            (Path(path) / "model.safetensors").write_text("x")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: Saved())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saved())
    bundled._dequantise(tmp_path, "m.gguf", tmp_path / "final")
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err[:-1]] == [
        "dequantising m.gguf: 1/3 steps", "dequantising m.gguf: 2/3 steps"]
    assert err[-1].startswith("dequantising m.gguf: 3/3 steps in ")


def test_loralab_eval_shows_evaluation_progress(tiny_llama_dir, capsys):
    assert main(["eval", "--model", str(tiny_llama_dir / "llama"), "--task", "lm",
                 "--data", str(tiny_llama_dir / "text.txt"), "--split", "test",
                 "--seq-len", "16", "--batch-size", "8", "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("test: ")
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("evaluation, test: ") and " batches in " in last
    done, total = last.split(": ", 1)[1].split()[0].split("/")
    assert done == total and int(total) > 0
