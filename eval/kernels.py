"""GPU benchmark of the MoE experts kernels at DiffusionGemma 26B-A4B's layer shape.

    python -m eval.kernels [--tokens 256,1024,2048] [--formats bf16,nvfp4] [--sweep] [--out results/kernels.json]

One MoE layer (hidden 2816, expert intermediate 704, 128 experts, top-8, random weights and routing) for
each token count, in one process: transformers' `grouped_mm` bf16 experts (the baseline), our Triton bf16
and NVFP4 (W4A16) experts. Prints and saves, per case: median time (plain launches and CUDA-graph
replays), error against float32 math (on the dequantized weights for NVFP4), and the floors measured in the
same run: bytes that must move / device copy bandwidth, and FLOPs / bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 2816, 704, 128, 8


def measure_ceilings() -> dict:
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return {"copy_GBps": 2 * 2**30 / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def random_routing(tokens: int, generator: torch.Generator):
    logits = torch.randn(tokens, EXPERTS, device="cuda", generator=generator)
    weights, index = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
    return index, (weights / weights.sum(-1, keepdim=True)).float()


def reference(x, index, weights, gate_up, down) -> torch.Tensor:
    """float32 math, one expert at a time (weights upcast per expert to bound memory)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat = index.flatten()
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero().flatten()
        tokens = pairs // TOP_K
        h = x[tokens].float() @ gate_up[e].float().T
        act = torch.nn.functional.gelu(h[:, :INTERMEDIATE], approximate="tanh") * h[:, INTERMEDIATE:]
        out.index_add_(0, tokens, (act @ down[e].float().T) * weights.flatten()[pairs, None])
    return out


def rel_err(got, want) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def build_nvfp4(gate_up, down):
    from dgemma_hf.kernels.moe import NVFP4Experts
    from dgemma_hf.kernels.nvfp4 import dequantize_nvfp4, quantize_nvfp4, scales_to_kernel_layout, to_kernel_layout

    gate = quantize_nvfp4(gate_up[:, :INTERMEDIATE])
    up = quantize_nvfp4(gate_up[:, INTERMEDIATE:])
    down_q = quantize_nvfp4(down)
    weights = NVFP4Experts(
        gate_up_packed=to_kernel_layout(torch.cat([gate.packed, up.packed], 1)),
        gate_up_scale=scales_to_kernel_layout(torch.cat([gate.scale, up.scale], 1)),
        gate_scale2=gate.weight_scale_2,
        up_scale2=up.weight_scale_2,
        down_packed=to_kernel_layout(down_q.packed),
        down_scale=scales_to_kernel_layout(down_q.scale),
        down_scale2=down_q.weight_scale_2,
    )
    dequantized = (
        torch.cat([dequantize_nvfp4(*gate, dtype=torch.bfloat16), dequantize_nvfp4(*up, dtype=torch.bfloat16)], 1),
        dequantize_nvfp4(*down_q, dtype=torch.bfloat16),
    )
    return weights, dequantized


def upstream_experts(gate_up, down):
    """transformers' own DiffusionGemma experts module holding our weights, on grouped_mm."""
    from transformers import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    config = DiffusionGemmaTextConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, num_experts=EXPERTS, top_k_experts=TOP_K
    )
    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        module = DiffusionGemmaTextExperts(config)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return module


def time_ms(fn) -> dict:
    import triton.testing

    result = {"launch_ms": triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")}
    try:
        result["graph_ms"] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as err:  # e.g. a path that synchronises with the host cannot be captured
        result["graph_error"] = f"{type(err).__name__}: {err}"[:200]
    return result


def sweep_configs(tokens: int, nvfp4: bool):
    """Candidate (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, swap_ab, down BLOCK_N]) around the shape's tile
    size."""
    small = tokens <= 512
    block_ms = (16, 32) if small else (64, 128)
    if nvfp4:  # weights on the MMA's M side (swap_ab); BLOCK_K, the pipelined K step, a multiple of 32; down's BLOCK_N
        if small:
            return list(itertools.product((32, 64), (64, 128), (32, 64), (4,), (3, 4), (True,), (64, 128, 256)))
        return list(itertools.product(block_ms, (64, 128), (64,), (4, 8), (3, 4), (True,), (64, 128, 256)))
    return list(itertools.product(block_ms, (64, 128), (64, 128) if small else (64,), (4,), (3, 4)))


def bench_tokens(tokens: int, ceilings: dict, sweep: bool, generator: torch.Generator,
                 formats=("bf16", "nvfp4")) -> list[dict]:
    import triton.testing

    from dgemma_hf.kernels.moe import moe_experts, moe_experts_nvfp4, pick_config

    gate_up = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, device="cuda", generator=generator) / HIDDEN**0.5
    down = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, device="cuda", generator=generator) / INTERMEDIATE**0.5
    gate_up, down = gate_up.bfloat16(), down.bfloat16()
    nvfp4, (dq_gate_up, dq_down) = build_nvfp4(gate_up, down)
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=generator).bfloat16()
    index, weights = random_routing(tokens, generator)
    hit = index.unique().numel()
    pairs = tokens * TOP_K
    io_bytes = 2 * tokens * HIDDEN * 2  # activations in and out, bf16
    bf16_bytes = hit * 3 * INTERMEDIATE * HIDDEN * 2 + io_bytes
    nvfp4_bytes = hit * 3 * INTERMEDIATE * HIDDEN * (0.5 + 1 / 16) + io_bytes
    flops = 2 * pairs * 3 * INTERMEDIATE * HIDDEN
    compute_floor_ms = flops / (ceilings["bf16_matmul_TFLOPs"] * 1e9)

    def floor(bytes_):
        return max(bytes_ / (ceilings["copy_GBps"] * 1e6), compute_floor_ms)

    want_bf16 = reference(x, index, weights, gate_up, down)
    want_nvfp4 = reference(x, index, weights, dq_gate_up, dq_down)
    module = upstream_experts(gate_up, down)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    grouped_mm = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    cases = {
        "grouped_mm_bf16": (lambda cfg: grouped_mm(module, x, index, weights), want_bf16, bf16_bytes),
        "triton_bf16": (lambda cfg: moe_experts(x, index, weights, gate_up, down, config=cfg), want_bf16, bf16_bytes),
        "triton_nvfp4": (lambda cfg: moe_experts_nvfp4(x, index, weights, nvfp4, config=cfg), want_nvfp4, nvfp4_bytes),
    }
    rows = []
    for name, (run, want, bytes_) in cases.items():
        if name.startswith("triton") and name.rpartition("_")[2] not in formats:
            continue
        configs = [None]
        if sweep and name.startswith("triton"):
            configs += sweep_configs(tokens, nvfp4=name.endswith("nvfp4"))
        best = None
        for cfg in configs:
            try:
                err = rel_err(run(cfg), want)
                # Candidates get a quick plain timing; the default config gets the full one.
                timing = time_ms(lambda: run(cfg)) if cfg is None else {
                    "launch_ms": triton.testing.do_bench(lambda: run(cfg), warmup=10, rep=30, return_mode="median")}
            except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
                print(f"  {name} {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            ms = timing.get("graph_ms", timing["launch_ms"])
            row = {
                "case": name, "tokens": tokens, "experts_hit": hit,
                "config": list(cfg) if cfg else (
                    list(pick_config(pairs, EXPERTS, name.endswith("nvfp4"))) if name.startswith("triton") else None
                ),
                "rel_err_vs_fp32": err, **timing, "floor_ms": floor(bytes_),
                "bytes_floor_ms": bytes_ / (ceilings["copy_GBps"] * 1e6), "compute_floor_ms": compute_floor_ms,
                "x_floor": ms / floor(bytes_),
            }
            if cfg is None:
                rows.append(row)
            if best is None or timing["launch_ms"] < best["launch_ms"]:
                best = row
        if sweep and name.startswith("triton") and best is not None:
            rows.append({**best, "case": name + "_best_swept"})
            print(f"  best {name} at {tokens} tokens: {best['config']} {best['launch_ms'] * 1e3:.1f} us "
                  "(plain launches)")
    baseline = next(r for r in rows if r["case"] == "grouped_mm_bf16")
    base_ms = baseline.get("graph_ms", baseline["launch_ms"])
    for row in rows:
        row["speedup_vs_grouped_mm"] = base_ms / row.get("graph_ms", row["launch_ms"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="256,1024,2048", help="comma-separated token counts")
    parser.add_argument("--formats", default="bf16,nvfp4", help="comma-separated Triton expert weight formats to "
                        "time (transformers' grouped_mm bf16 always runs, as the baseline)")
    parser.add_argument("--sweep", action="store_true", help="also try the block-size candidates")
    parser.add_argument("--out", type=Path, default=Path("results/kernels.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("eval.kernels needs a CUDA GPU")
    token_counts = [int(t) for t in args.tokens.split(",")]
    if any(t <= 0 for t in token_counts):
        raise SystemExit(f"--tokens must be positive integers, got {args.tokens}")
    formats = args.formats.split(",")
    if not formats or any(f not in ("bf16", "nvfp4") for f in formats):
        raise SystemExit(f"--formats takes bf16 and/or nvfp4, got {args.formats!r}")
    import dgemma_hf  # noqa: F401  (registers the experts backends)

    generator = torch.Generator(device="cuda").manual_seed(0)
    ceilings = measure_ceilings()
    report = {"card": torch.cuda.get_device_name(), "ceilings": ceilings, "shape": {
        "hidden": HIDDEN, "intermediate": INTERMEDIATE, "experts": EXPERTS, "top_k": TOP_K}, "rows": []}
    for tokens in token_counts:
        report["rows"] += bench_tokens(tokens, ceilings, args.sweep, generator, formats)
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{report['card']}: copy {ceilings['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'case':28s} {'tokens':>6s} {'graph us':>9s} {'launch us':>9s} {'floor us':>9s} {'x floor':>7s} "
          f"{'vs gmm':>6s} {'rel err':>8s}  config")
    for r in report["rows"]:
        graph = r.get("graph_ms", math.nan) * 1e3
        print(f"{r['case']:28s} {r['tokens']:6d} {graph:9.1f} {r['launch_ms'] * 1e3:9.1f} {r['floor_ms'] * 1e3:9.1f} "
              f"{r['x_floor']:7.2f} {r['speedup_vs_grouped_mm']:6.2f} {r['rel_err_vs_fp32']:8.1e}  {r['config']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
