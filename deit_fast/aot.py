"""`python -m deit_fast.aot [--capability 80 90] [--json FILE]`: compile every Triton kernel configuration the
dispatcher can launch, ahead of time, for the given GPU architectures, without a GPU.

Each op module in deit_fast.ops lists its launchable configurations in `aot_cases(capability)`. For each one
this reports shared memory against the architecture's limit, registers and spills from ptxas, and whether the code
uses Hopper's `wgmma` (expected of matrix kernels on sm_90). It must run without TRITON_INTERPRET (interpreted
kernels cannot be compiled); the tests start it in a subprocess for that reason. Exit status 1 when any
configuration fails a check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Largest dynamic shared memory a block may use: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
MAX_SHARED_BYTES = {80: 166912, 90: 232448}
# Op modules with Triton kernels; each defines aot_cases(capability).
OP_MODULES = [
    "deit_fast.ops.fused_layer_norm", "deit_fast.ops.fused_attention", "deit_fast.ops.fused_distill_loss",
    "deit_fast.ops.fused_mlp", "deit_fast.ops.fused_patch_embed",
]


def compile_triton(kernel, signature: dict, constexprs: dict, capability: int, num_warps: int | dict,
                   aligned: tuple[str, ...] = ()):
    """Compile a @triton.jit kernel for sm_<capability> without a GPU. `signature` maps every argument to a Triton
    type ('*fp16', 'i32', 'fp32', 'constexpr'); `aligned` names the arguments specialized as divisible by 16, as the
    JIT does for 16-byte-aligned pointers and sizes. `num_warps` is the warp count or a dict of compile options
    (num_warps, num_stages)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    missing = set(names) - set(signature)
    if missing:
        raise ValueError(f"signature lacks {sorted(missing)}")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(kernel, {n: signature[n] for n in names}, constexprs=constexprs, attrs=attrs)
    options = num_warps if isinstance(num_warps, dict) else {"num_warps": num_warps}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def ptxas_usage(ptx: str, capability: int) -> dict[str, int]:
    """Registers, spill stores/loads and stack frame bytes that `ptxas -v` reports for PTX code."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(capability).path
    except TypeError:  # triton < 3.7 takes no argument
        ptxas = get_ptxas().path
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/kernel.ptx", "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", f"{tmp}/kernel.ptx", "-o", f"{tmp}/kernel.cubin"],
                             capture_output=True, text=True, check=True).stderr
    return parse_ptxas_verbose(out)


def parse_ptxas_verbose(text: str) -> dict[str, int]:
    """Worst-case register, spill and stack numbers over all functions in `ptxas -v` output."""
    import re

    usage = {}
    for key, pattern in (("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads"), ("stack_bytes", r"(\d+) bytes stack frame")):
        usage[key] = max((int(v) for v in re.findall(pattern, text)), default=0)
    return usage


def check_capability(cap: int, name_filter: str = "") -> list[dict]:
    """Compile and check every launchable configuration of every op for sm_<cap>."""
    import importlib

    results = []
    for module_name in OP_MODULES:
        module = importlib.import_module(module_name)
        for name, kernel, signature, constexprs, num_warps, aligned in module.aot_cases(cap):
            if name_filter not in name:
                continue
            row = {"kernel": name, "capability": cap,
                   **(num_warps if isinstance(num_warps, dict) else {"num_warps": num_warps})}
            try:
                compiled = compile_triton(kernel, signature, constexprs, cap, num_warps, aligned)
            except Exception as e:  # report every failing configuration, not just the first
                row["error"] = f"{type(e).__name__}: {e}"
                results.append(row)
                continue
            ptx = compiled.asm["ptx"]
            row.update(shared_bytes=compiled.metadata.shared, uses_wgmma="wgmma" in ptx, uses_mma="mma." in ptx,
                       **ptxas_usage(ptx, cap))
            problems = []
            if row["shared_bytes"] > MAX_SHARED_BYTES[cap]:
                problems.append(f"shared memory {row['shared_bytes']} > {MAX_SHARED_BYTES[cap]}")
            if row["spill_stores"] or row["spill_loads"] or row["stack_bytes"]:
                problems.append("register spills / local memory")
            if cap >= 90 and row["uses_mma"] and not row["uses_wgmma"]:
                problems.append("matrix kernel without wgmma on sm_90")
            if problems:
                row["error"] = "; ".join(problems)
            results.append(row)
    return results


def check(capabilities: list[int], name_filter: str = "") -> list[dict]:
    """check_capability for each architecture, in parallel processes (compilation is CPU-bound)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if len(capabilities) == 1:
        return check_capability(capabilities[0], name_filter)
    workers = min(len(capabilities), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        per_cap = pool.map(check_capability, capabilities, [name_filter] * len(capabilities))
        return [row for rows in per_cap for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, nargs="+", default=[80, 90], help="e.g. 80 90")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = check(args.capability, args.filter)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"FAIL {r['kernel']} sm_{r['capability']}: {r['error']}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed: Triton configurations compiled for "
          + ", ".join(f"sm_{c}" for c in args.capability))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
