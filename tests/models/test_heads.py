"""Task heads: found by structure, untied, saved and loaded strictly."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loralab.errors import UserError
from loralab.lora.targets import head_module_names
from loralab.models.heads import (
    head_parameters,
    head_state,
    is_head_tied,
    load_head_file,
    load_head_state,
    task_head_modules,
    untie_head,
)


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
