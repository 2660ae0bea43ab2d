"""Random LayerNorm shapes (hypothesis) under the Triton interpreter. Skipped where hypothesis is not installed
(the GPU machine has none)."""

import os

import pytest
import torch

from deit_fast import _backend

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

from layer_norm_cases import check_against_reference, make_inputs  # noqa: E402


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(rows=st.integers(1, 40), D=st.integers(1, 600), residual=st.booleans())
def test_triton_random_shapes(rows, D, residual):
    """Random row counts and widths under the Triton interpreter (fp32) stay within the ratio rule."""
    if not _backend.TRITON_INTERPRETED:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    old = os.environ.get("DEIT_FAST_BACKEND")
    os.environ["DEIT_FAST_BACKEND"] = "triton"
    try:
        check_against_reference(*make_inputs(rows, D, torch.float32, residual=residual))
    finally:
        if old is None:
            del os.environ["DEIT_FAST_BACKEND"]
        else:
            os.environ["DEIT_FAST_BACKEND"] = old
