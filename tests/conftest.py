import os

import pytest
import torch

# Without a GPU, the Triton kernels are tested under the interpreter. Triton reads this when the kernels are
# defined, so it must be set before deit_fast is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend('triton') forces DEIT_FAST_BACKEND for the rest of the test."""

    def set_backend(name: str) -> None:
        monkeypatch.setenv("DEIT_FAST_BACKEND", name)

    return set_backend


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
