"""deit_fast.create_model / patch / unpatch vs timm: state_dict keys for every DeiT variant, checkpoints both ways,
whole-model parity forward and backward (reference path and the Triton kernels under the interpreter, distilled or
not, 224 and 384 px), architecture kwargs, uint8 input, torch.compile without graph breaks, bad input."""

import warnings

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import deit_fast
from deit_fast.layers import Attention, Block, LayerNorm, PatchEmbed
from deit_fast.models import DEIT_MODELS, VisionTransformer, VisionTransformerDistilled
from deit_fast.ops import normalize_uint8


@pytest.mark.parametrize("name", DEIT_MODELS)
def test_state_dict_keys_match_timm(name):
    """Every DeiT variant has timm's state_dict keys and shapes; DeiT-style {'model': sd} checkpoints load strictly
    both ways."""
    ours = deit_fast.create_model(name)
    theirs = timm.create_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    checkpoint = {"model": theirs.state_dict()}
    ours.load_state_dict(checkpoint["model"], strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert isinstance(ours, VisionTransformerDistilled if "distilled" in name else VisionTransformer)
    assert isinstance(ours.blocks[0], Block) and isinstance(ours.blocks[0].attn, Attention)
    assert isinstance(ours.patch_embed, PatchEmbed) and isinstance(ours.norm, LayerNorm)


def run(model, x, seed=0):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(x.is_floating_point())
    out = model(x)
    flat = torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)
    flat.backward(torch.linspace(-1, 1, flat.numel()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, x.grad, grads


def assert_same(a, b, atol, rtol):
    out_a, x_a, g_a = a
    out_b, x_b, g_b = b
    if isinstance(out_a, tuple):
        assert isinstance(out_b, tuple) and len(out_a) == len(out_b)
        for p, q in zip(out_a, out_b, strict=True):
            torch.testing.assert_close(p, q, atol=atol, rtol=rtol)
    else:
        torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    if x_a is not None:
        torch.testing.assert_close(x_a, x_b, atol=atol, rtol=rtol)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=atol * 10, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def pair(name, **kwargs):
    theirs = timm.create_model(name, **kwargs)
    ours = deit_fast.create_model(name, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():  # untrained-looking tokens and positions would hide indexing mistakes
        for model in (theirs, ours):
            torch.manual_seed(3)
            for p in (model.pos_embed, model.cls_token, getattr(model, "dist_token", None)):
                if p is not None:
                    p.normal_(0, 0.2)
    return ours, theirs


PARITY = [("reference", "deit_tiny_patch16_224", 224), ("reference", "deit_tiny_distilled_patch16_224", 384),
          ("triton", "deit_tiny_patch16_224", 224), ("triton", "deit_tiny_distilled_patch16_224", 224),
          ("triton", "deit_tiny_distilled_patch16_224", 384)]


@pytest.mark.parametrize("backend, name, size", PARITY)
def test_whole_model_parity(backend, name, size, use_backend):
    """create_model vs timm with the same weights: logits (both heads in distilled training), input and every
    parameter gradient, eval and training with drop path."""
    use_backend(backend)
    ours, theirs = pair(name, depth=2, img_size=size, num_classes=10, drop_path_rate=0.3)
    x = torch.randn(2 if size == 224 else 1, 3, size, size)
    for training in (False, True):
        for model in (ours, theirs):
            model.train(training)
            if hasattr(model, "distilled_training"):
                model.distilled_training = training
        assert_same(run(ours, x), run(theirs, x), atol=2e-5, rtol=1e-4)


ARCH_KWARGS = {
    "no_embed_class": dict(no_embed_class=True),
    "reg_tokens": dict(reg_tokens=2),
    "layer_scale_qk_norm": dict(init_values=1e-1, qk_norm=True),
    "avg_pool_no_cls": dict(class_token=False, global_pool="avg"),
    "dynamic_img_size": dict(dynamic_img_size=True),
    "no_pos_embed": dict(pos_embed="none"),
    "pre_norm_fc_norm": dict(pre_norm=True, global_pool="avg", fc_norm=True),
}


@pytest.mark.parametrize("kwargs", list(ARCH_KWARGS.values()), ids=list(ARCH_KWARGS))
def test_architecture_kwargs(kwargs, use_backend):
    """timm kwargs that change the architecture build the same model as timm's and give its outputs and gradients."""
    use_backend("reference")
    ours, theirs = pair("deit_small_patch16_224", depth=2, img_size=64, num_classes=7, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    assert_same(run(ours, x), run(theirs, x), atol=2e-5, rtol=1e-4)
    if kwargs.get("dynamic_img_size"):
        x = torch.randn(2, 3, 96, 80)  # another size: position embedding resampled as timm does
        assert_same(run(ours, x), run(theirs, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["vit_base_patch16_clip_224", "vit_base_patch16_rpn_224", "vit_base_patch16_xp_224",
                                  "vit_base_mci_224"])
def test_entry_points_keep_their_own_layers(name, use_backend):
    """Entry points that pick other layers (CLIP's LayerNorm with eps 1e-5, a ResPostBlock, bias-free norms, a conv
    stem) keep them: the same module kinds and norm eps as timm's model, and its outputs and gradients."""
    use_backend("reference")
    ours, theirs = pair(name, depth=2)
    assert [type(m).__name__ for m in ours.modules()] == [type(m).__name__ for m in theirs.modules()]
    assert [m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)] == [
        m.eps for m in theirs.modules() if isinstance(m, torch.nn.LayerNorm)]
    x = torch.randn(1, 3, *theirs.patch_embed.img_size)
    assert_same(run(ours, x), run(theirs, x), atol=2e-5, rtol=1e-4)


def test_uint8_input(use_backend):
    """A uint8 (B, H, W, 3) batch gives the logits of the same batch normalized with the model's mean/std."""
    use_backend("triton")
    model = deit_fast.create_model("deit_tiny_patch16_224", depth=1, img_size=32, patch_size=16).eval()
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(normalize_uint8(images, IMAGENET_DEFAULT_MEAN,
                                                                         IMAGENET_DEFAULT_STD)),
                                   atol=1e-5, rtol=1e-5)


def test_patch_unpatch_round_trip():
    """patch converts a timm model in place (same parameter objects, state_dict, dtype) and gives the same outputs;
    unpatch restores every original class."""
    theirs = timm.create_model("deit_tiny_distilled_patch16_224", depth=2, img_size=64, num_classes=5)
    reference = timm.create_model("deit_tiny_distilled_patch16_224", depth=2, img_size=64, num_classes=5)
    reference.load_state_dict(theirs.state_dict())
    classes = {n: type(m) for n, m in theirs.named_modules()}
    params = {n: p for n, p in theirs.named_parameters()}
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched = deit_fast.patch(theirs)
    assert patched is theirs and isinstance(theirs, VisionTransformerDistilled)
    assert isinstance(theirs.blocks[1], Block) and isinstance(theirs.patch_embed, PatchEmbed)
    assert all(p is params[n] for n, p in theirs.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in theirs.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), reference.eval()(x), atol=2e-5, rtol=1e-4)
    deit_fast.unpatch(theirs)
    assert {n: type(m) for n, m in theirs.named_modules()} == classes
    assert not any("_deit_fast" in k for m in theirs.modules() for k in m.__dict__)


def test_patch_warns_about_what_it_leaves():
    """Modules patch cannot convert or that will run timm's forward (tanh GELU MLP) are listed in one warning."""
    model = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32,
                              act_layer=lambda: torch.nn.GELU(approximate="tanh"))
    with pytest.warns(UserWarning, match=r"blocks\.0 \(runs timm's forward: the activation"):
        deit_fast.patch(model)


def test_patch_keeps_device_and_dtype():
    """A bf16 model stays bf16 after patch (classes change, tensors do not)."""
    model = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32).to(torch.bfloat16)
    deit_fast.patch(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph(backend, use_backend):
    """torch.compile(fullgraph=True) of a patched model has no graph break and gives the eager logits and input
    gradient."""
    use_backend(backend)
    torch._dynamo.reset()
    model = deit_fast.create_model("deit_tiny_distilled_patch16_224", depth=1, img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    out_c = compiled(x)
    (g_c,) = torch.autograd.grad(out_c.sum(), x)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-5)


def test_bad_input():
    """Unknown names, non-ViT models and unknown kwargs get clear errors."""
    with pytest.raises(ValueError, match="unknown model"):
        deit_fast.create_model("deit_giant_patch16_224")
    with pytest.raises(ValueError, match="not a timm VisionTransformer|does not take"):
        deit_fast.create_model("resnet18")
    with pytest.raises(ValueError, match="does not take"):
        deit_fast.create_model("deit_tiny_patch16_224", not_an_argument=3)
    with pytest.raises(TypeError, match="nn.Module"):
        deit_fast.patch("deit_tiny_patch16_224")
