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
    """use_backend('triton', 'cuda') forces DEIT_FAST_BACKEND for the rest of the test, or skips the test when that
    backend cannot run on that device here (e.g. Triton on CPU tensors outside the interpreter)."""
    from deit_fast import _backend

    def set_backend(name: str, device: str = "cpu") -> None:
        if name in _backend.BACKENDS:
            reason = _backend.unavailable_reason(name, torch.device(device))
            if reason:
                pytest.skip(reason)
        monkeypatch.setenv("DEIT_FAST_BACKEND", name)

    return set_backend


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory):
    """deit_fast's cache (built-in datasets, scan results) goes to a temporary folder during the tests."""
    old = os.environ.get("DEIT_FAST_CACHE")
    os.environ["DEIT_FAST_CACHE"] = str(tmp_path_factory.mktemp("deit_fast_cache"))
    yield
    if old is None:
        os.environ.pop("DEIT_FAST_CACHE", None)
    else:
        os.environ["DEIT_FAST_CACHE"] = old
