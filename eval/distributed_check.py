"""Multi-GPU check and speed run: DiffusionGemma split over N GPUs (tensor + expert parallel, NCCL) against one GPU.

    torchrun --nproc-per-node N -m eval.distributed_check [--experts bf16|nvfp4] [--batch 1,8] [--layers 30]
        [--prompt 512] [--new-tokens 512] [--steps 16] [--repeats 3] [--check-layers 4] [--no-check-trained]
        [--no-reference] [--profile]
        [--out results/distributed_check.json]

Run from the repository root. Random weights, built on the GPUs (no download): every weight is drawn from a
generator seeded by its name, so the one-GPU model and the union of the N shards hold the same numbers.

1. Correctness (`--check-layers` > 0): a float32 model of that many layers (TF32 off), on rank 0 alone, then
   split over the N ranks. Same prompts (batch 2, one row left-padded): `generate(sampling="reference")` after
   torch.manual_seed(0) and one teacher-forced decoder step with the experts on torch's grouped_mm (the only
   differences are summation orders), and `generate(sampling="fused", seed=0)` on the default experts backend and
   the engine's CUDA graphs (on CUDA the Triton experts run float32 as TF32, tiled by the local expert count, so
   this one may differ by a token). Reports whether every rank returned the same sequences, whether they equal the
   one-GPU ones, and the largest logit difference.
2. Speed (DESIGN.md's protocol: bf16, or NVFP4 experts with `--experts nvfp4`; prompt 512, 512 new tokens, 16 fixed
   denoising steps, adaptive stopping off, no eos): for each batch, one GPU (rank 0 alone, unless
   `--no-reference`) and the N ranks: tok/s, ms per denoising step (generate's wall time / steps), the replay time
   of one captured denoising step and the GPU time of its NCCL kernels (waits for other ranks included),
   first-call seconds, peak memory (the largest over ranks), and the sequences'
   agreement across ranks and with one GPU (bf16 sums in another order can pick other tokens; reported, not
   required).
1b. Correctness on dgemma_hf's shipped trained model (`--check-trained`, on by default): float32, loaded by
   `AutoModel.from_pretrained` on one GPU and with `tp_plan="auto"` over the N ranks; both sampling modes with
   the generation config's defaults on a left-padded batch of arithmetic prompts. Its peaked distributions make
   "identical to one GPU" a fair demand, which the random model's nearly flat ones over 262K tokens do not.

Rank 0 prints one JSON line per result and writes everything to `--out`. NCCL_NVLS_ENABLE defaults to 0 (the
machines' NVLink multicast is off). `--tiny` swaps the 26B-A4B shapes for dgemma_hf's tiny test config, for a
smoke run on CPUs with gloo (`torchrun --nproc-per-node 2 -m eval.distributed_check --tiny`).
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before any NCCL communicator exists

import argparse
import gc
import json
import statistics
import time
import zlib
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .speed import SMALL_VISION, TEXT_CONFIG, profile_call  # the 26B-A4B shapes, as the one-GPU benchmark


def model_config(layers: int, tiny: bool):
    from transformers import DiffusionGemmaConfig

    if tiny:
        from dgemma_hf.tiny import TINY_TEXT_CONFIG, TINY_VISION_CONFIG

        text, vision, canvas = dict(TINY_TEXT_CONFIG), dict(TINY_VISION_CONFIG), 16
    else:
        text, vision, canvas = dict(TEXT_CONFIG), dict(SMALL_VISION), 256
    layer_types = [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(layers)]
    layer_types[-1] = "full_attention"
    text.update(num_hidden_layers=layers, layer_types=layer_types)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas)


# -- building a random model, whole or split ---------------------------------------------------------------------


def _random(name: str, shape, dtype, device) -> torch.Tensor:
    """The same numbers for a weight on every rank and in every build: a generator seeded by the weight's name."""
    data = torch.empty(shape, dtype=dtype, device=device)
    if len(shape) == 1:
        return data.fill_(1.0)  # norm weights and scales
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    return data.normal_(0.0, 0.02, generator=generator)


def build_model(config, dtype, device, mesh=None, nvfp4: bool = False):
    """Parameters start on the meta device and are tied there; with `mesh` the plan of dgemma_hf.distributed is
    applied (DTensor placeholders) and each rank keeps only its shard of every weight, drawn whole then cut."""
    from accelerate import init_empty_weights
    from torch.distributed.tensor import DTensor, distribute_tensor

    from dgemma_hf import DiffusionGemmaForMaskedGeneration
    from dgemma_hf.distributed import parallelize

    with init_empty_weights():
        model = DiffusionGemmaForMaskedGeneration(config)
    if nvfp4:
        from dgemma_hf.quantization.swap import swap_in_nvfp4_experts

        swap_in_nvfp4_experts(model, input_scales=False)
    if mesh is not None:
        parallelize(model, mesh)  # before tying, as from_pretrained does: every weight gets its placeholder
    model.tie_weights()  # the encoder's text weights become the decoder's (and the LM head the embedding)
    real = {}
    for name, param in model.named_parameters():  # first name of each tied weight: the same in every build
        full = _random(name, param.shape, dtype, device)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, mesh, param.placements, src_data_rank=None).to_local().clone()
            data = DTensor.from_local(local, mesh, param.placements, run_check=False, shape=param.shape,
                                      stride=param.stride())
        else:
            data = full
        del full
        real[id(param)] = torch.nn.Parameter(data, requires_grad=False)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in real:
                module._parameters[name] = real[id(param)]
    if nvfp4:
        _fill_nvfp4_experts(model, config, device, mesh)
    model.to(device)  # buffers (rotary tables, scalars) were built on the CPU
    for module in model.modules():  # the layers' output scale in the weights' dtype, as from_pretrained(dtype=) has it
        if isinstance(module._buffers.get("layer_scalar"), torch.Tensor):
            module._buffers["layer_scalar"] = module._buffers["layer_scalar"].to(dtype)
    return model.eval()


def _fill_nvfp4_experts(model, config, device, mesh) -> None:
    """NVFP4 experts quantized (as dgemma_hf's quantize-on-load does) from named random bf16 experts; with `mesh`
    each rank keeps its own experts only."""
    from dgemma_hf.quantization.loading import QuantizeExperts
    from dgemma_hf.quantization.swap import nvfp4_experts_modules

    text = config.get_text_config()
    experts, hidden, intermediate = text.num_experts, text.hidden_size, text.moe_intermediate_size
    world, rank = (mesh.size(), mesh.get_local_rank()) if mesh is not None else (1, 0)
    local = experts // world
    for name, module in nvfp4_experts_modules(model).items():
        shapes = {"gate_up": (experts, 2 * intermediate, hidden), "down": (experts, hidden, intermediate)}
        for proj, shape in shapes.items():
            dense = _random(f"{name}.{proj}_proj", shape, torch.bfloat16, device)
            key = f"{name}.{proj}_packed"
            for buffer_key, value in QuantizeExperts().convert({key: dense}, config=config).items():
                module._buffers[buffer_key.rpartition(".")[2]] = value[rank * local : (rank + 1) * local].clone()
            del dense
        module.num_experts = local


# -- measurements ------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(config, batch: int, length: int, device, pad: bool = True):
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    input_ids = torch.randint(3, config.text_config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch > 1 and pad:
        attention_mask[1, : length // 4] = 0  # a left-padded row
        input_ids[1, : length // 4] = 0
    return input_ids.to(device), attention_mask.to(device)


def token_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of equal tokens over the longer of two [batch, length] results (adaptive stopping can end one
    sooner: the missing canvases count as different)."""
    length = max(a.shape[1], b.shape[1])
    common = min(a.shape[1], b.shape[1])
    return (a[:, :common] == b[:, :common]).float().sum().item() / (a.shape[0] * length)


def compare_modes(split: dict, one: dict | None, group) -> dict:
    """For each sampling mode: whether the ranks agree and (rank 0, which holds `one`) whether the split model's
    sequences equal one GPU's, and their token agreement."""
    result = {}
    for mode in ("reference", "fused"):
        result[f"{mode}_ranks_identical"] = ranks_agree(split[mode], group)
        if one is not None:
            result[f"{mode}_identical_to_one_gpu"] = torch.equal(split[mode], one[mode])
            result[f"{mode}_token_agreement"] = token_agreement(split[mode], one[mode])
    return result


def ranks_agree(tensor: torch.Tensor, group) -> bool:
    """Whether every rank holds the same tensor (compared with rank 0's, broadcast)."""
    if group is None:
        return True
    first = tensor.clone()
    dist.broadcast(first, src=dist.get_global_rank(group, 0), group=group)
    differs = torch.tensor([int(not torch.equal(first, tensor))], device=tensor.device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)
    return not bool(differs.item())


def correctness_outputs(model, device, steps: int) -> dict:
    """Sequences of both sampling modes and one teacher-forced decoder step's logits, on fixed inputs."""
    from transformers import DynamicCache

    config = model.config
    input_ids, attention_mask = prompts(config, 2, 48, device)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=2 * config.canvas_length, max_denoising_steps=steps,
                  eos_token_id=None)
    # Reference mode and the teacher-forced step with torch's grouped_mm experts (exact float32); the fused mode
    # with the model's default backend (on CUDA the Triton kernels: float32 as TF32, tiles sized per expert count).
    model.set_experts_implementation("grouped_mm")
    torch.manual_seed(0)
    reference = model.generate(input_ids, sampling="reference", **kwargs).sequences
    model.set_experts_implementation("dgemma")
    fused = model.generate(input_ids, sampling="fused", seed=0, **kwargs).sequences
    model.set_experts_implementation("grouped_mm")
    canvas = torch.randint(3, config.text_config.vocab_size, (2, config.canvas_length),
                           generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        mask = torch.nn.functional.pad(attention_mask, (0, config.canvas_length), value=1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                       decoder_input_ids=canvas, decoder_attention_mask=mask).logits
    length = input_ids.shape[1]
    return {"reference": reference[:, length:], "fused": fused[:, length:], "logits": logits.float()}


TRAINED_PROMPTS = ["Calculate 7 - 2 + 4.", "Calculate 12 + 30 - 5 + 1.", "Calculate 3 + 3."]


def trained_outputs(device, mesh=None) -> dict:
    """dgemma_hf's shipped trained model (float32) loaded through AutoModel, on this GPU alone or with
    `tp_plan="auto"` over the mesh's ranks: sequences of both sampling modes (generation config's defaults,
    adaptive stopping included) on a left-padded batch of its arithmetic prompts. A trained model's peaked
    distributions keep reduction-order differences from flipping samples, which the random model's do not."""
    from transformers import AutoModel, AutoTokenizer

    from dgemma_hf.default_model import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    placement = {"tp_plan": "auto"} if mesh is not None else {"device_map": {"": device}}
    model = AutoModel.from_pretrained(path, dtype=torch.float32, **placement)
    conversations = [[{"role": "user", "content": prompt}] for prompt in TRAINED_PROMPTS]
    batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                          return_tensors="pt", return_dict=True).to(device)
    assert not batch["attention_mask"].all(), "the batch must exercise left padding"
    kwargs = dict(attention_mask=batch["attention_mask"], max_new_tokens=2 * model.config.canvas_length)
    torch.manual_seed(0)
    reference = model.generate(batch["input_ids"], sampling="reference", **kwargs).sequences
    fused = model.generate(batch["input_ids"], sampling="fused", seed=0, **kwargs).sequences
    length = batch["input_ids"].shape[1]
    answers = tokenizer.batch_decode(reference[:, length:], skip_special_tokens=True)
    del model
    return {"reference": reference[:, length:], "fused": fused[:, length:], "answers": answers}


def speed_case(model, batch: int, args, device, group) -> tuple[dict, torch.Tensor]:
    config = model.config
    input_ids, _ = prompts(config, batch, args.prompt, device, pad=False)
    kwargs = dict(max_new_tokens=args.new_tokens, max_denoising_steps=args.steps, stability_threshold=None,
                  confidence_threshold=None, eos_token_id=None, sampling="fused", seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed():
        sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids, **kwargs)
        sync(device)
        return time.perf_counter() - start, out

    first_s, out = timed()
    seconds = statistics.median(timed()[0] for _ in range(args.repeats))
    steps = -(-args.new_tokens // config.canvas_length) * args.steps
    new_tokens = out.sequences.shape[1] - args.prompt
    row = {"batch": batch, "tok_per_s": batch * new_tokens / seconds, "seconds": seconds,
           "ms_per_step": seconds / steps * 1e3, "first_call_s": first_s}
    if args.profile and device.type == "cuda":  # every rank runs it (collectives); rank 0 shows it
        row["call_profile"] = profile_call(lambda: model.generate(input_ids, **kwargs),
                                           show=group is None or dist.get_rank() == 0)
    graph_ms = captured_step_ms(model, device)
    if graph_ms is not None:
        row["graph_step_ms"] = graph_ms
        row.update(collective_time(model, device, group, show=args.profile and (group is None or dist.get_rank() == 0)))
    if device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 1e9], device=device)
        if group is not None:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        row["peak_gb_max_rank"] = peak.item()
    row["ranks_identical"] = ranks_agree(out.sequences, group)
    return row, out.sequences


def captured_step_ms(model, device) -> float | None:
    """Median replay time of the engine's captured denoising step (every rank replays it together)."""
    engine = getattr(model, "_dgemma_engine", None)
    graph = getattr(engine, "_captured", None)
    if device.type != "cuda" or graph is None:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        engine.step_index.zero_()  # the step reads its temperature by index: stay inside the schedule
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    engine.step_index.zero_()
    return sorted(times)[len(times) // 2]


def collective_time(model, device, group, show: bool = False) -> dict:
    """GPU time of the NCCL kernels (all-reduce, all-gather, ...) in one replay of the captured step, from the
    profiler's kernel records. A collective kernel also runs while it waits for the other ranks, so this is an
    upper bound on what the collectives cost per denoising step on this rank; the ranks meet at a barrier
    before the profiled replay, and a first profile warms the profiler up."""
    engine = model._dgemma_engine
    for _ in range(2):  # the first profile starts the profiler (unevenly over ranks): the second is kept
        engine.step_index.zero_()
        torch.cuda.synchronize(device)
        if group is not None:
            dist.barrier(group=group)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine._captured.replay()
            torch.cuda.synchronize(device)
    engine.step_index.zero_()
    if show:  # where a step's time goes on this rank, heaviest kernels first
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70), flush=True)
    nccl = [e for e in prof.key_averages() if "nccl" in e.key.lower() and e.device_time_total > 0]
    return {"collective_ms_per_step": sum(e.device_time_total for e in nccl) / 1e3,
            "collectives_per_step": sum(e.count for e in nccl)}


def free() -> None:
    """Returns the memory of the objects the caller has deleted (a model must be gone before the next is built)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- main --------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", choices=("bf16", "nvfp4"), default="bf16")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes for the speed runs")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-layers", type=int, default=4, help="layers of the float32 correctness model (0: skip)")
    parser.add_argument("--check-trained", action=argparse.BooleanOptionalAction, default=True,
                        help="also compare one GPU and N on dgemma_hf's shipped trained model (float32)")
    parser.add_argument("--no-reference", action="store_true", help="skip the one-GPU speed runs")
    parser.add_argument("--profile", action="store_true", help="rank 0 prints one generate() call by engine phase "
                        "(eval.speed's profile) and the kernels of one captured step")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run, CPU/gloo works)")
    parser.add_argument("--out", type=Path, default=Path("results/distributed_check.json"))
    args = parser.parse_args(argv)
    for name in ("layers", "prompt", "new_tokens", "steps", "repeats"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node N -m eval.distributed_check ...")
    batches = [int(b) for b in args.batch.split(",") if b]

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused sampler on CPUs (smoke runs)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2),
                            **({"device_id": device} if cuda else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = torch.distributed.init_device_mesh(device.type, (world,))
    group = mesh.get_group()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    import dgemma_hf  # noqa: F401  (registers the model, experts, styles)

    report = {"world_size": world, "card": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__, "settings": {k: str(v) for k, v in vars(args).items()},
              "correctness": {}, "speed": []}

    def emit(kind, row):
        if rank == 0:
            print(json.dumps({kind: row}), flush=True)

    # 1. correctness: float32, a few layers, one GPU then N.
    if args.check_layers > 0:
        config = model_config(args.check_layers, args.tiny)
        one = None
        if rank == 0:
            model = build_model(config, torch.float32, device)
            one = correctness_outputs(model, device, min(args.steps, 8))
            del model
            free()
        dist.barrier()
        model = build_model(config, torch.float32, device, mesh)
        split = correctness_outputs(model, device, min(args.steps, 8))
        del model
        free()
        result = compare_modes(split, one, group)
        if rank == 0:
            diff = (split["logits"] - one["logits"]).abs().max().item()
            result["logits_max_abs_diff"] = diff
            result["logits_max_abs"] = one["logits"].abs().max().item()
        report["correctness"] = result
        emit("correctness", result)

    # 1b. the same comparison on the shipped trained model, loaded with tp_plan="auto".
    if args.check_trained:
        one = trained_outputs(device) if rank == 0 else None
        free()
        dist.barrier()
        split = trained_outputs(device, mesh)
        free()
        result = compare_modes(split, one, group)
        if rank == 0:
            result["answers_one_gpu"], result["answers_split"] = one["answers"], split["answers"]
        report["correctness_trained"] = result
        emit("correctness_trained", result)

    # 2. speed: the protocol's shapes, one GPU then N.
    nvfp4 = args.experts == "nvfp4"
    config = model_config(args.layers, args.tiny)
    one_rows = {}
    if not args.no_reference:
        if rank == 0:
            start = time.perf_counter()
            model = build_model(config, torch.bfloat16, device, nvfp4=nvfp4)
            build_s = time.perf_counter() - start
            for batch in batches:
                row, sequences = speed_case(model, batch, args, device, None)
                row.update(gpus=1, experts=args.experts, build_s=build_s)
                one_rows[batch] = sequences
                report["speed"].append(row)
                emit("speed", row)
            del model
            free()
        dist.barrier()
    start = time.perf_counter()
    model = build_model(config, torch.bfloat16, device, mesh, nvfp4=nvfp4)
    build_s = time.perf_counter() - start
    for batch in batches:
        row, sequences = speed_case(model, batch, args, device, group)
        row.update(gpus=world, experts=args.experts, build_s=build_s)
        if rank == 0 and batch in one_rows:
            new, one_new = sequences[:, args.prompt :], one_rows[batch][:, args.prompt :]
            row["new_token_agreement_with_one_gpu"] = (new == one_new).float().mean().item()
            base = next(r for r in report["speed"] if r["gpus"] == 1 and r["batch"] == batch)
            row["speedup_vs_one_gpu"] = base["seconds"] / row["seconds"]
        report["speed"].append(row)
        emit("speed", row)
    del model
    free()

    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
