"""Fused patch embedding vs timm's path (Conv2d + flatten + cat + pos add) in float64 with the ratio rule: DeiT-Ti/S/B
widths, patches 16/14/8, 224/384/odd image sizes, batch 1-4, with and without the distillation token and
no_embed_class; uint8 NHWC vs normalize-then-embed; every gradient; custom-op contracts; torch.compile; the
PatchEmbed module and forward_tokens vs timm's modules; bad input."""

import os

import pytest
import timm
import torch
from patch_embed_cases import check, make_params
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed as TimmPatchEmbed

from deit_fast.layers import PatchEmbed
from deit_fast.ops import normalize_uint8, patch_embed

FULL = os.environ.get("DEIT_FAST_FULL_MATRIX", "0") not in ("", "0")
# (B, H, W, patch, C, prefix tokens, no_embed_class)
CASES = [
    (2, 224, 224, 16, 192, 1, False),  # DeiT-Ti
    (1, 224, 224, 16, 384, 2, False),  # DeiT-S distilled
    (1, 208, 80, 16, 64, 2, True),  # odd multiples of 16, DeiT III layout
    (3, 56, 42, 14, 48, 1, False),  # patch 14
    (4, 32, 32, 8, 24, 0, False),  # patch 8, no prefix tokens
]
if FULL:
    CASES += [(1, 384, 384, 16, 384, 1, False), (1, 224, 224, 16, 768, 2, False), (2, 384, 384, 16, 192, 2, True)]
MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-T{c[5]}-nec{int(c[6])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float_nchw(backend, dtype, case, use_backend):
    """Float NCHW images: output and every gradient vs timm's path in float64."""
    use_backend(backend)
    B, H, W, p, C, T, nec = case
    check(torch.randn(B, 3, H, W).to(dtype), make_params(H, W, p, C, T, nec, dtype), nec)


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:4], ids=lambda c: "x".join(map(str, c[:5])) + f"-T{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_uint8_nhwc(backend, dtype, case, use_backend):
    """uint8 NHWC with in-kernel normalization vs normalize-then-embed (timm's mean/std convention)."""
    use_backend(backend)
    B, H, W, p, C, T, nec = case
    images = torch.randint(0, 256, (B, H, W, 3), dtype=torch.uint8)
    check(images, make_params(H, W, p, C, T, nec, dtype), nec, mean=MEAN, std=STD)


def test_uint8_equals_float_path_on_normalized_images(use_backend):
    """The uint8 op equals the float op fed normalize_uint8's image (float32, Triton): the fusion changes nothing."""
    use_backend("triton")
    images = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8)
    params = make_params(32, 48, 16, 40, 2, False, torch.float32)
    a = patch_embed(images, *params, mean=MEAN, std=STD)
    b = patch_embed(normalize_uint8(images, MEAN, STD), *params)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_strided_images(use_backend):
    """Non-contiguous float images (a channels_last tensor, a crop view) give the same tokens as contiguous ones."""
    use_backend("triton")
    base = torch.randn(2, 3, 40, 40)
    params = make_params(32, 32, 16, 24, 1, False, torch.float32)
    for images in (base[:, :, 4:36, 8:40], base[:, :, :32, :32].contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(patch_embed(images, *params), patch_embed(images.contiguous(), *params),
                                   atol=1e-6, rtol=1e-6)


def test_image_grad_flag(use_backend):
    """image_grad=False gives no image gradient even when the image requires one; the default follows
    requires_grad."""
    use_backend("triton")
    images = torch.randn(1, 3, 16, 16, requires_grad=True)
    params = [t.requires_grad_() for t in make_params(16, 16, 8, 8, 1, False, torch.float32)]
    patch_embed(images, *params, image_grad=False).sum().backward()
    assert images.grad is None and params[0].grad is not None
    patch_embed(images, *params).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, use_backend):
    """torch.library.opcheck passes for the forward and backward custom ops, float and uint8."""
    use_backend(backend)
    weight, bias, pos, prefix = make_params(16, 32, 8, 16, 2, False, torch.float32)
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    for images, norm in ((torch.randn(2, 3, 16, 32), (None, None)),
                         (torch.randint(0, 256, (2, 16, 32, 3), dtype=torch.uint8), (scale, shift))):
        args = (images, weight, bias, pos, prefix, *norm, False)
        torch.library.opcheck(torch.ops.deit_fast.patch_embed_fwd.default, args)
        out = torch.ops.deit_fast.patch_embed_fwd(*args)
        torch.library.opcheck(torch.ops.deit_fast.patch_embed_bwd.default,
                              (torch.randn_like(out), images, weight, pos, prefix, *norm, True, False,
                               images.is_floating_point()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, use_backend):
    """torch.compile(fullgraph=True) of the op matches eager, output and parameter gradients."""
    use_backend(backend)
    torch._dynamo.reset()
    params = [t.requires_grad_() for t in make_params(32, 32, 16, 24, 2, False, torch.float32)]
    images = torch.randn(2, 3, 32, 32)

    def fn(images, weight, bias, pos, prefix):
        return patch_embed(images, weight, bias, pos, prefix)

    out = fn(images, *params)
    grads = torch.autograd.grad(out.sum(), params)
    out_c = torch.compile(fn, fullgraph=True)(images, *params)
    grads_c = torch.autograd.grad(out_c.sum(), params)
    torch.testing.assert_close(out_c, out)
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_input():
    """Sizes not divisible by the patch, wrong channel counts, dtypes, layouts and missing normalization name the
    problem."""
    weight, bias, pos, prefix = make_params(32, 32, 16, 8, 1, False, torch.float32)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        patch_embed(torch.randn(1, 3, 30, 32), weight, bias)
    with pytest.raises(ValueError, match="channels"):
        patch_embed(torch.randn(1, 4, 32, 32), weight, bias)
    with pytest.raises(ValueError, match="channels"):  # uint8 given as NCHW: read as NHWC, 32 channels
        patch_embed(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), weight, bias, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="need mean and std"):
        patch_embed(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), weight, bias)
    with pytest.raises(ValueError, match="float NCHW or uint8 NHWC"):
        patch_embed(torch.zeros(1, 3, 32, 32, dtype=torch.int32), weight, bias)
    with pytest.raises(ValueError, match="dtype"):
        patch_embed(torch.randn(1, 3, 32, 32, dtype=torch.float16), weight, bias)
    with pytest.raises(ValueError, match="pos_embed must be"):
        patch_embed(torch.randn(1, 3, 48, 48), weight, bias, pos, prefix)
    with pytest.raises(ValueError, match="std must be positive"):
        patch_embed(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), weight, bias, mean=MEAN, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean/std apply to uint8"):
        patch_embed(torch.randn(1, 3, 32, 32), weight, bias, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="4-D"):
        patch_embed(torch.randn(3, 32, 32), weight, bias)


# ---------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_module_matches_timm(backend, use_backend):
    """PatchEmbed loads timm's state_dict both ways (proj.weight in Conv2d shape) and matches its output and
    gradients; a non-square image with strict_img_size=False and dynamic_img_pad too, and an img_size that is not a
    multiple of the patch (timm's Conv2d drops the remainder)."""
    use_backend(backend)
    for kwargs, size in ((dict(img_size=64, patch_size=16, embed_dim=48), (64, 64)),
                         (dict(img_size=(60, 72), patch_size=16, embed_dim=48), (60, 72)),
                         (dict(img_size=64, patch_size=16, embed_dim=48, strict_img_size=False), (48, 80)),
                         (dict(img_size=64, patch_size=16, embed_dim=48, strict_img_size=False,
                               dynamic_img_pad=True), (50, 70))):
        theirs = TimmPatchEmbed(**kwargs)
        ours = PatchEmbed(**kwargs)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        TimmPatchEmbed(**kwargs).load_state_dict(ours.state_dict(), strict=True)
        assert ours.proj.weight.shape == (48, 3, 16, 16)
        x = torch.randn(2, 3, *size)
        a, b = ours(x), theirs(x)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(ours.proj.weight.grad, theirs.proj.weight.grad, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="strict_img_size"):
        PatchEmbed(img_size=64, patch_size=16, embed_dim=48)(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        PatchEmbed(img_size=64, patch_size=16, embed_dim=48, strict_img_size=False)(torch.randn(1, 3, 50, 64))
    ours = PatchEmbed(img_size=60, patch_size=16, embed_dim=48)
    ours.set_normalization(MEAN, STD)
    images = torch.randint(0, 256, (2, 60, 60, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), ours(normalize_uint8(images, MEAN, STD)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_forward_tokens_matches_vit(name, backend, use_backend):
    """forward_tokens gives VisionTransformer's patch_embed + _pos_embed tokens (cls, dist, positions), at the model's
    size and at another size through timm's position-embedding resampling; uint8 input equals normalized input."""
    use_backend(backend)
    model = timm.create_model(name, pretrained=False, depth=1, img_size=64, dynamic_img_size=True)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.1)
        model.cls_token.normal_(0, 0.1)
    ours = PatchEmbed(img_size=64, patch_size=16, embed_dim=192, strict_img_size=False)
    ours.load_state_dict(model.patch_embed.state_dict())
    prefix = torch.cat([t.view(1, -1) for t in (model.cls_token, getattr(model, "dist_token", None))
                        if t is not None])
    for size in (64, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            expected = model._pos_embed(model.patch_embed(x))
            got = ours.forward_tokens(x, model.pos_embed, prefix)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    ours.set_normalization(MEAN, STD)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_tokens(images, model.pos_embed, prefix),
                                   ours.forward_tokens(normalize_uint8(images, MEAN, STD), model.pos_embed, prefix),
                                   atol=1e-5, rtol=1e-5)
