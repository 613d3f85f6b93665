"""Bundled offline assets: cache location, idempotent setup, the real files they hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from loralab import bundled
from loralab.errors import UserError


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path / "c"))
    assert bundled.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(bundled.CACHE_ENV)
    assert bundled.cache_dir() == Path.home() / ".cache" / "loralab"


def test_setup_is_idempotent_and_complete():
    """A second setup finds everything in place and only reports it (no SKIPPED steps)."""
    lines: list[str] = []
    out = bundled.setup(log=lines.append)
    assert out == lines and len(out) == 5
    assert not [line for line in out if "SKIPPED" in line], out
    for line in out:
        assert Path(line.split(": ", 1)[1].split("  (")[0]).exists(), line


def test_model_packages_located_without_import():
    for name, (_, _, module) in bundled.MODEL_PACKAGES.items():
        path = bundled.model_package_dir(name, install=False)
        assert path.is_dir()
        assert module not in sys.modules  # found with find_spec, never imported
    assert (bundled.minilm_dir() / "model.safetensors").exists()
    assert bundled.module_dir("surely_not_a_module_xyz") is None


def test_smollm2_cache_is_plain_safetensors():
    d = bundled.smollm2_dir(build=False)
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config  # reload must not re-quantise
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (d / "model.safetensors").stat().st_size > 400e6  # 134.5M fp32 params


def test_gpt2_tokenizer_is_the_real_one():
    """Token ids of GPT-2's published examples (transformers' GPT2Tokenizer docstring)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled.gpt2_tokenizer_dir(build=False))
    assert len(tok) == 50257 and tok.eos_token == "<|endoftext|>"
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" Hello world")["input_ids"] == [18435, 995]


def test_wiki_leads_file_holds_the_articles():
    data = json.loads(bundled.wiki_leads_file(build=False).read_text(encoding="utf-8"))
    assert len(data) == 10033
    art = next(iter(data.values()))
    assert {"title", "description", "topic", "extract"} <= set(art)


def test_rt_snippets_file_holds_the_sentences():
    lines = [ln for ln in bundled.rt_snippets_file(build=False).read_text(encoding="utf-8")
             .splitlines() if ln.strip()]
    assert len(lines) == 10605
    ratings = [float(ln.split("\t")[1]) for ln in lines]
    assert min(ratings) >= -4 and max(ratings) <= 4


def test_missing_assets_raise_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    for fn in (bundled.smollm2_dir, bundled.gpt2_tokenizer_dir, bundled.wiki_leads_file,
               bundled.rt_snippets_file):
        with pytest.raises(UserError, match="loralab setup"):
            fn(build=False)


def test_publish_dir_keeps_the_winner(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "a").write_text("first")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "a").write_text("second")
    bundled._publish_dir(tmp, final)
    assert (final / "a").read_text() == "first" and not tmp.exists()
    bundled._atomic_bytes(tmp_path / "x" / "f.bin", b"abc")
    assert (tmp_path / "x" / "f.bin").read_bytes() == b"abc"
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["f.bin"]


def test_cli_setup_reports_each_asset(capsys):
    from loralab.cli import main as cli

    assert cli.main(["setup"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "minilm-l6", "gpt2 tokenizer", "wiki-leads", "rt-snippets"):
        assert name in out
    assert len(out.strip().splitlines()) <= 8
