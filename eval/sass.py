"""Offline instruction counts of the MoE and attention kernels' main loop: no GPU needed.

    python -m eval.sass [--arch 90] [--formats nvfp4,bf16] [--decode ptx|portable] [--out results/sass.json]
    python -m eval.sass --attention [--arch 90] [--out results/sass_attention.json]

Compiles `dgemma_hf.kernels.moe`'s gate_up and down kernels for each config of the block tables with Triton's
own compiler and ptxas (shipped in the triton wheel), with the specializations the JIT applies at run time
(16-byte aligned pointers, hidden and intermediate sizes divisible by 16: without them the loads would look
unvectorised and unpipelined), disassembles them with the wheel's nvdisasm, finds the main loop (the longest
backward branch) and prints, per kernel: registers, local-memory (spill) bytes, shared memory, the loop's
instruction count, instructions per weight element a thread handles per iteration, its commonest opcodes, and
whether ptxas serialised its warpgroup MMAs (it does when it cannot pipeline them; an H200 measured such NVFP4
configs 1.3-1.8x slower).

The count is what a change to the decode or the tiles moves, and it costs no device time; it is not the whole
story: on an H200, 7-13% fewer instructions in the NVFP4 loop changed no time, and Nsight Compute found the weight
loads' coalescing to be what held the kernel back (eval/results/2026-11-28-session8/). Timing still needs a GPU
(`python -m eval.kernels`).

`--attention` compiles `dgemma_hf.kernels.attention`'s kernel instead, bf16 with the tuned tiles, for 26B-A4B's
sliding and global layers on 1 to 8 ranks (the query heads per kv head a rank sees), in each variant the model
launches (the decoder's one-row padding mask; encoder passes with a [queries, keys] mask, or causal without a
mask), specialised as at the real shapes (canvas and cache lengths multiples of 16). A variant that the installed
Triton cannot compile fails the run. The GPU machines may run another Triton than this one: to check against
theirs, install it aside (`pip install --target /tmp/triton-X triton==X`) and run with `PYTHONPATH=/tmp/triton-X`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # a real compile, even where the tests interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Pointer element types of the kernels' arguments (bf16 activations; NVFP4 weights and scales as bytes).
POINTERS = {
    "x_ptr": "*bf16", "act_ptr": "*bf16", "out_ptr": "*bf16", "sorted_pairs_ptr": "*i32",
    "expert_offsets_ptr": "*i32", "tile_expert_ptr": "*i32", "tile_start_ptr": "*i32",
    "top_k_weights_ptr": "*fp32", "gate_scale2_ptr": "*fp32", "up_scale2_ptr": "*fp32", "down_scale2_ptr": "*fp32",
}
DIVISIBLE = ("H", "I")  # the real shapes' sizes; TOP_K (8) is not specialised


def compile_kernel(kernel, constants: dict, num_warps: int, num_stages: int, arch: int, arg_type, divisible):
    """Compiles `kernel` (a triton.jit function) with `constants` for its constexpr parameters (and any argument
    the JIT would specialise to a constant); `arg_type(name)` gives the other arguments' types, and
    `divisible(name)` whether the JIT would see them 16-divisible (pointers always are: 16-byte aligned)."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = arg_type(name)
        if signature[name].startswith("*") or divisible(name):
            attrs[(index,)] = [["tt.divisibility", 16]]
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def loop_lines(sass: str) -> list[str]:
    """The longest loop: the instructions between a backward branch and its target label."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    span = None
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if target and labels.get(target.group(1), i) < i:
            start = labels[target.group(1)]
            if span is None or i - start > span[1] - span[0]:
                span = (start, i)
    return lines[span[0] : span[1] + 1] if span else []


def loop_histogram(sass: str) -> collections.Counter:
    """Opcodes of the longest loop."""
    ops = collections.Counter()
    for line in loop_lines(sass):
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def inspect_kernel(compiled, work_dir: Path, tag: str) -> dict:
    cubin = work_dir / f"{tag}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    registers, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    sass = subprocess.run([str(BIN / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    ops = loop_histogram(sass)
    return {"registers": registers, "stack_bytes": stack, "shared_bytes": compiled.metadata.shared,
            "loop_instructions": sum(ops.values()), "mma_serialized": mma_serialized(compiled, work_dir, tag),
            "opcodes": ops}


def mma_serialized(compiled, work_dir: Path, tag: str) -> bool:
    """Whether ptxas serialised the kernel's warpgroup MMAs (its C7515 advisory), by assembling the PTX again
    verbosely: Triton keeps ptxas's messages to itself."""
    ptx = work_dir / f"{tag}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    arch = compiled.metadata.target.arch
    ptxas = get_ptxas(arch).path  # the one Triton assembled it with (triton 3.6 and 3.9 both have this signature)
    run = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", str(ptx),
                          "-o", str(work_dir / f"{tag}.ptxas.cubin")], capture_output=True, text=True, check=True)
    return "C7515" in run.stdout + run.stderr


# The weight arguments per format: NVFP4 codes as bytes and block scales in the kernels' bf16 layout; bf16 kernels
# get the weight tensor for both.
WEIGHTS = {"nvfp4": {"w_ptr": "*u8", "w_scale_ptr": "*bf16"}, "bf16": {"w_ptr": "*bf16", "w_scale_ptr": "*bf16"}}


def _moe_arg_type(name: str, weights: dict) -> str:
    return POINTERS.get(name) or weights.get(name, "i32")


def rows(formats, portable: bool, arch: int):
    from dgemma_hf.kernels import moe

    tables = {"nvfp4": moe._NVFP4_CONFIGS, "bf16": moe._CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            nvfp4 = fmt == "nvfp4"
            arg_type = functools.partial(_moe_arg_type, weights=WEIGHTS[fmt])
            for limit, block_m, block_n, block_k, warps, stages, *extra in tables[fmt]:
                constants = dict(NVFP4=nvfp4, FAST_BF16=nvfp4 and not portable, SWAP_AB=bool(extra and extra[0]),
                                 BLOCK_M=block_m, BLOCK_K=block_k)
                down_block_n = extra[1] if len(extra) > 1 else block_n
                # Gate and up: two weight tiles of BLOCK_N x BLOCK_K a step; down: one, of its own BLOCK_N.
                for name, kernel, tiles, width in (("gate_up", moe._gate_up_kernel, 2, block_n),
                                                   ("down", moe._down_kernel, 1, down_block_n)):
                    compiled = compile_kernel(kernel, {**constants, "BLOCK_N": width}, warps, stages, arch, arg_type,
                                              DIVISIBLE.__contains__)
                    facts = inspect_kernel(compiled, Path(tmp), f"{fmt}_{name}_{block_m}_{width}_{block_k}")
                    per_thread = tiles * width * block_k / (warps * 32)
                    yield {"format": fmt, "kernel": name, "mean_pairs_up_to": limit,
                           "config": [block_m, block_n, block_k, warps, stages, *extra],
                           "per_weight": facts["loop_instructions"] / per_thread, **facts}


# The attention kernel's variants as the model launches them: (mask kind, mask read as one key row, causal). Kind 1
# is a boolean mask; the window of the sliding layers is in their masks, and only an encoder pass without a mask
# runs causal.
ATTENTION_VARIANTS = {
    "decoder": (1, True, False),
    "encoder_mask": (1, False, False),
    "encoder_causal": (0, False, True),
}
# (head dim, query heads per kv head, one kv head a rank) on N ranks, for 26B-A4B's sliding layers (16 query and 8
# kv heads) and global layers (16 and 2; a rank keeps the kv head its query heads read): the group sets the tiles
# of the mask scan, and a single kv head is an argument of 1, which Triton specialises to a constant.
ATTENTION_SHAPES = {
    "sliding N=1-4": (256, 2, False),
    "sliding N=8": (256, 2, True),
    "global N=1": (512, 8, False),
    "global N=2": (512, 8, True),
    "global N=4": (512, 4, True),
    "global N=8": (512, 2, True),
}
# Integer arguments that are multiples of 16 at the real shapes; the mask's key stride is 1 (specialised away).
ATTENTION_DIVISIBLE = ("Lq", "Lk", "q_offset", "window")
ATTENTION_POINTERS = {"mask_ptr": "*u8", "part_ptr": "*fp32", "stats_ptr": "*fp32"}  # the rest: bf16


def _attention_arg_type(name: str) -> str:
    if name.endswith("_ptr"):
        return ATTENTION_POINTERS.get(name, "*bf16")
    return "fp32" if name in ("qk_scale", "mask_floor") else "i32"


def _attention_divisible(name: str) -> bool:
    return name.startswith("stride_") or name in ATTENTION_DIVISIBLE


def attention_rows(arch: int):
    import torch

    from dgemma_hf.kernels import attention

    kernel = attention._attention_kernel
    with tempfile.TemporaryDirectory() as tmp:
        for shape, (head_dim, group, one_kv_head) in ATTENTION_SHAPES.items():
            block_m, block_n, dv_split, warps, stages = attention.pick_config(head_dim, torch.bfloat16)
            for variant, (mask_kind, key_mask, causal) in ATTENTION_VARIANTS.items():
                pre_m, pre_n = attention.mask_scan_tile(block_m, group, key_mask)
                constants = dict(
                    GROUP=group, HEAD_DIM=head_dim, BLOCK_DV=head_dim // dv_split, BLOCK_M=block_m, BLOCK_N=block_n,
                    PRE_M=pre_m, PRE_N=pre_n, MASK_KIND=mask_kind, KEY_MASK=key_mask, BOUND_BY_MASK=mask_kind > 0,
                    CAUSAL=causal, WINDOWED=False, V_IS_K=False, IEEE_DOT=False, stride_mn=1,
                )
                if one_kv_head:
                    constants["num_kv_heads"] = 1
                compiled = compile_kernel(kernel, constants, warps, stages, arch, _attention_arg_type,
                                          _attention_divisible)
                facts = inspect_kernel(compiled, Path(tmp), f"attention_{head_dim}_{group}_{one_kv_head}_{variant}")
                yield {"shape": shape, "kernel": variant, "config": [block_m, block_n, dv_split, warps, stages],
                       **facts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot (90: Hopper)")
    parser.add_argument("--formats", default="nvfp4,bf16", help="comma-separated: nvfp4, bf16")
    parser.add_argument("--decode", choices=("ptx", "portable"), default="ptx",
                        help="NVFP4 weights through the bf16 PTX decode (bf16 activations) or the portable one (fp16)")
    parser.add_argument("--attention", action="store_true",
                        help="the attention kernel's variants instead of the MoE kernels")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.attention:
        return report_attention(args)
    formats = args.formats.split(",")
    if not formats or any(f not in ("nvfp4", "bf16") for f in formats):
        raise SystemExit(f"--formats takes nvfp4 and/or bf16, got {args.formats!r}")
    print(f"{'kernel':16s} {'config':26s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'loop':>5s} {'/weight':>7s} "
          f"{'serial':>6s}  "
          "opcodes")
    report = []
    for row in rows(formats, args.decode == "portable", args.arch):
        report.append(row)
        top = " ".join(f"{op}:{count}" for op, count in row["opcodes"].most_common(8))
        print(f"{row['format'] + ' ' + row['kernel']:16s} {str(row['config']):26s} {row['registers']:4d} "
              f"{row['stack_bytes']:5d} {row['shared_bytes']:6d} {row['loop_instructions']:5d} "
              f"{row['per_weight']:7.2f} {'yes' if row['mma_serialized'] else 'no':>6s}  {top}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"arch": args.arch, "decode": args.decode, "rows": report}, indent=2))
    return 0


def report_attention(args) -> int:
    print(f"{'kernel':30s} {'config':22s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'loop':>5s}  opcodes")
    report = []
    for row in attention_rows(args.arch):
        report.append(row)
        top = " ".join(f"{op}:{count}" for op, count in row["opcodes"].most_common(8))
        print(f"{row['shape'] + ' ' + row['kernel']:30s} {str(row['config']):22s} {row['registers']:4d} "
              f"{row['stack_bytes']:5d} {row['shared_bytes']:6d} {row['loop_instructions']:5d}  {top}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"arch": args.arch, "rows": report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
