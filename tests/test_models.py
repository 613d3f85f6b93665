"""Model loading: bundled names, local folders, heads, untying, offline hub ids."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from loralab import bundled
from loralab.errors import UserError
from loralab.models import (LoadedModel, hub_offline, is_head_tied, load_model, load_tokenizer,
                            task_head, untie_head)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_untie_head_separates_head_from_embeddings(make):
    model = make()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert is_head_tied(model)
    before = emb.weight.detach().clone()
    assert untie_head(model) is True
    assert not is_head_tied(model) and not untie_head(model)
    torch.testing.assert_close(head.weight, emb.weight)  # same values, own storage
    assert head.weight.data_ptr() != emb.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    # Training the head only must leave the embeddings untouched.
    emb.weight.requires_grad_(False)
    opt = torch.optim.SGD([head.weight], lr=1.0)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(emb.weight, before) and not torch.equal(head.weight, before)


def test_task_head_finds_each_kind():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    bert = tiny_bert(num_labels=3)
    assert task_head(bert) is bert.classifier
    llama = tiny_llama()
    assert task_head(llama) is llama.lm_head
    cls = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=4))
    assert task_head(cls) is cls.score and cls.score.out_features == 4


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
    assert task_head(lm.model).out_features == 3
    assert any("new classification head" in n for n in lm.notes)
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
    assert task_head(lm.model) is lm.model.score and lm.model.score.weight.shape == (2, 576)
    batch = lm.tokenizer(["a fine film", "not good at all, really"], padding=True,
                         return_tensors="pt")
    with torch.no_grad():
        padded = lm.model(**batch).logits
        alone = lm.model(**lm.tokenizer(["a fine film"], return_tensors="pt")).logits
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-4, atol=1e-4)
