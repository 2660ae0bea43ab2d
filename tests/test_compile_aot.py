"""Every Triton kernel configuration the dispatcher can launch compiles ahead of time for sm_80 and sm_90, fits in
shared memory and does not spill registers (deit_fast.aot). The interpreter accepts programs the compiler rejects;
this layer catches them. It runs in a subprocess because the tests' own process has TRITON_INTERPRET set."""

import json
import os
import subprocess
import sys

import pytest

from deit_fast.ops import fused_layer_norm as ln


def test_config_table_covers_every_width():
    """Every D from 1 to MAX_D maps to a configuration in TRITON_CONFIGS with BLOCK_D >= D."""
    for D in range(1, ln.MAX_D + 1):
        config = ln.triton_config(D)
        assert config in ln.TRITON_CONFIGS and config[0] >= D


@pytest.mark.parametrize("capability", [80, 90], ids=["sm_80", "sm_90"])
def test_triton_kernels_compile_ahead_of_time(capability, tmp_path):
    """All launchable Triton configurations compile for the target with no spills and within shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "deit_fast.aot", "--capability", str(capability), "--json", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    names = {r["kernel"] for r in results}
    expected = {case[0] for case in ln.aot_cases()}
    assert expected <= names
    assert all(r["capability"] == capability and "error" not in r for r in results)
