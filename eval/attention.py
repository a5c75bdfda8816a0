"""GPU benchmark of the Triton attention kernel at DiffusionGemma 26B-A4B's attention shapes.

    python -m eval.attention [--kv 4096,32768,131072] [--batch 1,4] [--q 256] [--shapes global,sliding]
                             [--no-mask] [--sweep] [--kv-splits auto,1,2] [--out results/attention.json]

Shapes (a decoder step: the 256-token canvas attending to the cached prefix and itself):
- global: 16 query heads, 2 kv heads, head_dim 512 (K doubles as V in the checkpoint; the model still hands
  attention two tensors, v_norm(K) and rope(k_norm(K)), so "separate V" is what a model forward sees);
- sliding: 16 query heads, 8 kv heads, head_dim 256. (In the model a sliding layer sees at most
  window + canvas = 1280 keys; long kv here stands for the encoder/prefill case and for headroom.)

For each (shape, batch, kv), in one process, bf16, random q/k/v, the decoder's boolean mask [B, 1, q, kv]
(all True but a few left-padding keys in rows b > 0, one row expanded over the queries as the engine
passes it; --no-mask drops it):
- transformers_sdpa: transformers' own sdpa path (`sdpa_attention_forward`: repeat_kv, then PyTorch SDPA;
  at head_dim 512 or with a mask that is the memory-efficient kernel);
- sdpa_<backend>: PyTorch SDPA pinned to each backend (flash, cudnn, efficient; math up to 32k keys) with
  enable_gqa and no repeated heads, where the backend accepts the case (flash and cuDNN stop at head_dim 256
  and take no mask: they run on --no-mask rows); sdpa_best is the fastest of them;
- dgemma_triton: `dgemma_hf.kernels.attention.flash_attention` (the tuned table, or with --sweep every
  candidate config, best reported as dgemma_triton_best_swept); dgemma_triton_k_is_v (global): v is k;
  dgemma_triton_splits<n>: the keys split over n programs per row block (--kv-splits; "auto", the default,
  is the kernel's own choice and the plain dgemma_triton rows); dgemma_triton_tile_mask: the mask made
  contiguous (a row per query), as masks with rows of their own are read.
Per case: median ms (plain launches and CUDA-graph replays), TFLOP/s, error against float32 math on a
slice of query rows, and the floor in the same run: max(bytes / copy bandwidth, FLOPs / bf16 matmul rate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

SHAPES = {  # name: (query heads, kv heads, head_dim)
    "global": (16, 2, 512),
    "sliding": (16, 8, 256),
}
REF_ROWS = 8  # query rows checked against float32 math (the full reference would not fit at 128k keys)


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{name} must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"{name} must be comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv", default="4096,32768,131072", help="comma-separated kv lengths")
    parser.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--q", type=int, default=256, help="query length (the canvas)")
    parser.add_argument("--shapes", default="global,sliding", help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--no-mask", action="store_true", help="also time every case without a mask")
    parser.add_argument("--sweep", action="store_true", help="also try the Triton block-size candidates")
    parser.add_argument("--kv-splits", default="auto",
                        help="comma-separated key splits for the Triton kernel: 'auto' and/or ints 1..16")
    parser.add_argument("--out", type=Path, default=Path("results/attention.json"))
    args = parser.parse_args(argv)
    args.kv = parse_ints(args.kv, "--kv")
    args.batch = parse_ints(args.batch, "--batch")
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    splits = [s.strip() for s in args.kv_splits.split(",") if s.strip()]
    if not splits or any(s != "auto" and not (s.isdigit() and 1 <= int(s) <= 16) for s in splits):
        raise SystemExit(f"--kv-splits must be 'auto' and/or integers from 1 to 16, got {args.kv_splits!r}")
    args.kv_splits = [None if s == "auto" else int(s) for s in splits]
    unknown = sorted(set(args.shapes) - set(SHAPES))
    if unknown or not args.shapes:
        raise SystemExit(f"--shapes must name some of {sorted(SHAPES)}, got {unknown or args.shapes}")
    if args.q <= 0:
        raise SystemExit(f"--q must be positive, got {args.q}")
    return args


# Candidates (BLOCK_M, BLOCK_N, DV_SPLIT, num_warps, num_stages) per head dim: variations around the tuned
# table that compile for sm_90 without register spills and fit in shared memory (checked offline with
# Triton's compiler and ptxas -v); each compiles once per process.
SWEEP = {
    512: [(64, 32, 2, 8, 2), (64, 32, 1, 8, 2), (64, 32, 4, 8, 2), (64, 32, 2, 8, 3), (64, 32, 2, 4, 2),
          (64, 64, 2, 8, 2), (64, 64, 4, 8, 2), (128, 32, 2, 8, 1), (128, 32, 4, 8, 2)],
    256: [(64, 64, 1, 8, 2), (64, 32, 1, 8, 2), (64, 32, 1, 8, 3), (64, 64, 2, 8, 2), (128, 32, 1, 8, 2),
          (128, 64, 1, 8, 2), (128, 64, 2, 8, 2), (64, 32, 2, 4, 3)],
}


def sweep_configs(head_dim: int):
    return SWEEP.get(head_dim, [])


def decoder_mask(batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """The decoder's boolean mask as the model makes it: one row per batch element, expanded over the queries;
    every key allowed, but rows b > 0 have 7 * b left-padding keys."""
    mask = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool, device=device)
    for b in range(1, batch):
        mask[b, :, :, : 7 * b] = False
    return mask.expand(batch, 1, q_len, kv_len)


def reference_rows(q, k, v, mask, scaling: float) -> torch.Tensor:
    """float32 math for the first REF_ROWS query rows: [B, Hq, REF_ROWS, D]."""
    group = q.shape[1] // k.shape[1]
    rows = q[:, :, :REF_ROWS].float()
    out = torch.empty(rows.shape, dtype=torch.float32, device=q.device)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group].float(), v[:, h // group].float()
        scores = rows[:, h] @ kh.transpose(-1, -2) * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0, :REF_ROWS], -math.inf)
        out[:, h] = torch.softmax(scores, -1) @ vh
    return out


def rel_err(got_rows: torch.Tensor, want: torch.Tensor) -> float:
    return ((got_rows.float() - want).norm() / want.norm()).item()


class _AttentionStub(torch.nn.Module):
    """What transformers' sdpa path reads from the attention module."""

    def __init__(self, group: int):
        super().__init__()
        self.num_key_value_groups = group
        self.is_causal = False  # the decoder's attention is bidirectional


def time_ms(fn, full: bool = True) -> dict:
    import triton.testing

    if not full:
        return {"launch_ms": triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median")}
    result = {"launch_ms": triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")}
    try:
        result["graph_ms"] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as err:  # a path that synchronises with the host cannot be captured
        result["graph_error"] = f"{type(err).__name__}: {err}"[:200]
    return result


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def bench_case(shape: str, batch: int, q_len: int, kv_len: int, masked: bool, ceilings: dict, sweep: bool,
               generator: torch.Generator, kv_splits=(None,)) -> list[dict]:
    from torch.nn.attention import sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dgemma_hf.kernels.attention import flash_attention, pick_config

    q_heads, kv_heads, head_dim = SHAPES[shape]
    group = q_heads // kv_heads
    scaling = 1.0  # DiffusionGemma: q and k are RMS-normed
    dev = "cuda"
    # Unit-norm-ish rows, as after RMSNorm, scaled so that softmax is neither flat nor one-hot.
    q = (torch.randn(batch, q_len, q_heads, head_dim, device=dev, generator=generator) / head_dim**0.5)
    q = q.bfloat16().transpose(1, 2)  # the model's layout: a transposed view of [B, q, Hq, D]
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device=dev, generator=generator).bfloat16()
    v = torch.randn(batch, kv_heads, kv_len, head_dim, device=dev, generator=generator).bfloat16()
    mask = decoder_mask(batch, q_len, kv_len, dev) if masked else None
    stub = _AttentionStub(group)
    want = reference_rows(q, k, v, mask, scaling)
    want_kv = reference_rows(q, k, k, mask, scaling) if shape == "global" else None

    flops = 4 * batch * q_heads * q_len * kv_len * head_dim
    io = 2 * batch * q_heads * q_len * head_dim * 2 + (batch * q_len * kv_len if masked else 0)

    def floor_ms(kv_tensors: int) -> float:
        bytes_ = kv_tensors * batch * kv_heads * kv_len * head_dim * 2 + io
        return max(bytes_ / (ceilings["copy_GBps"] * 1e6), flops / (ceilings["bf16_matmul_TFLOPs"] * 1e9))

    def transformers_sdpa():
        return sdpa_attention_forward(stub, q, k, v, mask, dropout=0.0, scaling=scaling, is_causal=False)[0]

    cases = {"transformers_sdpa": (lambda cfg: transformers_sdpa().transpose(1, 2), want, 2)}
    for name, backend in sdpa_backends().items():
        if name == "math" and kv_len > 32768:  # materialises [B, Hq, q, kv] scores: slow and big, skipped
            continue

        def run(cfg, backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        cases[f"sdpa_{name}"] = (run, want, 2)
    out = torch.empty(batch, q_len, q_heads, head_dim, dtype=q.dtype, device=dev).transpose(1, 2)
    if masked:  # the same mask stored row by row: the kernel reads [rows, keys] tiles
        full_mask = mask.contiguous()
        cases["dgemma_triton_tile_mask"] = (
            lambda cfg: flash_attention(q, k, v, full_mask, scaling=scaling, out=out, config=cfg), want, 2)
    for splits in kv_splits:
        suffix = "" if splits is None else f"_splits{splits}"
        cases["dgemma_triton" + suffix] = (
            lambda cfg, splits=splits: flash_attention(q, k, v, mask, scaling=scaling, out=out, config=cfg,
                                                       kv_splits=splits), want, 2)
        if shape == "global":
            cases["dgemma_triton_k_is_v" + suffix] = (
                lambda cfg, splits=splits: flash_attention(q, k, k, mask, scaling=scaling, out=out, config=cfg,
                                                           kv_splits=splits), want_kv, 1)

    common = {"shape": shape, "batch": batch, "q": q_len, "kv": kv_len, "mask": masked,
              "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim}
    rows, sdpa_rows = [], []
    for name, (run, reference, kv_tensors) in cases.items():
        configs = [None] + (sweep_configs(head_dim) if sweep and name.startswith("dgemma") else [])
        best = None
        for cfg in configs:
            try:
                err = rel_err(run(cfg)[:, :, :REF_ROWS], reference)
                timing = time_ms(lambda run=run, cfg=cfg: run(cfg), full=cfg is None)
            except Exception as exc:  # a backend that refuses the case, a config out of shared memory
                if cfg is None:
                    print(f"  {shape} b{batch} kv{kv_len} {name}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            ms = timing.get("graph_ms", timing["launch_ms"])
            row = {**common, "case": name, "rel_err_vs_fp32": err, **timing, "TFLOPs": flops / ms / 1e9,
                   "floor_ms": floor_ms(kv_tensors), "x_floor": ms / floor_ms(kv_tensors),
                   "config": list(cfg) if cfg else (list(pick_config(head_dim, q.dtype))
                                                    if name.startswith("dgemma") else None)}
            if cfg is None:
                rows.append(row)
                if name.startswith("sdpa_"):
                    sdpa_rows.append(row)
            if best is None or timing["launch_ms"] < best["launch_ms"]:
                best = row
        if len(configs) > 1 and best is not None:
            rows.append({**best, "case": name + "_best_swept"})
        torch.cuda.empty_cache()
    if sdpa_rows:
        best_sdpa = min(sdpa_rows, key=lambda r: r.get("graph_ms", r["launch_ms"]))
        rows.append({**best_sdpa, "case": "sdpa_best", "backend": best_sdpa["case"]})
    baseline = next((r for r in rows if r["case"] == "transformers_sdpa"), None)
    for row in rows:
        if baseline is not None:
            row["speedup_vs_transformers"] = (baseline.get("graph_ms", baseline["launch_ms"])
                                              / row.get("graph_ms", row["launch_ms"]))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("eval.attention needs a CUDA GPU")
    from eval.kernels import measure_ceilings

    generator = torch.Generator(device="cuda").manual_seed(0)
    ceilings = measure_ceilings()
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceilings,
              "shapes": {name: dict(zip(("q_heads", "kv_heads", "head_dim"), SHAPES[name])) for name in args.shapes},
              "rows": []}
    for shape, batch, kv_len in itertools.product(args.shapes, args.batch, args.kv):
        for masked in (True, False) if args.no_mask else (True,):
            print(f"{shape} batch {batch} kv {kv_len} mask {masked} ...", flush=True)
            try:
                report["rows"] += bench_case(shape, batch, args.q, kv_len, masked, ceilings, args.sweep, generator,
                                             args.kv_splits)
            except torch.OutOfMemoryError as exc:
                print(f"  out of memory: {str(exc)[:120]}")
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{report['card']}: copy {ceilings['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'shape':8s} {'b':>2s} {'kv':>7s} {'mask':>5s} {'case':28s} {'graph ms':>9s} {'launch ms':>9s} "
          f"{'TFLOP/s':>8s} {'x floor':>7s} {'vs trf':>6s} {'rel err':>8s}  config")
    for r in report["rows"]:
        print(f"{r['shape']:8s} {r['batch']:2d} {r['kv']:7d} {r['mask']!s:>5s} {r['case']:28s} "
              f"{r.get('graph_ms', math.nan):9.3f} {r['launch_ms']:9.3f} {r['TFLOPs']:8.1f} {r['x_floor']:7.2f} "
              f"{r.get('speedup_vs_transformers', math.nan):6.2f} {r['rel_err_vs_fp32']:8.1e}  "
              f"{r.get('backend', '') or (r['config'] or '')}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
