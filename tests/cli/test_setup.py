"""`loralab setup`: the dequantisation step shows its progress."""

from __future__ import annotations

from pathlib import Path


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
