"""LayerNorm family: numerics of every backend against float64, custom-op contracts, torch.compile, bad input."""

import pytest
import torch
from layer_norm_cases import check_against_reference, make_inputs, run_op

from deit_fast import BackendUnavailableError, _backend
from deit_fast.ops import add_layer_norm, layer_norm, layer_norm_ref

WIDTHS = [1, 100, 192, 384, 768, 1000, 4096]
ROWS = [1, 3, 198, 2 * 198]
CPU_BACKENDS = ["reference", "triton"]  # triton runs under the interpreter here (tests/conftest.py)


@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add_ln"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("D", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_numerics_cpu(backend, dtype, D, rows, residual, use_backend):
    """Forward and backward of each CPU-runnable backend vs float64, ratio rule against PyTorch in dtype."""
    use_backend(backend)
    check_against_reference(*make_inputs(rows, D, dtype, residual=residual))


@pytest.mark.parametrize("affine", [False, True])
def test_no_affine_and_leading_dims(affine, use_backend):
    """weight/bias None and 3-D input under the Triton kernels match float64."""
    use_backend("triton")
    x, r, w, b = make_inputs(2 * 197, 384, torch.float32, residual=True, affine=affine)
    check_against_reference(x.view(2, 197, 384), r.view(2, 197, 384), w, b)


def test_weight_in_input_dtype(use_backend):
    """fp16 weight with fp16 input (pure half model) matches float64 under Triton."""
    use_backend("triton")
    x, _, w, b = make_inputs(198, 192, torch.float16, residual=False)
    check_against_reference(x, None, w.half(), b.half())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_expanded_and_noncontiguous(backend, use_backend):
    """A stride-0 output gradient (from .sum()) and a transposed input give the float64 answer."""
    use_backend(backend)
    base = torch.randn(384, 198, dtype=torch.float32)
    x = base.t().requires_grad_()  # (198, 384), non-contiguous
    w = torch.randn(384, requires_grad=True)
    b = torch.randn(384, requires_grad=True)
    y = layer_norm(x, w, b)
    (y * 1.0).sum().backward()  # the gradient reaching the op is an expanded view
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    y64 = layer_norm_ref(x64, w64, b64, upcast=True)
    y64.sum().backward()
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_is_deterministic(backend, use_backend):
    """Two backward passes on the same inputs give bit-identical gradients."""
    use_backend(backend)
    x, r, w, b = make_inputs(396, 384, torch.float32)
    grads = []
    for _ in range(2):
        outs, leaves = run_op(x, r, w, b)
        torch.autograd.backward(outs, [torch.ones_like(o) * 0.5 for o in outs])
        grads.append([leaf.grad.clone() for leaf in leaves])
    for g1, g2 in zip(*grads, strict=True):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend, use_backend):
    """torch.library.opcheck passes for the forward and backward custom ops."""
    use_backend(backend)
    x, r, w, b = make_inputs(6, 192, torch.float32)
    for residual in (None, r):
        args = (x.requires_grad_(), residual, w.requires_grad_(), b.requires_grad_(), 1e-6)
        torch.library.opcheck(torch.ops.deit_fast.layer_norm_fwd.default, args)
    y, s, mean, rstd = torch.ops.deit_fast.layer_norm_fwd(x.detach(), r, w.detach(), b.detach(), 1e-6)
    dy = torch.randn_like(y)
    for dsum in (None, torch.randn_like(y)):
        torch.library.opcheck(torch.ops.deit_fast.layer_norm_bwd.default, (dy, dsum, s, w.detach(), mean, rstd))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend, use_backend):
    """torch.compile(fullgraph=True) of code calling both ops matches eager, forward and backward."""
    use_backend(backend)
    torch._dynamo.reset()

    def block(x, r, w, b):
        s, y = add_layer_norm(x, r, w, b)
        return layer_norm(s * 2 + y, w, b)

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    x, r, w, b = make_inputs(2 * 198, 192, torch.float32)
    x.requires_grad_()
    out_eager = block(x, r, w, b)
    (g_eager,) = torch.autograd.grad(out_eager.sum(), x)
    out_compiled = compiled(x, r, w, b)
    (g_compiled,) = torch.autograd.grad(out_compiled.sum(), x)
    torch.testing.assert_close(out_compiled, out_eager)
    torch.testing.assert_close(g_compiled, g_eager)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rows(backend, use_backend):
    """Zero rows give empty outputs and zero parameter gradients."""
    use_backend(backend)
    x = torch.randn(0, 384, requires_grad=True)
    w = torch.randn(384, requires_grad=True)
    b = torch.randn(384, requires_grad=True)
    y = layer_norm(x, w, b)
    assert y.shape == (0, 384)
    y.sum().backward()
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


def test_float64_runs_reference(use_backend):
    """float64 input is handled (by the reference) and matches F.layer_norm."""
    x = torch.randn(5, 100, dtype=torch.float64)
    w, b = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (100,), w, b, 1e-6))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: layer_norm(torch.ones(3, 4, dtype=torch.int32), None, None), "x must be a floating-point"),
        (lambda: layer_norm(torch.randn(3, 4), torch.randn(5), None), r"weight must have shape \(4,\)"),
        (lambda: layer_norm(torch.randn(3, 4), None, torch.randn(4, 1)), r"bias must have shape \(4,\)"),
        (lambda: layer_norm(torch.randn(3, 0), None, None), "non-empty last dimension"),
        (lambda: layer_norm(torch.tensor(1.0), None, None), "non-empty last dimension"),
        (lambda: layer_norm(torch.randn(3, 4), None, None, eps=0.0), "eps must be positive"),
        (lambda: add_layer_norm(torch.randn(3, 4), torch.randn(3, 5), None, None), "residual must have x's shape"),
        (lambda: add_layer_norm(torch.randn(3, 4), torch.randn(3, 4).half(), None, None),
         "residual must have x's dtype"),
        (lambda: layer_norm(torch.randn(3, 4), torch.ones(4, dtype=torch.int64), None),
         "weight must be a floating-point"),
    ],
)
def test_bad_input_errors(call, message):
    """Wrong dtype, shape or eps raises ValueError naming the argument."""
    with pytest.raises(ValueError, match=message):
        call()


def test_forced_backend_errors(monkeypatch):
    """Forcing a backend that cannot run raises BackendUnavailableError with the reason."""
    x = torch.randn(4, 8)
    monkeypatch.setenv("DEIT_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        layer_norm(x, None, None)
    monkeypatch.setenv("DEIT_FAST_BACKEND", "triton")
    monkeypatch.setattr(_backend, "TRITON_INTERPRETED", True)
    with pytest.raises(BackendUnavailableError, match="at most 8192"):
        layer_norm(torch.randn(2, 8193), None, None)
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        layer_norm(x.bfloat16(), None, None)
    monkeypatch.setattr(_backend, "TRITON_INTERPRETED", False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        layer_norm(x, None, None)
    monkeypatch.setenv("DEIT_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DEIT_FAST_BACKEND='fastest'"):
        layer_norm(x, None, None)


def test_auto_uses_reference_on_cpu(use_backend):
    """Under auto, CPU tensors run the reference, and forcing reference does too."""
    x = torch.randn(2, 8)
    for name in ("auto", "reference"):
        use_backend(name)
        assert _backend.choose("layer_norm", x, None, None, None, 1e-6)[0] == "reference"
