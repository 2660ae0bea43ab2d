"""The one place that decides which implementation of each fused op runs.

Every op in `deit_fast.ops` registers here a PyTorch reference and, where they exist, a Triton and a CUDA C++
implementation (`Impl`: forward, backward, and a `supports(*args)` check that names why an input cannot run).
`choose(op, *args)` picks one per call:

- `DEIT_FAST_BACKEND=reference|triton|cuda` forces that backend. Forcing one that cannot run here, or that does not
  support the input, raises `BackendUnavailableError` saying why; nothing silently runs something else.
- `auto` (the default): CPU tensors use the reference; CUDA tensors use the first backend in the op's preference
  order that is available and supports the input, else the reference, with a one-time log line naming the reason.

Triton kernels run on CPU tensors only under the interpreter: `TRITON_INTERPRET=1` must be set before `deit_fast` is
imported (Triton reads it when the kernels are defined). That is how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("deit_fast")

BACKENDS = ("reference", "triton", "cuda")
BACKEND_ENV = "DEIT_FAST_BACKEND"
# Read once, at import, because Triton decides between compiled and interpreted kernels when they are defined.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this op on this input here."""


def _supports_everything(*args) -> str | None:
    return None


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: `forward(*args)`, `backward(*grad_args)`, and `supports(*args)` returning None
    when it can run these inputs, else the reason it cannot."""

    forward: Callable
    backward: Callable | None = None
    supports: Callable[..., str | None] = _supports_everything


@dataclass
class Op:
    name: str
    reference: Impl
    triton: Impl | None = None
    cuda: Impl | None = None
    # Order tried on CUDA tensors under `auto`, per GPU architecture ("sm_90") with "default" for the rest.
    preference: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"default": ("cuda", "triton")})

    def impl(self, backend: str) -> Impl | None:
        return getattr(self, backend)

    def order(self, device: torch.device) -> Sequence[str]:
        arch = cuda_arch(device)
        return self.preference.get(arch, self.preference["default"])


_OPS: dict[str, Op] = {}
_logged: set[tuple[str, str]] = set()


def register(op: Op) -> Op:
    if op.name in _OPS:
        raise ValueError(f"op {op.name!r} is registered twice")
    _OPS[op.name] = op
    return op


def ops() -> dict[str, Op]:
    return dict(_OPS)


def forced_backend() -> str:
    value = os.environ.get(BACKEND_ENV)
    if value is None or value == "auto":
        return "auto"
    value = value.strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of auto, {', '.join(BACKENDS)}")
    return value


@functools.cache
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    return None


@functools.cache
def cuda_extension():
    """(module, None) when deit_fast._C imports, else (None, reason)."""
    try:
        from deit_fast import _C
    except ImportError as e:
        return None, (
            f"the CUDA extension deit_fast._C is not built ({e}); reinstall with nvcc on PATH: "
            "pip install --no-build-isolation -e ."
        )
    return _C, None


def extension_archs() -> list[str]:
    """Architectures the CUDA extension was compiled for, e.g. ['sm_80', 'sm_90a'] (empty when not built)."""
    ext, _ = cuda_extension()
    if ext is None:
        return []
    archs = []
    for item in ext.build_info()["cuda_archs"].replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().replace("+PTX", "")
        if item:
            archs.append("sm_" + item.replace(".", ""))
    return archs


def cuda_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _extension_runs_on(device: torch.device) -> str | None:
    archs = extension_archs()
    major, minor = torch.cuda.get_device_capability(device)
    for arch in archs:
        digits = arch[3:].rstrip("af")
        built_major, built_minor = int(digits[:-1]), int(digits[-1])
        # SASS runs on the same major at an equal or higher minor; 'a' (arch-specific) code only on its exact arch.
        exact_only = arch[-1] in "af"
        if built_major == major and (built_minor == minor or (not exact_only and built_minor < minor)):
            return None
    return f"deit_fast._C was built for {', '.join(archs)}, not for this GPU ({cuda_arch(device)}); " \
        "rebuild with DEIT_FAST_CUDA_ARCHS set to include it"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device` here, else why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        if err := triton_import_error():
            return err
        if device.type == "cuda" or TRITON_INTERPRETED:
            return None
        return (f"Triton kernels need CUDA tensors (got {device.type}); to run them on the CPU set TRITON_INTERPRET=1 "
                "before importing deit_fast")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors (got {device.type})"
        _, err = cuda_extension()
        return err or _extension_runs_on(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise ValueError("no tensor among the op's arguments")


def choose(op_name: str, *args) -> tuple[str, Impl]:
    """The backend name and implementation that run `op_name` on these arguments."""
    op = _OPS[op_name]
    device = _device_of(args)
    forced = forced_backend()
    if forced == "reference":
        return "reference", op.reference
    if forced != "auto":
        impl = op.impl(forced)
        if impl is None:
            raise BackendUnavailableError(f"{BACKEND_ENV}={forced}, but {op_name} has no {forced} implementation")
        reason = unavailable_reason(forced, device) or impl.supports(*args)
        if reason:
            raise BackendUnavailableError(f"{BACKEND_ENV}={forced}, but {op_name} cannot use it: {reason}")
        return forced, impl
    if device.type != "cuda":
        return "reference", op.reference
    reasons = []
    for backend in op.order(device):
        impl = op.impl(backend)
        if impl is None:
            continue
        reason = unavailable_reason(backend, device) or impl.supports(*args)
        if reason is None:
            return backend, impl
        reasons.append(f"{backend}: {reason}")
    key = (op_name, "; ".join(reasons))
    if key not in _logged:
        _logged.add(key)
        logger.warning("deit_fast: %s runs the PyTorch reference (%s)", op_name, key[1])
    return "reference", op.reference
