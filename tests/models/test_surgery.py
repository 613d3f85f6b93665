"""Model surgery without LoRA: replacing a submodule, untying a shared weight, and how a head
leaves out the parameters of modules that carry adapters (by object, through a protocol)."""

from __future__ import annotations

import torch
from torch import nn

from conftest import tiny_llama
from loralab.models.heads import CarriesAdapters, head_parameters
from loralab.models.surgery import set_submodule, untie_weight


def test_set_submodule_replaces_nested_and_top_level_modules():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Linear(3, 2))
    new = nn.Linear(3, 3)
    set_submodule(model, "0.0", new)
    assert model[0][0] is new
    top = nn.Identity()
    set_submodule(model, "1", top)
    assert model[1] is top


def test_untie_weight_copies_only_a_shared_weight():
    torch.manual_seed(0)
    model = tiny_llama()
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is emb.weight
    assert untie_weight(model, head) is True
    assert head.weight is not emb.weight
    torch.testing.assert_close(head.weight, emb.weight)
    assert model.config.tie_word_embeddings is False
    assert untie_weight(model, head) is False  # its own weight now: nothing to copy


class _Adapted(nn.Module):
    """A stand-in for an adapted layer: a frozen base plus two adapter parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 2)
        self.a = nn.Parameter(torch.zeros(1, 4))
        self.b = nn.Parameter(torch.zeros(2, 1))

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.a, self.b


def test_head_parameters_leave_out_adapter_parameters_by_protocol():
    torch.manual_seed(0)
    model = tiny_llama()
    adapted = _Adapted()
    assert isinstance(adapted, CarriesAdapters)
    model.lm_head = adapted
    own = {id(p) for p in head_parameters(model)}
    assert own == {id(adapted.base.weight), id(adapted.base.bias)}
