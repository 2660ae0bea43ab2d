"""Patch embedding forward + backward, from the image batch to the token sequence (patches, cls/dist tokens, position
embedding), as a training step needs it (gradients of the projection, bias, tokens and positions; none for the image).

float group (float NCHW images, already normalized): timm (PatchEmbed + VisionTransformerDistilled._pos_embed's cat and
  add, eager), timm_compile (the same under torch.compile, max-autotune-no-cudagraphs on GPU), deit_fast
  (deit_fast.ops.patch_embed), deit_fast_compile.
uint8 group (uint8 NHWC images from the data pipeline): timm_normalize (normalize to float NCHW, then timm's path),
  deit_fast_float_normalize (the same normalization, then deit_fast's float path), deit_fast (normalization fused
  into the GEMM's operand load).
FLOPs: 2 * B * P * C * K forward, twice that for the weight gradient (K = 3 * p * p). Bytes: the image read and the
tokens written (forward), the tokens' gradient read and the image read again (backward).
Presets: GPU, bf16, DeiT-S and DeiT-B at B=256, 224 px, patch 16; CPU, float32, B=2, 64 px (the suite runs
everywhere; CPU figures say nothing about GPU speed).
"""

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed as TimmPatchEmbed

from deit_fast.ops import normalize_uint8, patch_embed

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
if HAS_CUDA:
    DTYPE = torch.bfloat16
    SHAPES = {"deit_small-224": (256, 224, 384), "deit_base-224": (256, 224, 768)}
    COMPILE_MODE = "max-autotune-no-cudagraphs"
else:
    DTYPE = torch.float32
    SHAPES = {"tiny-64": (2, 64, 64)}
    COMPILE_MODE = None
DTYPE_NAME = str(DTYPE).removeprefix("torch.")
PATCH = 16


def setup(B, size, C):
    embed = TimmPatchEmbed(img_size=size, patch_size=PATCH, embed_dim=C).to(DEVICE, DTYPE)
    P = (size // PATCH) ** 2
    pos = torch.nn.Parameter(torch.randn(1, P + 2, C, device=DEVICE, dtype=DTYPE) * 0.02)
    cls = torch.nn.Parameter(torch.randn(1, 1, C, device=DEVICE, dtype=DTYPE) * 0.02)
    dist = torch.nn.Parameter(torch.randn(1, 1, C, device=DEVICE, dtype=DTYPE) * 0.02)
    params = [embed.proj.weight, embed.proj.bias, pos, cls, dist]

    def timm_path(x):
        x = embed(x)
        x = torch.cat((cls.expand(x.shape[0], -1, -1), dist.expand(x.shape[0], -1, -1), x), dim=1)
        return x + pos

    def ours(x, **norm):
        return patch_embed(x, embed.proj.weight, embed.proj.bias, pos, torch.cat([cls, dist], 1).view(2, C), **norm)
    return params, timm_path, ours


def _step(forward, images, params):
    grad = None

    def step():
        nonlocal grad
        out = forward(images)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        for p in params:
            p.grad = None
    return step


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, mode=COMPILE_MODE)


def _record(run_benchmark, step, B, size, C, image_bytes, provider, shape, mode):
    P = (size // PATCH) ** 2
    K = 3 * PATCH * PATCH
    token_bytes = B * (P + 2) * C * torch.finfo(DTYPE).bits // 8
    run_benchmark(step, 2 * image_bytes + 2 * token_bytes, flops=6 * B * P * C * K, provider=provider,
                  backend=provider, op="patch_embed", mode=mode, dtype=DTYPE_NAME, shape=shape)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["timm", "timm_compile", "deit_fast", "deit_fast_compile"])
def bench_patch_embed_float(provider, shape, run_benchmark, benchmark):
    B, size, C = SHAPES[shape]
    benchmark.group = f"patch_embed-fwdbwd-{DTYPE_NAME}-float-{shape}"
    params, timm_path, ours = setup(B, size, C)
    forward = timm_path if provider.startswith("timm") else ours
    if provider.endswith("_compile"):
        forward = _compiled(forward)
    images = torch.randn(B, 3, size, size, device=DEVICE, dtype=DTYPE)
    _record(run_benchmark, _step(forward, images, params), B, size, C, images.numel() * images.element_size(),
            provider, shape, "fwdbwd")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["timm_normalize", "deit_fast_float_normalize", "deit_fast"])
def bench_patch_embed_uint8(provider, shape, run_benchmark, benchmark):
    B, size, C = SHAPES[shape]
    benchmark.group = f"patch_embed-fwdbwd-uint8-{DTYPE_NAME}-uint8-{shape}"
    params, timm_path, ours = setup(B, size, C)
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if provider == "deit_fast":
        def forward(u):
            return ours(u, mean=mean, std=std)
    else:
        inner = timm_path if provider == "timm_normalize" else ours

        def forward(u):
            return inner(normalize_uint8(u, mean, std, DTYPE))
    images = torch.randint(0, 256, (B, size, size, 3), device=DEVICE, dtype=torch.uint8)
    _record(run_benchmark, _step(forward, images, params), B, size, C, images.numel(), provider, shape,
            "fwdbwd-uint8")
