"""`loralab env`: what a bug report needs."""

from __future__ import annotations

import json
from importlib import metadata

from loralab.cli.main import main


def test_env_reports_versions_device_bf16_allocator_and_caches(monkeypatch, tmp_path, capsys):
    from loralab.costs.measure import native_bf16
    from loralab.kernels import hostmem

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
