"""Drop-in layers: same signature, defaults, parameters and state_dict as timm's, same outputs with copied weights."""

import inspect

import pytest
import timm
import torch
from timm.layers import LayerNorm as TimmLayerNorm

from deit_fast.layers import LayerNorm


def test_layer_norm_signature_and_defaults():
    """deit_fast.layers.LayerNorm takes timm's arguments with timm's defaults (eps=1e-6, affine=True)."""
    ours = inspect.signature(LayerNorm.__init__).parameters
    theirs = inspect.signature(TimmLayerNorm.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
    m = LayerNorm(384)
    assert m.eps == 1e-6 and m.weight.shape == (384,) and m.bias.shape == (384,)
    assert LayerNorm(384, affine=False).weight is None
    assert LayerNorm(384, bias=False).bias is None


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_timm(backend, affine, use_backend):
    """state_dicts load both ways; forward and parameter gradients equal timm's LayerNorm."""
    use_backend(backend)
    theirs = TimmLayerNorm(192, affine=affine)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_(1.0, 0.3)
            theirs.bias.normal_(0.0, 0.1)
    ours = LayerNorm(192, affine=affine)
    ours.load_state_dict(theirs.state_dict())
    TimmLayerNorm(192, affine=affine).load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 197, 192)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x1), theirs(x2)
    torch.testing.assert_close(y_ours, y_theirs, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(y_ours)
    y_ours.backward(g)
    y_theirs.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-4, rtol=1e-5)


def test_layer_norm_in_timm_vit():
    """A timm DeiT built with norm_layer=deit_fast LayerNorm loads the stock model's weights and gives its logits."""
    kwargs = dict(depth=2, img_size=64, num_classes=10)
    stock = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    fused = timm.create_model("deit_tiny_patch16_224", pretrained=False, norm_layer=LayerNorm, **kwargs).eval()
    assert isinstance(fused.blocks[0].norm1, LayerNorm) and isinstance(fused.norm, LayerNorm)
    fused.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_layers_in_timm_deit(backend, use_backend):
    """deit_tiny_distilled built with attn_layer/norm_layer from deit_fast loads the stock weights strictly and
    matches its logits and input gradient."""
    from deit_fast.layers import Attention

    use_backend(backend)
    kwargs = dict(depth=2, img_size=64, num_classes=10)
    stock = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **kwargs).eval()
    fused = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, attn_layer=Attention,
                              norm_layer=LayerNorm, **kwargs).eval()
    assert isinstance(fused.blocks[1].attn, Attention)
    fused.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = fused(x1), stock(x2)
    torch.testing.assert_close(out1, out2, atol=2e-5, rtol=1e-4)
    out1.sum().backward()
    out2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=2e-5, rtol=1e-4)
