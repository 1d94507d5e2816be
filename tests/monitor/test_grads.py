import pytest
import torch
from torch import nn

from sslrun.backbones.resnet import ResNet
from sslrun.backbones.small_cnn import SmallCNN
from sslrun.backbones.vit import VisionTransformer
from sslrun.methods.simsiam import SimSiam
from sslrun.monitor.grads import LayerGrads, layer_names


def tiny_vit(**kw) -> VisionTransformer:
    return VisionTransformer(image_size=8, patch_size=4, in_channels=1, embed_dim=16, depth=3, num_heads=2, **kw)


def layers(backbone: nn.Module, depth="auto") -> list[str]:
    method = SimSiam(backbone, 16, 16, 8)
    return list(dict.fromkeys(n for n, _ in layer_names(method, backbone, depth)))


def test_layers_are_the_blocks_of_each_backbone():
    heads = ["projector", "predictor"]
    assert layers(SmallCNN(1, 4, 8)) == ["backbone.conv1", "backbone.conv2", "backbone.conv3", "backbone.fc", *heads]
    # ResNet's single wrapper (net) is looked through; its stages are the layers.
    assert layers(ResNet("resnet18", 1, 32)) == ["backbone.net.conv1", "backbone.net.bn1", "backbone.net.layer1",
                                                 "backbone.net.layer2", "backbone.net.layer3", "backbone.net.layer4",
                                                 *heads]
    # A ModuleList's items are layers of their own; a frozen patch projection has no gradient to report.
    assert layers(tiny_vit(frozen_patch_embed=True)) == ["backbone.cls_token", "backbone.blocks.0", "backbone.blocks.1",
                                                         "backbone.blocks.2", "backbone.norm", *heads]
    assert layers(tiny_vit())[:2] == ["backbone.cls_token", "backbone.patch_embed"]  # direct parameters first
    assert layers(tiny_vit(), depth=3)[2:4] == ["backbone.blocks.0.norm1", "backbone.blocks.0.attn"]


def test_norms_match_a_naive_per_layer_computation():
    torch.manual_seed(0)
    backbone = SmallCNN(1, 4, 8)
    method = SimSiam(backbone, 16, 16, 8)
    x = torch.randn(6, 1, 12, 12)
    method([x, x.flip(-1)], torch.arange(6))["loss"].backward()
    grads = LayerGrads(method, backbone)
    stats = grads()
    named = layer_names(method, backbone)
    n = len(grads)
    for j, layer in enumerate(grads.layers):
        g = [p.grad.flatten() for name, p in named if name == layer]
        assert stats.flat[3 + j].item() == pytest.approx(torch.cat(g).norm().item(), rel=1e-5)
        assert stats.linf[j].item() == pytest.approx(torch.cat(g).abs().max().item(), rel=1e-6)
    every = torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None])
    assert stats.flat[0].item() == pytest.approx(every.norm().item(), rel=1e-5)
    first = torch.cat([p.grad.flatten() for p in backbone.conv1.parameters()]).abs().max()
    last = torch.cat([p.grad.flatten() for p in backbone.fc.parameters()]).abs().max()
    assert stats.flat[1:3].tolist() == pytest.approx([first.item(), last.item()])
    assert stats.flat.shape == (3 + 2 * n,)


def test_scale_multiplies_each_layer_and_missing_grads_are_zero():
    backbone = SmallCNN(1, 4, 8)
    method = SimSiam(backbone, 16, 16, 8)
    x = torch.randn(6, 1, 12, 12)
    method([x, x.flip(-1)], torch.arange(6))["loss"].backward()
    grads = LayerGrads(method, backbone)
    before = grads().linf.clone()
    scale = torch.arange(1, len(grads) + 1, dtype=torch.float32)
    grads.scale_(scale)
    assert torch.allclose(grads().linf, before * scale)
    method.predictor.zero_grad(set_to_none=True)  # a layer without gradients this step
    stats = grads()
    assert stats.linf[grads.layers.index("predictor")].item() == 0.0
    assert stats.linf[grads.layers.index("projector")].item() > 0
