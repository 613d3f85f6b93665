"""Seeded dropout masks and the `SeededDropout` layer, against their definition and nn.Dropout."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from loralab.lora.dropout import (
    SeededDropout,
    drop_threshold,
    dropout_mask,
    keep_float,
    random_bits,
    seeded_dropout,
    seeded_dropouts,
)


def keep_mask(shape, p, seed, device):
    """The mask by its definition: keep when u + 2^15 >= round(p 2^16), u the 16-bit uniforms."""
    threshold, rescale = drop_threshold(p)
    return random_bits(shape, seed, device).to(torch.int32) + 32768 >= threshold, rescale


def test_keep_mask_rate_rescale_and_seed():
    """The fast 16-bit mask drops p (rounded to 2^-16) of the elements, its rescale makes the
    mean of keep * rescale 1, the same seed gives the same mask and odd sizes work."""
    shape = torch.Size((1001, 577))                      # not a multiple of four elements
    keep, rescale = keep_mask(shape, 0.1, seed=7, device=torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == shape
    dropped = 1.0 - keep.double().mean().item()
    assert abs(dropped - 0.1) < 4 * (0.1 * 0.9 / shape.numel()) ** 0.5   # 4 sigma
    assert rescale == pytest.approx(1 / (1 - 6554 / 65536))
    assert torch.equal(keep, keep_mask(shape, 0.1, 7, torch.device("cpu"))[0])
    assert not torch.equal(keep, keep_mask(shape, 0.1, 8, torch.device("cpu"))[0])
    # each of the four 16-bit lanes of a word is uniform: the drop rate holds per lane
    lanes = keep.flatten()[: shape.numel() // 4 * 4].view(-1, 4).double().mean(0)
    assert torch.allclose(lanes, torch.full((4,), 0.9, dtype=torch.float64), atol=0.01)
    assert keep_mask(shape, 0.0, 1, torch.device("cpu"))[0].all()


def test_keep_float_is_the_boolean_mask_in_the_compute_dtype():
    bits = random_bits(torch.Size((37, 53)), 3, torch.device("cpu"))
    keep, rescale = keep_float(bits, 0.25, torch.float32)
    assert keep.dtype == torch.float32
    assert torch.equal(keep.bool(), keep_mask(bits.shape, 0.25, 3, torch.device("cpu"))[0])
    assert torch.equal(keep * rescale, dropout_mask(bits.shape, 0.25, 3, bits.device,
                                                    torch.float32))
    assert set(keep.unique().tolist()) == {0.0, 1.0}


def test_seeded_dropout_matches_its_mask_and_gradient():
    """y = x * m / P(keep) and dx = dy * m / P(keep) with m from the seed: the naive
    reference through autograd gives the same output and gradient."""
    torch.manual_seed(0)
    x = torch.randn(4, 9, 31, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 9, 31, dtype=torch.float64)
    y = seeded_dropout(x, 0.3, seed=11)
    y.backward(dy)
    mask = dropout_mask(x.shape, 0.3, 11, x.device, torch.float64)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref * mask).backward(dy)
    assert torch.allclose(y, x.detach() * mask, rtol=0, atol=1e-15)
    assert torch.allclose(x.grad, x_ref.grad, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(lambda t: seeded_dropout(t, 0.3, 5),
                                    (torch.randn(3, 7, dtype=torch.float64, requires_grad=True),))


def test_seeded_dropout_layer_behaves_like_nn_dropout():
    """Same p, identity in eval mode and at p = 0, keeps 1 - p of the elements scaled by
    1 / P(keep) in training, and torch.manual_seed fixes its mask."""
    layer = SeededDropout(0.2)
    x = torch.ones(256, 512)
    layer.eval()
    assert layer(x) is x
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    kept = (y != 0).double().mean().item()
    assert abs(kept - 0.8) < 0.01
    assert torch.allclose(y[y != 0], torch.tensor(65536 / (65536 - 13107)))
    torch.manual_seed(1)
    assert torch.equal(layer(x), y)
    assert not torch.equal(layer(x), y)


def test_seeded_dropouts_swaps_every_dropout_and_keeps_the_model():
    """GPT-2's embedding, residual and MLP dropouts are swapped, the train / eval state is
    kept, the state dict is unchanged and eval outputs are bit-identical."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                       n_positions=32))
    model.eval()
    ids = torch.randint(0, 64, (2, 10))
    before = model(ids).logits
    keys = list(model.state_dict())
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    assert seeded_dropouts(model) == len(dropouts) == 1 + 2 * 3   # drop, attn/resid/mlp
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert all(not m.training for m in model.modules() if isinstance(m, SeededDropout))
    assert list(model.state_dict()) == keys
    assert torch.equal(model(ids).logits, before)
    model.train()
    torch.manual_seed(3)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.wte.weight.grad is not None
    with pytest.raises(AssertionError):
        assert torch.equal(model(ids).logits, before)
