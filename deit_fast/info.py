"""`python -m deit_fast.info`: versions, GPU, CUDA extension, Triton mode, and which backend each op would use."""

from __future__ import annotations

import platform

import torch

import deit_fast
from deit_fast import _backend

# A representative input per op (DeiT-S: 198 tokens, 384 wide, 6 heads of 64) for the "which backend" column.
_SAMPLE_SHAPES = {"layer_norm": (2, 198, 384), "attention": (2, 198, 3 * 384), "distill_loss": (256, 1000),
                  "mlp": (2, 198, 384), "patch_embed": (2, 3, 224, 224), "batch_prep": (2, 224, 224, 3)}


def _sample_args(op_name: str, device: torch.device, dtype: torch.dtype):
    if op_name == "batch_prep":
        from deit_fast.ops.fused_batch_prep import BatchPrepDraws

        images = torch.empty(_SAMPLE_SHAPES[op_name], device=device, dtype=torch.uint8)
        draws = BatchPrepDraws("none", 1.0, (0, 0, 0, 0), torch.zeros(2, 4, dtype=torch.int32), 0)
        return images, draws, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), dtype, False
    x = torch.empty(_SAMPLE_SHAPES[op_name], device=device, dtype=dtype)
    if op_name == "attention":
        return x, 6, 0.125
    if op_name == "distill_loss":
        return x, x, x.float(), x
    if op_name == "patch_embed":
        return x, torch.empty(384, 3, 16, 16, device=device, dtype=dtype)
    if op_name == "mlp":
        w1 = torch.empty(4 * x.shape[-1], x.shape[-1], device=device, dtype=dtype)
        return x, w1, None, w1.t(), None, x, None, None
    return x, None, None, None, 1e-6


def report() -> list[tuple[str, str]]:
    rows = [("deit_fast", deit_fast.__version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA", str(torch.version.cuda))]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError as e:
        rows.append(("triton", f"not importable ({e})"))
    try:
        import timm

        rows.append(("timm", timm.__version__))
    except ImportError:
        rows.append(("timm", "not installed"))

    if torch.cuda.is_available():
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        rows.append(("GPU", f"{props.name} ({_backend.cuda_arch(device)}, {props.multi_processor_count} SMs, "
                            f"{props.total_memory / 2**30:.0f} GiB)"))
    else:
        device = torch.device("cpu")
        rows.append(("GPU", "none (CUDA not available): ops run the PyTorch reference on CPU tensors"))

    ext, err = _backend.cuda_extension()
    if ext is None:
        rows.append(("CUDA extension", f"not built: {err}"))
    else:
        info = ext.build_info()
        rows.append(("CUDA extension", f"built for {', '.join(_backend.extension_archs())} "
                                       f"(CUDA {info['cuda_version']}, torch {info['torch_version']})"))
    if _backend.triton_import_error():
        rows.append(("Triton kernels", "unavailable"))
    elif _backend.TRITON_INTERPRETED:
        rows.append(("Triton kernels", "interpreted on the CPU (TRITON_INTERPRET=1)"))
    else:
        rows.append(("Triton kernels", "compiled (JIT) for the GPU" if device.type == "cuda"
                     else "compiled (JIT), but no GPU to run them on"))
    rows.append(("DEIT_FAST_BACKEND", _backend.forced_backend()))

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in _backend.ops():
        args = _sample_args(name, device, dtype)
        try:
            backend, _ = _backend.choose(name, *args)
            kind = f"{args[0].dtype} -> {dtype}" if args[0].dtype != dtype else f"{dtype}"  # batch_prep: uint8 in
            rows.append((f"op {name}", f"{backend} ({device.type}, {kind}, shape {tuple(args[0].shape)})"))
        except (_backend.BackendUnavailableError, ValueError) as e:
            rows.append((f"op {name}", f"error: {e}"))
    return rows


def main() -> None:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
