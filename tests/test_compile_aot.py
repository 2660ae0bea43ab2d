"""Every Triton kernel configuration the dispatcher can launch compiles ahead of time for sm_80 and sm_90, fits in
shared memory and does not spill registers (deit_fast.aot). The interpreter accepts programs the compiler rejects;
this layer catches them. It runs in a subprocess because the tests' own process has TRITON_INTERPRET set."""

import importlib
import json
import os
import subprocess
import sys

from deit_fast import aot
from deit_fast.ops import fused_layer_norm as ln


def test_config_table_covers_every_width():
    """Every D from 1 to MAX_D maps to a configuration in TRITON_CONFIGS with BLOCK_D >= D."""
    for D in range(1, ln.MAX_D + 1):
        config = ln.triton_config(D)
        assert config in ln.TRITON_CONFIGS and config[0] >= D


def test_triton_kernels_compile_ahead_of_time(tmp_path):
    """All launchable Triton configurations compile for sm_80 and sm_90 with no spills, within shared memory,
    and with wgmma in the sm_90 matrix kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "deit_fast.aot", "--capability", "80", "90", "--json", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for cap in (80, 90):
        names = {r["kernel"] for r in results if r["capability"] == cap}
        for module_name in aot.OP_MODULES:
            module = importlib.import_module(module_name)
            assert {case[0] for case in module.aot_cases(cap)} <= names
    assert all("error" not in r for r in results)
    matrix_sm90 = [r for r in results if r["capability"] == 90 and r["kernel"].startswith(("attn_fwd", "attn_bwd_d",
                                                                                            "mlp_"))
                   and "delta" not in r["kernel"]]
    assert any(r["kernel"].startswith("mlp_") for r in matrix_sm90)
    assert all(r["uses_wgmma"] for r in matrix_sm90)
