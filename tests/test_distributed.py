"""Multi-process inference (dgemma_hf.distributed): 2 gloo processes on a tiny model against one process.

The worker half of this file runs under torchrun (`python tests/test_distributed.py CHECKPOINT OUT_DIR` as each
rank); the tests start it with `python -m torch.distributed.run --nproc-per-node 2` and compare what each rank
wrote with the same calls in the test's own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

# As a torchrun worker (not under pytest) the interpreter setup comes first: conftest's environment, one thread.
if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conftest  # noqa: F401  (offline hub, TRITON_INTERPRET=1 on CPUs, one thread)

import pytest
from transformers import AutoModel, AutoTokenizer, DistributedConfig, pipeline

import dgemma_hf
from dgemma_hf import DiffusionGemmaForMaskedGeneration, distributed, fused_layers
from dgemma_hf.generation import engine
from dgemma_hf.distributed import (
    ExpertShard,
    check_world_size,
    parallel_plans,
    tensor_plan,
)
from dgemma_hf.tiny import make_tiny_checkpoint, tiny_config

PROMPTS = ["Why is the sky blue?", "The river runs past the old mill", "Tom has 3 apples"]
GENERATE = dict(max_new_tokens=32, max_denoising_steps=4, eos_token_id=None)  # two canvases of 16
SEED = 1234
TRITON_ATTENTION = {"text_config": "dgemma_attention_triton"}  # the kernel everywhere (interpreted on CPUs)


def _inputs(tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all(), "the batch must exercise left padding"
    return batch["input_ids"], batch["attention_mask"]


def _reference(model, tokenizer, seed):
    input_ids, attention_mask = _inputs(tokenizer)
    torch.manual_seed(seed)
    out = model.generate(input_ids, attention_mask=attention_mask, sampling="reference", **GENERATE)
    return {"sequences": out.sequences.tolist(), "tokens_per_forward": out.tokens_per_forward.tolist()}


def _fused(model, tokenizer, **kwargs):
    input_ids, attention_mask = _inputs(tokenizer)
    out = model.generate(input_ids, attention_mask=attention_mask, sampling="fused", seed=7, **GENERATE, **kwargs)
    return out.sequences.tolist()


def _pipeline(model, tokenizer):
    pipe = pipeline("text-diffusion", model=model, tokenizer=tokenizer)
    return pipe("Why is the sky blue?", max_new_tokens=16, max_denoising_steps=4, seed=3, sampling="reference")


# -- the torchrun worker -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _counted_layers():
    """Counts the fused layer calls, those on split projections (the split layers keep the fused forward:
    local shards, all-reduces in the regions) and those whose experts' partial outputs were summed with the
    MLP's in one all-reduce (`ExpertShard.partial_sums`)."""
    counts = {"fused_calls": 0, "fused_calls_split": 0, "experts_summed_with_mlp": 0}
    fused_forward, partial_sums = fused_layers.fused_forward, ExpertShard.partial_sums

    def counting(layer, projections, *args, **kwargs):
        counts["fused_calls"] += 1
        counts["fused_calls_split"] += projections["group"] is not None
        return fused_forward(layer, projections, *args, **kwargs)

    def counting_partial_sums(shard):
        counts["experts_summed_with_mlp"] += 1
        return partial_sums(shard)

    fused_layers.fused_forward, ExpertShard.partial_sums = counting, counting_partial_sums
    try:
        yield counts
    finally:
        fused_layers.fused_forward, ExpertShard.partial_sums = fused_forward, partial_sums


def worker(checkpoint: str, out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    result = {}

    model = AutoModel.from_pretrained(checkpoint, tp_plan="auto")
    decoder = model.model.decoder
    result["layout"] = {
        "q_rows": decoder.layers[0].self_attn.q_proj.weight.to_local().shape[0],
        "sliding_k_rows": decoder.layers[0].self_attn.k_proj.weight.to_local().shape[0],
        "global_k_is_dtensor": type(decoder.layers[2].self_attn.k_proj.weight).__name__ == "DTensor",
        "global_kv_groups": decoder.layers[2].self_attn.num_key_value_groups,
        "experts": decoder.layers[0].experts.num_experts,
        "expert_rows": decoder.layers[0].experts.gate_up_proj.to_local().shape[0],
        "embedding_rows": decoder.embed_tokens.weight.to_local().shape[0],
        "tied": model.model.encoder.language_model.layers[1].experts.down_proj is decoder.layers[1].experts.down_proj,
        "decoder_layer": type(decoder.layers[0]).__name__,
    }
    with _counted_layers() as counts:
        # A different torch seed on each rank: generate() must hand rank 0's random state to every rank.
        result["reference"] = _reference(model, tokenizer, SEED + 100 * rank)
    result["counts"] = {"tp_plan": counts}
    # The fused sampler on each rank's vocabulary columns, or on gathered logits where top-k needs whole rows.
    sample_over_ranks, split_calls = engine.sample_tokens_over_ranks, []
    engine.sample_tokens_over_ranks = lambda *args, **kw: split_calls.append(1) or sample_over_ranks(*args, **kw)
    try:
        result["fused"] = _fused(model, tokenizer)
        result["split_sampler_calls"] = {"fused": len(split_calls)}
        result["fused_top_k"] = _fused(model, tokenizer, top_k=40)
        result["split_sampler_calls"]["fused_top_k"] = len(split_calls) - result["split_sampler_calls"]["fused"]
    finally:
        engine.sample_tokens_over_ranks = sample_over_ranks
    result["pipeline"] = _pipeline(model, tokenizer)
    try:
        model.generate(tokenizer([PROMPTS[rank]], return_tensors="pt")["input_ids"], sampling="reference", **GENERATE)
        result["different_prompts"] = "no error"
    except ValueError as error:
        result["different_prompts"] = str(error)
    del model

    ep = AutoModel.from_pretrained(checkpoint, distributed_config=DistributedConfig(tp_size=2, ep_size=2))
    with _counted_layers() as result["counts"]["ep_size"]:
        result["ep_reference"] = _reference(ep, tokenizer, SEED)
    del ep

    nvfp4 = AutoModel.from_pretrained(checkpoint, tp_plan="auto", quantization_config=dgemma_hf.NVFP4Config())
    with _counted_layers() as result["counts"]["nvfp4"]:
        result["nvfp4_reference"] = _reference(nvfp4, tokenizer, SEED)
    result["nvfp4_expert_rows"] = nvfp4.model.decoder.layers[0].experts.gate_up_packed.shape[0]
    del nvfp4

    kernel = AutoModel.from_pretrained(checkpoint, tp_plan="auto", attn_implementation=TRITON_ATTENTION)
    result["triton_attention_reference"] = _reference(kernel, tokenizer, SEED)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


# -- tests ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A tiny checkpoint (sliding layers with 2 KV heads, split over 2 ranks; a global layer with 1, replicated;
    4 experts, 2 a rank) and what each of 2 gloo ranks computed on it."""
    root = tmp_path_factory.mktemp("distributed")
    checkpoint = make_tiny_checkpoint(root / "tiny", seed=11)
    out_dir = root / "out"
    out_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    src = str(Path(dgemma_hf.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), __file__, str(checkpoint), str(out_dir),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return checkpoint, ranks


@pytest.fixture(scope="module")
def one_process(two_ranks):
    checkpoint, _ = two_ranks
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint)
    nvfp4 = AutoModel.from_pretrained(checkpoint, quantization_config=dgemma_hf.NVFP4Config())
    kernel = AutoModel.from_pretrained(checkpoint, attn_implementation=TRITON_ATTENTION)
    return {
        "triton_attention_reference": _reference(kernel, tokenizer, SEED),
        "reference": _reference(model, tokenizer, SEED),
        "fused": _fused(model, tokenizer),
        "fused_top_k": _fused(model, tokenizer, top_k=40),
        "pipeline": _pipeline(model, tokenizer),
        "nvfp4_reference": _reference(nvfp4, tokenizer, SEED),
    }


def test_two_ranks_split_the_model(two_ranks):
    _, ranks = two_ranks
    for rank in ranks:
        layout = rank["layout"]
        assert layout["q_rows"] == 2 * 16  # 2 of 4 query heads of head_dim 16
        assert layout["sliding_k_rows"] == 16  # 1 of 2 KV heads
        assert not layout["global_k_is_dtensor"] and layout["global_kv_groups"] == 2  # 1 KV head, replicated
        assert layout["experts"] == 2 and layout["expert_rows"] == 2
        assert layout["embedding_rows"] == 256  # half the 512-token vocabulary
        assert layout["tied"]
        assert layout["decoder_layer"] == "FusedDecoderLayer"
        # Every decoder step and canvas commit went through the fused regions, all on the split projections.
        # ... and each summed its experts' partial outputs with its MLP's in one all-reduce, whichever way the
        # model was split (tp_plan="auto", DistributedConfig(tp_size, ep_size), NVFP4 experts).
        for counts in rank["counts"].values():
            assert counts["fused_calls"] > 0
            assert counts["fused_calls_split"] == counts["experts_summed_with_mlp"] == counts["fused_calls"]
    assert all(rank["nvfp4_expert_rows"] == 2 for rank in ranks)


@pytest.mark.parametrize("mode", ["reference", "ep_reference", "nvfp4_reference", "triton_attention_reference"])
def test_two_ranks_generate_what_one_process_does_in_reference_mode(two_ranks, one_process, mode):
    """tp_plan="auto" (TP + EP through the tp plan), DistributedConfig(tp_size=2, ep_size=2) (EP through
    transformers' ep_dispatch_experts with ep_implementation "dgemma"), NVFP4 experts quantized while loading, and
    the Triton attention kernel (interpreted) on each rank's heads: the same sequences and tokens per forward as
    one process, on both ranks (which started from different seeds)."""
    _, ranks = two_ranks
    want = one_process[mode if mode in ("nvfp4_reference", "triton_attention_reference") else "reference"]
    assert len(want["sequences"]) == len(PROMPTS) and len(want["sequences"][0]) > 32
    for rank in ranks:
        assert rank[mode] == want


def test_two_ranks_match_one_process_with_the_fused_sampler_and_the_pipeline(two_ranks, one_process):
    _, ranks = two_ranks
    for rank in ranks:
        assert rank["fused"] == one_process["fused"]
        assert rank["fused_top_k"] == one_process["fused_top_k"]
        assert rank["pipeline"] == one_process["pipeline"]
        # Every fused step sampled from the rank's own columns, except with top-k (whole rows, gathered).
        assert rank["split_sampler_calls"]["fused"] == 2 * GENERATE["max_denoising_steps"]
        assert rank["split_sampler_calls"]["fused_top_k"] == 0
    assert one_process["fused_top_k"] != one_process["fused"]
    assert one_process["pipeline"][0]["generated_text"]
    assert one_process["fused"] != one_process["reference"]["sequences"]  # two different samplers ran


def test_different_prompts_on_the_ranks_are_refused(two_ranks):
    _, ranks = two_ranks
    for rank in ranks:
        assert "different input_ids on the ranks" in rank["different_prompts"]


# -- checks that need no second process ----------------------------------------------------------------------------


def test_plan_covers_both_text_stacks_the_vocabulary_and_self_conditioning():
    model = DiffusionGemmaForMaskedGeneration(tiny_config())
    plan = model._expand_parallel_plan(tensor_plan())
    for stack in ("model.encoder.language_model", "model.decoder"):
        for layer in range(3):
            prefix = f"{stack}.layers.{layer}"
            assert plan[f"{prefix}.self_attn"] == "dgemma_attention_heads"
            assert plan[f"{prefix}.mlp.gate_proj.weight"] == "colwise"
            assert plan[f"{prefix}.mlp.down_proj.weight"] == "rowwise"
            assert plan[f"{prefix}.experts.gate_up_proj"] == "grouped_gemm"
            assert plan[f"{prefix}.experts"] == "dgemma_expert_parallel"
        assert plan[f"{stack}.embed_tokens.weight"] == "dgemma_vocab_embedding"
    assert plan["model.decoder.self_conditioning.up_proj.weight"] == "colwise"
    assert plan["lm_head.weight"] == "dgemma_vocab_head"
    tp, ep = parallel_plans()
    assert set(ep.values()) == {"grouped_gemm", "ep_dispatch_experts"}
    assert not any("vision" in key for key in tp)  # the vision tower stays whole


def test_world_sizes_that_do_not_split_the_model_are_named():
    config = tiny_config()  # 4 experts, 4 query heads, 2 / 1 KV heads, vocabulary 512
    for world in (1, 2, 4):
        check_world_size(config, world)
    with pytest.raises(ValueError, match=r"N=3 .*4 routed experts.*4 query heads.*2 key/value heads"):
        check_world_size(config, 3)
    with pytest.raises(ValueError, match="3 key/value heads"):
        check_world_size(tiny_config(num_attention_heads=6, num_key_value_heads=3, num_experts=6), 2)


def test_split_sampler_refuses_shards_it_cannot_sample_before_any_collective():
    """Vocabulary shards must hold a multiple of 4 tokens (random words come in fours); every rank raises before the
    all-gather, so none waits for the others. (The engine gathers the logits instead for such shards.)"""
    shard = SimpleNamespace(start=257, size=257, total=514, ranks=2, group=None)
    logits = torch.zeros(3, 257)
    with pytest.raises(ValueError, match="multiple of 4 tokens, got 257"):
        distributed.sample_tokens_over_ranks(logits, torch.ones(1), torch.zeros(1, dtype=torch.long),
                                             torch.zeros(1, dtype=torch.long), shard)


def test_bad_layouts_are_refused_before_any_weight_is_sharded():
    model = DiffusionGemmaForMaskedGeneration(tiny_config())
    q_proj = model.model.decoder.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="N=3"):
        model._resolve_parallel_plans(DistributedConfig(tp_size=3))
    with pytest.raises(ValueError, match="fsdp_size"):
        model._resolve_parallel_plans(DistributedConfig(tp_size=2, fsdp_size=2))
    with pytest.raises(ValueError, match="ep_implementation='all_to_all'"):
        model._resolve_parallel_plans(DistributedConfig(tp_size=2, ep_size=2, ep_implementation="all_to_all"))
    assert model.model.decoder.layers[0].self_attn.q_proj is q_proj and not hasattr(q_proj, "_is_hooked")


def test_a_model_split_by_device_map_generates_with_the_reference_engine(tmp_path, tokenizer):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny", seed=2)
    device_map = {"model.encoder.vision_tower": "disk", "model.encoder.embed_vision": "cpu",
                  "model.encoder.language_model": "cpu", "model.decoder": "cpu", "lm_head": "cpu"}
    model = AutoModel.from_pretrained(checkpoint, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    input_ids = tokenizer(["Why is the sky blue?"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=r"device_map placed this model on \['cpu', 'disk'\]"):
        model.generate(input_ids, sampling="fused", seed=0, max_new_tokens=16)
    torch.manual_seed(0)
    sequences = model.generate(input_ids, sampling="reference", max_new_tokens=16).sequences
    assert sequences.shape[1] == input_ids.shape[1] + 16
    torch.manual_seed(0)  # the default sampling picks the reference engine for a split model
    assert torch.equal(model.generate(input_ids, max_new_tokens=16).sequences, sequences)
    from dgemma_hf.generation.engine import resolve_sampling

    cuda = torch.device("cuda")  # a device object only: no GPU needed
    assert resolve_sampling("auto", cuda, None, one_device=False) == "reference"
    assert resolve_sampling("auto", cuda, None) == "fused"


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
