import math

import pytest
import torch
import torch.nn.functional as F

from sslrun.backbones.vit import (
    VisionTransformer,
    sincos_pos_embed_2d,
    vit_small,
    vit_tiny,
)


def tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return vit_tiny(**{"depth": 2, **kw})


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_output_is_the_cls_feature(size, channels):
    model = tiny(image_size=size, in_channels=channels, patch_size=4)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 192) and model.feat_dim == 192
    assert model.pos_embed.shape == (1, 1 + (size // 4) ** 2, 192)
    # The final LayerNorm has unit scale and zero shift at init: each feature is standardised.
    torch.testing.assert_close(out.mean(1), torch.zeros(2), atol=1e-5, rtol=0)


def test_sizes_of_the_presets():
    small = vit_small(image_size=32, patch_size=4)
    assert small.feat_dim == 384 and len(small.blocks) == 12 and small.num_heads == 6
    t = vit_tiny(image_size=32, patch_size=4)
    assert t.feat_dim == 192 and len(t.blocks) == 12 and t.num_heads == 3


def test_sincos_values_at_hand_checked_positions():
    # dim 8: dim/4 = 2 frequencies, o = (1, 1/100). Token (r, c) = [sin r, sin r/100, cos r, cos r/100,
    # sin c, sin c/100, cos c, cos c/100]; tokens in raster order on a 2 x 3 grid.
    table = sincos_pos_embed_2d(2, 3, 8)
    assert table.shape == (6, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    r, c = 1.0, 2.0  # token 1 * 3 + 2 = 5
    expected = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
                math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
    torch.testing.assert_close(table[5], torch.tensor(expected))


def test_sincos_embedding_is_fixed_and_the_cls_row_zero():
    model = tiny(image_size=16, patch_size=4)
    assert "pos_embed" not in dict(model.named_parameters())
    torch.testing.assert_close(model.pos_embed[0, 0], torch.zeros(192))
    torch.testing.assert_close(model.pos_embed[0, 1:], sincos_pos_embed_2d(4, 4, 192))


def test_learned_embedding_is_trained():
    model = tiny(image_size=16, patch_size=4, pos_embed="learned")
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.pos_embed.requires_grad and model.pos_embed.grad is not None


def test_frozen_patch_embed_gets_no_gradient_and_stays_unchanged():
    model = tiny(image_size=16, patch_size=4, frozen_patch_embed=True)
    before = model.patch_embed.weight.clone(), model.patch_embed.bias.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(4, 3, 16, 16)).pow(2).sum().backward()
    assert model.patch_embed.weight.grad is None and model.patch_embed.bias.grad is None
    opt.step()
    assert torch.equal(model.patch_embed.weight, before[0]) and torch.equal(model.patch_embed.bias, before[1])
    # The monitors' first layer is then the first block, which does train.
    assert model.first_layer == "blocks.0"
    assert all(p.grad is not None for p in model.get_submodule(model.first_layer).parameters())


def test_patch_projection_init_and_monitored_layers():
    model = tiny(image_size=16, patch_size=4, in_channels=3)
    bound = math.sqrt(6 / (3 * 4 * 4 + 192))  # xavier-uniform over the flattened patch
    assert model.patch_embed.weight.abs().max() <= bound and model.patch_embed.weight.abs().max() > 0.9 * bound
    assert model.patch_embed.weight.requires_grad
    assert model.first_layer == "patch_embed" and model.last_layer == "blocks.1"
    model.get_submodule(model.first_layer), model.get_submodule(model.last_layer)


def test_last_attention_is_the_cls_softmax_row():
    model = tiny(image_size=16, patch_size=4)
    x = torch.randn(2, 3, 16, 16)
    full = model.last_attention(x, include_cls=True)
    assert full.shape == (2, 3, 17)
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 3))
    patches = model.last_attention(x)
    assert patches.shape == (2, 3, 16)
    torch.testing.assert_close(patches, full[:, :, 1:])
    # The explicit weights reproduce what the fused attention computes for the CLS token.
    tokens = model._tokens(x)
    tokens = model.blocks[0](tokens)
    attn = model.blocks[1].attn
    h = model.blocks[1].norm1(tokens)
    _, _, v = attn._qkv(h)
    fused = F.scaled_dot_product_attention(*attn._qkv(h))[:, :, 0]
    torch.testing.assert_close((full.unsqueeze(2) @ v)[:, :, 0], fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sincos", "learned"])
def test_other_input_sizes_get_their_own_position_embedding(kind):
    model = tiny(image_size=32, patch_size=4, pos_embed=kind)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 192)  # a multi-crop small view: 4 x 4 tokens
    table = model._pos_embed(4, 4)
    assert table.shape == (1, 17, 192)
    if kind == "sincos":
        torch.testing.assert_close(table[0, 1:], sincos_pos_embed_2d(4, 4, 192))


@pytest.mark.parametrize("kw,match", [({"image_size": 30}, "divisible by patch_size"),
                                      ({"pos_embed": "rope"}, "pos_embed"),
                                      ({"embed_dim": 190, "num_heads": 5}, "divisible by 4")])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        VisionTransformer(**{"image_size": 32, "patch_size": 4, "depth": 1, **kw})
