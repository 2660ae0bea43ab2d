"""Drop-in Mlp and Block vs timm's: constructor signatures, state_dicts both ways, outputs and every gradient after
copying weights, with drop path off and with a fixed drop-path mask (same seed), with and without layer scale, in
training and eval; fallbacks; torch.compile; a timm VisionTransformer built with block_fn."""

import inspect

import pytest
import timm
import torch
from timm.layers import Mlp as TimmMlp
from timm.models.vision_transformer import Block as TimmBlock

from deit_fast.layers import Attention, Block, LayerNorm, Mlp


def test_signatures_match_timm():
    """Mlp and Block take every timm argument with timm's defaults, except the Block's default layer classes, which
    are deit_fast's."""
    for ours, theirs, differ in ((Mlp, TimmMlp, ()), (Block, TimmBlock, ("norm_layer", "mlp_layer", "attn_layer"))):
        p_ours = inspect.signature(ours.__init__).parameters
        for name, param in inspect.signature(theirs.__init__).parameters.items():
            assert name in p_ours, name
            if name not in differ:
                assert p_ours[name].default == param.default, name
    block = Block(192, 3)
    assert isinstance(block.norm1, LayerNorm) and isinstance(block.attn, Attention) and isinstance(block.mlp, Mlp)


def copy_pair(init_values=None, drop_path=0.0, dim=64, heads=2, **kwargs):
    torch.manual_seed(1)
    theirs = TimmBlock(dim, heads, qkv_bias=True, init_values=init_values, drop_path=drop_path, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = Block(dim, heads, qkv_bias=True, init_values=init_values, drop_path=drop_path, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    TimmBlock(dim, heads, qkv_bias=True, init_values=init_values, drop_path=drop_path,
              **kwargs).load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return ours, theirs


def run_pair(ours, theirs, x, seed=7):
    outs, grads = [], []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)  # the same drop-path mask in both
        out = m(xi)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(3))
        out.backward(g)
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
        m.zero_grad()
    return outs, grads


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("init_values", [None, 0.1], ids=["no_ls", "layer_scale"])
@pytest.mark.parametrize("drop_path", [0.0, 0.5], ids=["dp0", "dp0.5"])
def test_block_matches_timm(backend, training, init_values, drop_path, use_backend):
    """Outputs, input gradient and every parameter gradient equal timm's Block with the same weights and seed."""
    use_backend(backend)
    ours, theirs = copy_pair(init_values=init_values, drop_path=drop_path)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(4, 11, 64)
    (out_ours, out_theirs), (g_ours, g_theirs) = run_pair(ours, theirs, x)
    torch.testing.assert_close(out_ours, out_theirs, atol=2e-5, rtol=1e-5)
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_block_drop_path_mask_is_timms():
    """In training with drop path, each sample's branches are dropped (zero) or scaled by 1/keep with timm's draws
    (bernoulli(keep) on a (B, 1, 1) tensor, attention branch first): the output equals that formula written out."""
    ours, _ = copy_pair(drop_path=0.5)
    x = torch.randn(16, 5, 64)
    torch.manual_seed(11)
    masks = [torch.empty(16, 1, 1).bernoulli_(0.5) / 0.5 for _ in range(2)]
    assert all(0 < (m == 0).sum() < 16 for m in masks)
    with torch.no_grad():
        ours.eval()
        x1 = x + masks[0] * ours.attn(ours.norm1(x))
        expected = x1 + masks[1] * ours.mlp(ours.norm2(x1))
        ours.train()
        torch.manual_seed(11)
        out = ours(x)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_block_falls_back_for_unfused_mlp(caplog):
    """A tanh GELU (not what the fused op computes) runs timm's forward and says so; results still match timm."""
    act = lambda: torch.nn.GELU(approximate="tanh")  # noqa: E731
    ours, theirs = copy_pair(act_layer=act)
    assert "exact-erf" in ours.unfusable_reason()
    x = torch.randn(2, 7, 64)
    (a, b), _ = run_pair(ours, theirs, x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mlp_module_matches_timm(backend, use_backend):
    """deit_fast Mlp loads timm Mlp's state_dict (both ways) and matches its output and gradients; bias=False too."""
    use_backend(backend)
    for bias in (True, False):
        theirs = TimmMlp(40, 100, out_features=24, bias=bias)
        ours = Mlp(40, 100, out_features=24, bias=bias)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(3, 9, 40)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = ours(x1), theirs(x2)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_torch_compile_fullgraph(backend, use_backend):
    """torch.compile(fullgraph=True) of a training Block with layer scale and drop path matches eager."""
    use_backend(backend)
    torch._dynamo.reset()
    ours, _ = copy_pair(init_values=0.1, drop_path=0.3)
    ours.train()
    x = torch.randn(2, 13, 64, requires_grad=True)
    torch.manual_seed(5)
    out = ours(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    compiled = torch.compile(ours, fullgraph=True)
    torch.manual_seed(5)
    out_c = compiled(x)
    (g_c,) = torch.autograd.grad(out_c.sum(), x)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_in_timm_deit(backend, use_backend):
    """timm's DeiT built with block_fn=deit_fast Block (timm's own norm and mlp classes passed through) loads the
    stock weights strictly and matches its logits and input gradient, in training with drop path too."""
    use_backend(backend)
    kwargs = dict(depth=2, img_size=32, patch_size=8, num_classes=10, drop_path_rate=0.2)
    stock = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **kwargs)
    fused = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, block_fn=Block, **kwargs)
    assert isinstance(fused.blocks[1], Block) and fused.blocks[1].unfusable_reason() is None
    fused.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    for training in (False, True):
        fused.train(training)
        stock.train(training)
        outs = []
        for m in (fused, stock):
            xi = x.clone().requires_grad_()
            torch.manual_seed(2)
            out = m(xi)
            out = torch.cat(out, -1) if isinstance(out, tuple) else out
            out.sum().backward()
            outs.append((out, xi.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(outs[0][1], outs[1][1], atol=2e-5, rtol=1e-4)
