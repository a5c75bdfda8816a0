"""eval.sass compiles the MoE and attention kernels for real GPU targets on a machine without one (Triton's own
compiler and ptxas): every MoE table config must build, keep its MMA in the main loop and spill nothing, on Hopper
(where ptxas must not serialise the warpgroup MMAs) and, with the portable NVFP4 decode, on Ampere; every attention
variant the model launches must build with its
tensor-core MMA in the loop. The tests' interpreter cannot catch a kernel that fails only in compilation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _sass(tmp_path, *args):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    run = subprocess.run([sys.executable, "-m", "eval.sass", *args, "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("arch, decode, formats", [(90, "ptx", "nvfp4,bf16"), (80, "portable", "nvfp4")])
def test_moe_kernels_compile_with_their_mma_and_no_spills(tmp_path, arch, decode, formats):
    from dgemma_hf.kernels.moe import _CONFIGS, _NVFP4_CONFIGS

    rows = _sass(tmp_path, "--arch", str(arch), "--decode", decode, "--formats", formats)
    expected = 2 * (len(_NVFP4_CONFIGS) + (len(_CONFIGS) if "bf16" in formats else 0))  # gate_up and down each
    assert len(rows) == expected
    for row in rows:
        where = f"{row['format']} {row['kernel']} {row['config']}"
        assert row["stack_bytes"] == 0, f"{where} spills"
        assert row["loop_instructions"] > 0 and row["per_weight"] > 0, where
        assert row["opcodes"].get("HMMA", 0) + row["opcodes"].get("HGMMA", 0) > 0, f"{where} has no MMA in its loop"
        assert not row["mma_serialized"], f"{where}: ptxas serialised its warpgroup MMAs"


def test_attention_kernel_variants_compile_with_their_mma(tmp_path):
    """The decoder's one-row mask, encoder passes with a mask tile (the variant Triton 3.6 once failed to compile)
    or causal without a mask; sliding and global layers as 1 to 8 ranks split them; the tuned tiles, Hopper."""
    rows = _sass(tmp_path, "--attention", "--arch", "90")  # (importing eval.sass here would end the interpreter)
    shapes = {"sliding N=1-4", "sliding N=8", "global N=1", "global N=2", "global N=4", "global N=8"}
    variants = {"decoder", "encoder_mask", "encoder_causal"}
    assert sorted((row["shape"], row["kernel"]) for row in rows) == sorted(
        (shape, variant) for shape in shapes for variant in variants)
    for row in rows:
        where = f"{row['shape']} {row['kernel']} {row['config']}"
        assert row["loop_instructions"] > 0, where
        assert row["opcodes"].get("HGMMA", 0) > 0, f"{where} has no wgmma in its loop"
