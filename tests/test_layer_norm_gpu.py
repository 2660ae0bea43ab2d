"""LayerNorm family on a CUDA GPU: the Triton and CUDA C++ kernels in bf16/fp16/fp32 against float64 with the ratio
rule, every kernel shape (vector and scalar paths, narrow and wide rows), determinism, dispatch, opcheck, compile."""

import pytest
import torch
from layer_norm_cases import check_against_reference, make_inputs, run_op

from deit_fast import _backend
from deit_fast.ops import add_layer_norm, layer_norm

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# 1..8192, DeiT widths, odd widths (scalar CUDA path), widths that change kernel shape (32 -> 256 threads a row).
WIDTHS = [1, 7, 100, 192, 384, 768, 1000, 1024, 1030, 2048, 4096, 8192]


@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add_ln"])
@pytest.mark.parametrize("rows", [1, 198, 4 * 198 + 5])
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_numerics_gpu(backend, dtype, D, rows, residual, use_backend):
    """Outputs and all gradients vs float64 within the ratio rule (2x outputs, 3x gradients)."""
    use_backend(backend, "cuda")
    check_against_reference(*make_inputs(rows, D, dtype, device="cuda", residual=residual))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_and_strided_inputs(backend, dtype, use_backend):
    """Views starting off a 16-byte boundary (scalar path) and transposed inputs give the float64 answer."""
    use_backend(backend, "cuda")
    D = 384
    buf = torch.randn(198 * D + 1, device="cuda", dtype=dtype)
    x = buf[1:].view(198, D)  # 2 or 4 bytes off alignment
    _, r, w, b = make_inputs(198, D, dtype, device="cuda")
    check_against_reference(x, r, w, b)
    xt = torch.randn(D, 198, device="cuda", dtype=dtype).t()
    check_against_reference(xt, None, w, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_and_bf16_weights(backend, use_backend):
    """Gradients are bit-identical across runs; bf16 weights (pure-bf16 models) work."""
    use_backend(backend, "cuda")
    x, r, w, b = make_inputs(256 * 198, 384, torch.bfloat16, device="cuda")
    grads = []
    for _ in range(2):
        outs, leaves = run_op(x, r, w, b)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        grads.append([leaf.grad.clone() for leaf in leaves])
    for g1, g2 in zip(*grads, strict=True):
        assert torch.equal(g1, g2)
    check_against_reference(x[:500], r[:500], w.bfloat16(), b.bfloat16())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_empty_rows_gpu(backend, use_backend):
    """Zero rows: empty outputs, zero parameter gradients."""
    use_backend(backend, "cuda")
    x = torch.randn(0, 384, device="cuda", requires_grad=True)
    w = torch.randn(384, device="cuda", requires_grad=True)
    y = layer_norm(x, w, None)
    y.sum().backward()
    assert y.shape == (0, 384) and torch.count_nonzero(w.grad) == 0


def test_auto_dispatch_on_gpu(caplog, use_backend):
    """auto picks a fused kernel for DeiT rows and falls back to the reference, logging once, past 8192."""
    use_backend("auto")
    x = torch.randn(4, 384, device="cuda", dtype=torch.bfloat16)
    assert _backend.choose("layer_norm", x, None, None, None, 1e-6)[0] in ("cuda", "triton")
    wide = torch.randn(4, 8200, device="cuda", dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="deit_fast"):
        y = layer_norm(wide, None, None)
        layer_norm(wide, None, None)
    assert sum("runs the PyTorch reference" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(wide, (8200,), eps=1e-6))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck_and_compile_gpu(backend, use_backend):
    """opcheck on CUDA tensors, and torch.compile(fullgraph=True) matches eager."""
    use_backend(backend, "cuda")
    x, r, w, b = make_inputs(198, 384, torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.deit_fast.layer_norm_fwd.default,
                          (x.requires_grad_(), r, w.requires_grad_(), b.requires_grad_(), 1e-6))
    torch._dynamo.reset()

    def f(x, r, w, b):
        s, y = add_layer_norm(x, r, w, b)
        return layer_norm(s + y, w, b)

    out = torch.compile(f, fullgraph=True)(x, r, w, b)
    torch.testing.assert_close(out, f(x, r, w, b))
