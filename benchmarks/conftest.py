"""Shared benchmark machinery: device and preset, the measured copy bandwidth (the memory roofline), and the
extra_info every benchmark records (bytes, GB/s, fraction of roofline, GPU, versions, commit).

GPU timing: each timed call launches the op `repeat` times and then synchronizes, so that launch and sync overhead
(~10 us) does not swamp kernels of a few microseconds; per-op figures divide by `repeat`.
"""

import os
import platform
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton provider runs under the interpreter (set before deit_fast is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
REPEAT = 20 if HAS_CUDA else 1


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _environment() -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "commit": _commit()}
    env["device"] = torch.cuda.get_device_name() if HAS_CUDA else f"CPU ({os.cpu_count()} cores)"
    return env


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def environment():
    return _environment()


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Bytes/s of a device-to-device copy (read + write) of a large tensor, measured now: the memory roofline."""
    numel = (256 << 20) // 4 if HAS_CUDA else (16 << 20) // 4
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    if HAS_CUDA:
        from triton.testing import do_bench

        ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        return 2 * src.nbytes / (ms * 1e-3)
    import time

    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / sorted(times)[2]


@pytest.fixture
def run_benchmark(benchmark, environment, copy_bandwidth):
    """run_benchmark(fn, bytes_moved, flops=0, **info): time fn (repeated and synchronized), record extra_info."""

    def run(fn, bytes_moved: int, flops: int = 0, **info):
        def timed():
            for _ in range(REPEAT):
                fn()
            _sync()

        fn()  # warm-up: compilation, autotuning, allocator
        _sync()
        benchmark(timed)
        extra = dict(environment, repeat=REPEAT, bytes=bytes_moved, flops=flops,
                     copy_bandwidth_gbs=round(copy_bandwidth / 1e9, 1), **info)
        if not benchmark.disabled and benchmark.stats is not None:
            seconds = benchmark.stats.stats.median / REPEAT
            extra["median_us"] = round(seconds * 1e6, 3)
            extra["gbs"] = round(bytes_moved / seconds / 1e9, 1)
            extra["roofline_fraction"] = round(bytes_moved / copy_bandwidth / seconds, 3)
            if flops:
                extra["tflops"] = round(flops / seconds / 1e12, 2)
        benchmark.extra_info.update(extra)

    return run


@pytest.fixture
def force_backend(monkeypatch):
    """force_backend(op, backend, *args): set DEIT_FAST_BACKEND for this benchmark, or skip it when that backend
    cannot run `op` on these arguments here; returns the backend that will run."""
    from deit_fast import _backend

    def force(op_name: str, backend: str, *args) -> str:
        impl = _backend.ops()[op_name].impl(backend)
        if impl is None:
            pytest.skip(f"{op_name} has no {backend} implementation")
        reason = _backend.unavailable_reason(backend, DEVICE) or impl.supports(*args)
        if reason:
            pytest.skip(reason)
        monkeypatch.setenv("DEIT_FAST_BACKEND", backend)
        return backend

    return force
