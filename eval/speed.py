"""Generation speed benchmark: dgemma_hf's engine against upstream generate(), in one process.

    python -m eval.speed [--batch 1,4,8] [--prompt 512] [--new-tokens 512] [--steps 16] [--layers 30]
                         [--experts bf16,nvfp4] [--attention sdpa,dgemma_attention] [--baseline-batch 1]
                         [--prefill-chunk N] [--out results/speed.json]

DESIGN.md's speed protocol: DiffusionGemma 26B-A4B shapes with random weights built on the GPU (no download;
`--layers` and the other size options shrink it), adaptive stopping off and a fixed number of denoising steps
per canvas, no eos. Upstream's `generate()` (experts on grouped_mm, its default) runs on the same weights in
the same process as the baseline. Reports tok/s, ms per denoising step, first-call seconds (capture
included), peak GPU memory, and the floor: the text weights one decoder step must read / device copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

# DiffusionGemma 26B-A4B's text config (REFERENCE.md section 1).
TEXT_CONFIG = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True,
    sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
    max_position_embeddings=262144, final_logit_softcapping=30.0,
)
# The vision tower does not take part in text generation; a small one keeps memory for the text model.
SMALL_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=32, position_embedding_size=64)


def build_model(layers: int, dtype: torch.dtype, device: str = "cuda", experts: str = "bf16"):
    """Random-weight model built directly on the GPU: parameters start on the meta device, are tied there,
    then each unique parameter gets GPU memory once (the encoder and decoder share their text weights).
    experts="nvfp4": the routed experts are random bf16 weights quantized on the GPU by the quantize-on-load
    path (`NVFP4Config`'s converter), one layer at a time."""
    from accelerate import init_empty_weights
    from transformers import DiffusionGemmaConfig

    from dgemma_hf import DiffusionGemmaForMaskedGeneration
    from dgemma_hf.quantization.loading import QuantizeExperts
    from dgemma_hf.quantization.swap import nvfp4_experts_modules, swap_in_nvfp4_experts

    layer_types = [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(layers)]
    layer_types[-1] = "full_attention"
    text = {**TEXT_CONFIG, "num_hidden_layers": layers, "layer_types": layer_types}
    config = DiffusionGemmaConfig(text_config=text, vision_config=SMALL_VISION, canvas_length=256)
    with init_empty_weights():
        model = DiffusionGemmaForMaskedGeneration(config)
    if experts == "nvfp4":
        swap_in_nvfp4_experts(model, input_scales=False)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(0)
    for name, module in (nvfp4_experts_modules(model) if experts == "nvfp4" else {}).items():
        e, i, h = module.num_experts, module.intermediate_dim, module.hidden_dim
        for target, shape in (("gate_up_packed", (e, 2 * i, h)), ("down_packed", (e, h, i))):
            dense = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
            quantized = QuantizeExperts().convert({f"{name}.{target}": dense}, config=config)
            for key, tensor in quantized.items():
                module._buffers[key.rpartition(".")[2]] = tensor
            del dense, quantized
    real = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in real:
                data = torch.empty(param.shape, dtype=dtype, device=device)
                if param.ndim == 1:
                    data.fill_(1.0)  # norm weights and scales
                else:
                    data.normal_(0.0, 0.02, generator=generator)
                real[id(param)] = torch.nn.Parameter(data, requires_grad=False)
            module._parameters[name] = real[id(param)]
    model.to(device)  # buffers (rotary tables, scalars) were built on the CPU
    return model.eval()


def text_weight_bytes(model) -> int:
    """Bytes of the unique text parameters and buffers (NVFP4 experts are buffers), the ones a decoder step
    reads (the vision tower excluded)."""
    seen, total = set(), 0
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        if "vision" in name or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def copy_bandwidth_gbps() -> float:
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


ENGINES = ("upstream_generate", "dgemma_hf_upstream_layers", "dgemma_hf")


def run_case(model, batch: int, args, engine: str, attention: str = "sdpa") -> dict:
    """engine: upstream's generate as it ships; dgemma_hf's engine with upstream's decoder layers (what the fused
    layers add); dgemma_hf as it ships. attention: the attention implementation of the case."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgemma_hf.fused_layers import upstream_layers

    generator = torch.Generator(device="cuda").manual_seed(batch)
    input_ids = torch.randint(3, model.config.text_config.vocab_size, (batch, args.prompt), device="cuda",
                              generator=generator)
    kwargs = dict(max_new_tokens=args.new_tokens, max_denoising_steps=args.steps, stability_threshold=None,
                  confidence_threshold=None, eos_token_id=None)
    # A new engine per case: the captured step has the layers' kernels baked in.
    model._dgemma_engine = None
    model.set_attn_implementation({"text_config": attention})
    if engine == "upstream_generate":  # upstream's default experts backend (bf16 weights only)
        model.set_experts_implementation("grouped_mm")
    else:
        model.set_experts_implementation("dgemma")

    ours = dict(sampling="fused", seed=0, prefill_chunk_size=args.prefill_chunk)

    def run():
        if engine == "dgemma_hf":
            return model.generate(input_ids, **ours, **kwargs)
        with upstream_layers(model):
            if engine == "upstream_generate":
                return DiffusionGemmaForBlockDiffusion.generate(model, input_ids, **kwargs)
            return model.generate(input_ids, **ours, **kwargs)

    torch.cuda.reset_peak_memory_stats()
    first_s, out = timed(run)
    times = [timed(run)[0] for _ in range(args.repeats)]
    seconds = statistics.median(times)  # of an even count: the mean of the middle two
    new_tokens = out.sequences.shape[1] - args.prompt
    steps = -(-args.new_tokens // model.config.canvas_length) * args.steps
    extra = {"call_profile": profile_call(run)} if args.profile and engine != "upstream_generate" else {}
    return extra | {
        "engine": engine,
        "experts": args.experts_kind,
        "attention": attention,
        "batch": batch,
        "tok_per_s": batch * new_tokens / seconds,
        "seconds": seconds,
        "ms_per_step": seconds / steps * 1e3,
        "first_call_s": first_s,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def profile_step(model) -> dict:
    """Times replays of the engine's captured step (the decoder step alone, no encoder pass) and prints the
    GPU kernels of one replay, heaviest first."""
    engine = model._dgemma_engine
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(6):
        engine.step_index.zero_()  # the step reads its temperature by index: stay inside the schedule
        start.record()
        engine._captured.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    graph_ms = sorted(times)[len(times) // 2]
    engine.step_index.zero_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine._captured.replay()
        torch.cuda.synchronize()
    engine.step_index.zero_()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=70))
    return {"graph_step_ms": graph_ms, "kernels_per_step": sum(e.count for e in kernels),
            "kernel_ms_per_step": sum(e.device_time_total for e in kernels) / 1e3}


def profile_call(run, show: bool = True) -> dict:
    """Profiles one whole generate() call: per phase of the engine (its `dgemma_hf.*` ranges: prefill, commit,
    canvas_start, denoise, canvas_end) the host milliseconds, the GPU milliseconds of the kernels launched from it
    and its heaviest kernels; the call's wall time and the time the GPU was busy. Only kernels launched through
    the CUDA runtime (torch's, cuBLAS's) are traced to a phase: Triton's and CUDA graphs' are counted in the busy
    time alone. The profiler slows the host side; compare phases, not the wall time with unprofiled rows."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        wall_s, _ = timed(run)
    events = prof.events()
    phases = {}
    for event in events:
        if not event.name.startswith("dgemma_hf.") or event.device_type != torch.autograd.DeviceType.CPU:
            continue  # (the profiler also marks each range on the GPU's timeline)
        phase = phases.setdefault(event.name.partition(".")[2], {"count": 0, "host_ms": 0.0, "gpu_ms": 0.0,
                                                                 "kernels": {}})
        phase["count"] += 1
        phase["host_ms"] += event.time_range.elapsed_us() / 1e3
        phase["gpu_ms"] += event.device_time_total / 1e3
        stack = [event]
        while stack:  # every kernel launched inside the range
            child = stack.pop()
            stack.extend(child.cpu_children)
            for kernel in child.kernels:
                phase["kernels"][kernel.name] = phase["kernels"].get(kernel.name, 0.0) + kernel.duration / 1e3
    for phase in phases.values():
        heaviest = sorted(phase["kernels"].items(), key=lambda item: -item[1])[:8]
        phase["kernels"] = {name[:90]: round(ms, 3) for name, ms in heaviest}
    busy = sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    busy_us, end = 0.0, float("-inf")
    for start, stop in busy:  # the union of the GPU's intervals
        busy_us += max(0.0, stop - max(start, end))
        end = max(end, stop)
    summary = {"profiled_wall_ms": wall_s * 1e3, "gpu_busy_ms": busy_us / 1e3, "phases": phases}
    if show:
        print(json.dumps(summary, indent=1), flush=True)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,4,8", help="comma-separated batch sizes")
    parser.add_argument("--baseline-batch", default="1", help="batch sizes (bf16 experts) that also run upstream "
                        "generate() and dgemma_hf's engine with upstream's decoder layers")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--experts", default="bf16", help="comma-separated expert weight formats: bf16, nvfp4 "
                        "(upstream's baseline runs with bf16 only)")
    parser.add_argument("--attention", default="dgemma_attention", help="comma-separated attention implementations "
                        "of the text layers for dgemma_hf's engine: dgemma_attention (its default on CUDA), sdpa "
                        "(the baselines run with sdpa)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="dgemma_hf's engine prefills the prompt in chunks of this many tokens (long prompts)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one generate() call by phase, time one captured decoder step and list the "
                        "kernels of one step")
    parser.add_argument("--out", type=Path, default=Path("results/speed.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("eval.speed needs a CUDA GPU")
    batches = [int(b) for b in args.batch.split(",")]
    baseline = [int(b) for b in args.baseline_batch.split(",") if b]
    for name in ("prompt", "new_tokens", "steps", "layers", "repeats", "prefill_chunk"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")

    kinds = args.experts.split(",")
    if not kinds or any(kind not in ("bf16", "nvfp4") for kind in kinds):
        raise SystemExit(f"--experts takes bf16 and/or nvfp4, got {args.experts!r}")
    attentions = args.attention.split(",")
    if not attentions or any(name not in ("sdpa", "dgemma_attention") for name in attentions):
        raise SystemExit(f"--attention takes sdpa and/or dgemma_attention, got {args.attention!r}")

    bandwidth = copy_bandwidth_gbps()
    report = {"card": torch.cuda.get_device_name(), "copy_GBps": bandwidth,
              "settings": vars(args) | {"out": str(args.out)}, "rows": [], "models": {}}
    for kind in kinds:
        args.experts_kind = kind
        start = time.perf_counter()
        model = build_model(args.layers, torch.bfloat16, experts=kind)
        floor_ms = text_weight_bytes(model) / (bandwidth * 1e6)
        report["models"][kind] = {"build_s": time.perf_counter() - start,
                                  "text_weight_GB": text_weight_bytes(model) / 1e9, "floor_ms_per_step": floor_ms,
                                  "weights_on_gpu_GB": torch.cuda.memory_allocated() / 1e9}
        print(json.dumps({kind: report["models"][kind]}), flush=True)
        for batch in batches:
            engines = ENGINES if batch in baseline and kind == "bf16" else ENGINES[-1:]
            cases = [(engine, attention) for engine in engines
                     for attention in (attentions if engine == "dgemma_hf" else ["sdpa"])]
            for engine, attention in cases:
                row = run_case(model, batch, args, engine, attention)
                row["floor_ms_per_step"] = floor_ms
                row["floor_tok_per_s"] = batch * model.config.canvas_length / args.steps / (floor_ms / 1e3)
                if args.profile and engine == "dgemma_hf":
                    row.update(profile_step(model))
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
        del model
        gc.collect()  # the engine and the model refer to each other
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{report['card']}: copy {bandwidth:.0f} GB/s")
    for kind, facts in report["models"].items():
        print(f"  {kind} experts: text weights {facts['text_weight_GB']:.1f} GB, "
              f"floor {facts['floor_ms_per_step']:.1f} ms per decoder step")
    print(f"{'engine':26s} {'experts':>7s} {'attention':>16s} {'batch':>5s} {'tok/s':>8s} {'ms/step':>8s} "
          f"{'first s':>8s} {'peak GB':>8s} {'floor tok/s':>11s}")
    for r in report["rows"]:
        print(f"{r['engine']:26s} {r['experts']:>7s} {r['attention']:>16s} {r['batch']:5d} {r['tok_per_s']:8.0f} "
              f"{r['ms_per_step']:8.1f} {r['first_call_s']:8.1f} {r['peak_gb']:8.1f} {r['floor_tok_per_s']:11.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
